"""ExecuteWorkflow, GetExecution, ListExecutions and CancelExecution over a real server:
typed inputs, inputs that can never override fixed parameters, idempotency keyed by
caller, failures with their recorded execution, 100 concurrent executions. SQLite and
PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from google.protobuf.json_format import MessageToDict

from nexus_api.nexus.model.v1 import model_service_pb2 as mpb
from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as wpb

pytestmark = pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)

ExpectError = Callable[..., Awaitable[tuple[dict[str, str], list[tuple[str, str]]]]]
INVALID = grpc.StatusCode.INVALID_ARGUMENT
S = wpb.Execution


def struct(**values: Any) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


def execute(workflow: str, request_id: str = "", /, **inputs: Any) -> wpb.ExecuteWorkflowRequest:
    return wpb.ExecuteWorkflowRequest(name=workflow, inputs=struct(**inputs), request_id=request_id)


def as_caller(who: str) -> tuple[tuple[str, str], ...]:
    return (("x-nexus-caller", who),)


async def count_contacts(ms: Any, **flt: Any) -> int:
    resp = await ms.CountRecords(mpb.CountRecordsRequest(model="Contact", filter=struct(**flt)))
    return int(resp.count)


async def all_executions(wf: Any, **filters: Any) -> list[wpb.Execution]:
    resp = await wf.ListExecutions(wpb.ListExecutionsRequest(page_size=1000, **filters))
    assert resp.next_page_token == ""
    return list(resp.executions)


async def test_execute_with_typed_inputs(wf: Any, ms: Any) -> None:
    ex = await wf.ExecuteWorkflow(
        execute("create_contact", name="Ada", email="ada@x.io", score=3), timeout=10
    )
    assert ex.state == S.STATE_SUCCEEDED
    assert ex.workflow == "create_contact"
    assert len(ex.id) >= 16
    created = ex.outputs["create"]
    assert (created["name"], created["email"], created["score"]) == ("Ada", "ada@x.io", 3)
    assert created["company"] is None  # the input's default
    # the recorded inputs are the validated ones, defaults filled in
    assert dict(ex.inputs) == {"name": "Ada", "email": "ada@x.io", "score": 3, "company": None}
    assert not ex.HasField("error")
    assert ex.create_time.seconds > 0 and ex.end_time.ToDatetime() >= ex.start_time.ToDatetime()
    assert ex.HasField("duration")

    got = await wf.GetExecution(wpb.GetExecutionRequest(id=ex.id))
    assert got == ex
    record = await ms.GetRecord(mpb.GetRecordRequest(model="Contact", id=created["id"]))
    assert record["email"] == "ada@x.io"


async def test_each_bad_input_is_one_violation(wf: Any, ms: Any, expect_error: ExpectError) -> None:
    _, violations = await expect_error(
        wf.ExecuteWorkflow(
            execute("create_contact", name=5, email=["x"], score="many", nickname="Ace")
        ),
        INVALID,
        "INPUTS_INVALID",
    )
    # in name order, whatever order the Struct's map iterates in
    assert [f for f, _ in violations] == [
        "inputs.email",
        "inputs.name",
        "inputs.nickname",
        "inputs.score",
    ]
    assert "unknown input" in dict(violations)["inputs.nickname"]
    assert await all_executions(wf) == []  # nothing started, nothing recorded
    assert await count_contacts(ms) == 0


async def test_missing_input_is_an_error_never_the_placeholder(
    wf: Any, ms: Any, expect_error: ExpectError
) -> None:
    _, violations = await expect_error(
        wf.ExecuteWorkflow(execute("create_contact", email="ada@x.io")),
        INVALID,
        "INPUTS_INVALID",
        fields=["inputs.name"],
    )
    assert "missing" in violations[0][1]
    await expect_error(
        wf.ExecuteWorkflow(execute("create_contact")),
        INVALID,
        "INPUTS_INVALID",
    )
    assert await count_contacts(ms) == 0
    assert await count_contacts(ms, name="{{name}}") == 0
    assert await all_executions(wf) == []


async def test_inputs_never_override_fixed_parameters(
    wf: Any, ms: Any, expect_error: ExpectError
) -> None:
    for name, company in [("Ann", "Acme"), ("Bob", "Acme"), ("Eve", "Evil Corp")]:
        await ms.CreateRecord(
            mpb.CreateRecordRequest(
                model="Contact",
                record=struct(name=name, email=f"{name.lower()}@x.io", company=company),
            )
        )
    # the workflow fixed `filter`: a request can neither replace it nor add to it, under
    # the parameter's name or any name containing it
    attempts: list[dict[str, Any]] = [
        {"filter": {"company": "Evil Corp"}},
        {"filter": {"name; DROP TABLE contacts; --": "x"}},
        {"list_filter": {"company": {"$ne": ""}}},
        {"company": "Evil Corp"},
        {"order_by": ["-name"], "limit": 1},
    ]
    for inputs in attempts:
        bad = sorted(k for k in inputs if k != "limit")
        await expect_error(
            wf.ExecuteWorkflow(execute("acme_contacts", **inputs)),
            INVALID,
            "INPUTS_INVALID",
            fields=[f"inputs.{k}" for k in bad],
        )
    assert await all_executions(wf) == []  # no attempt ran or was recorded

    ex = await wf.ExecuteWorkflow(execute("acme_contacts", limit=10), timeout=10)
    names = [r["name"] for r in ex.outputs["list"]["records"]]
    assert names == ["Ann", "Bob"]
    (recorded,) = await all_executions(wf)
    assert recorded.id == ex.id
    assert dict(recorded.inputs) == {"limit": 10}
    # the table is intact and holds what it held
    assert await count_contacts(ms) == 3
    assert await count_contacts(ms, company="Evil Corp") == 1


async def test_request_id_makes_execute_idempotent(
    wf: Any, ms: Any, expect_error: ExpectError
) -> None:
    req = execute("create_contact", "req-1", name="Ada", email="ada@x.io")
    first = await wf.ExecuteWorkflow(req, timeout=10)
    again = await wf.ExecuteWorkflow(req, timeout=10)
    assert again.id == first.id
    assert again.request_id == "req-1"
    assert again.outputs == first.outputs
    assert await count_contacts(ms) == 1  # ran once

    meta, _ = await expect_error(
        wf.ExecuteWorkflow(execute("create_contact", "req-1", name="Bo", email="bo@x.io")),
        grpc.StatusCode.ALREADY_EXISTS,
        "REQUEST_ID_CONFLICT",
        fields=["request_id"],
    )
    assert meta["execution_id"] == first.id
    await expect_error(  # the same key for another workflow is another request too
        wf.ExecuteWorkflow(execute("acme_contacts", "req-1")),
        grpc.StatusCode.ALREADY_EXISTS,
        "REQUEST_ID_CONFLICT",
    )
    assert await count_contacts(ms) == 1
    assert len(await all_executions(wf)) == 1


async def test_request_id_is_keyed_by_caller(wf: Any) -> None:
    req = execute("acme_contacts", "shared-key", limit=5)
    alice = await wf.ExecuteWorkflow(req, metadata=as_caller("alice"), timeout=10)
    bob = await wf.ExecuteWorkflow(req, metadata=as_caller("bob"), timeout=10)
    anonymous = await wf.ExecuteWorkflow(req, timeout=10)
    assert len({alice.id, bob.id, anonymous.id}) == 3
    alice_again = await wf.ExecuteWorkflow(req, metadata=as_caller("alice"), timeout=10)
    bob_again = await wf.ExecuteWorkflow(req, metadata=as_caller("bob"), timeout=10)
    assert (alice_again.id, bob_again.id) == (alice.id, bob.id)
    assert len(await all_executions(wf)) == 3


async def test_request_id_longer_than_128_characters(wf: Any, expect_error: ExpectError) -> None:
    await expect_error(
        wf.ExecuteWorkflow(execute("acme_contacts", "k" * 129)),
        INVALID,
        "REQUEST_INVALID",
        fields=["request_id"],
    )
    ok = await wf.ExecuteWorkflow(execute("acme_contacts", "k" * 128), timeout=10)
    assert ok.request_id == "k" * 128


async def test_failing_node_fails_the_call_and_records_the_execution(
    wf: Any, expect_error: ExpectError
) -> None:
    meta, _ = await expect_error(
        wf.ExecuteWorkflow(execute("boom", "boom-1", message="kaput"), timeout=10),
        grpc.StatusCode.ABORTED,
        "NODE_FAILED",
    )
    assert meta["node_id"] == "explode" and meta["node_type"] == "TestBoomNode"
    ex = await wf.GetExecution(wpb.GetExecutionRequest(id=meta["execution_id"]))
    assert ex.state == S.STATE_FAILED
    assert ex.error.code == grpc.StatusCode.ABORTED.value[0]
    assert "kaput" in ex.error.message and "Traceback" not in ex.error.message
    assert ex.workflow == "boom" and dict(ex.inputs) == {"message": "kaput"}
    assert ex.HasField("end_time")

    retry_meta, _ = await expect_error(  # a retry answers with the recorded failure
        wf.ExecuteWorkflow(execute("boom", "boom-1", message="kaput"), timeout=10),
        grpc.StatusCode.ABORTED,
        "NODE_FAILED",
    )
    assert retry_meta["execution_id"] == ex.id
    assert [e.id for e in await all_executions(wf)] == [ex.id]


async def test_node_failure_keeps_the_mapped_reason(wf: Any, expect_error: ExpectError) -> None:
    meta, _ = await expect_error(
        wf.ExecuteWorkflow(execute("read_contact", id="no-such-id"), timeout=10),
        grpc.StatusCode.NOT_FOUND,
        "RECORD_NOT_FOUND",
    )
    assert meta["node_id"] == "read" and meta["node_type"] == "ContactReadNode"
    ex = await wf.GetExecution(wpb.GetExecutionRequest(id=meta["execution_id"]))
    assert ex.state == S.STATE_FAILED
    assert ex.error.code == grpc.StatusCode.NOT_FOUND.value[0]


async def test_get_and_cancel_unknown_or_finished_executions(
    wf: Any, expect_error: ExpectError
) -> None:
    await expect_error(
        wf.GetExecution(wpb.GetExecutionRequest(id="no-such-execution")),
        grpc.StatusCode.NOT_FOUND,
        "EXECUTION_NOT_FOUND",
        fields=["id"],
    )
    await expect_error(
        wf.CancelExecution(wpb.CancelExecutionRequest(id="no-such-execution")),
        grpc.StatusCode.NOT_FOUND,
        "EXECUTION_NOT_FOUND",
    )
    done = await wf.ExecuteWorkflow(execute("acme_contacts"), timeout=10)
    meta, _ = await expect_error(
        wf.CancelExecution(wpb.CancelExecutionRequest(id=done.id)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "EXECUTION_ALREADY_FINISHED",
    )
    assert meta["state"] == "SUCCEEDED"
    after = await wf.GetExecution(wpb.GetExecutionRequest(id=done.id))
    assert after.state == S.STATE_SUCCEEDED


async def test_list_executions_filters_and_pages(wf: Any, expect_error: ExpectError) -> None:
    ids: list[str] = []
    for i in range(3):
        ex = await wf.ExecuteWorkflow(
            execute("create_contact", name=f"C{i}", email=f"c{i}@x.io"), timeout=10
        )
        ids.append(ex.id)
    meta, _ = await expect_error(
        wf.ExecuteWorkflow(execute("boom", message="no"), timeout=10),
        grpc.StatusCode.ABORTED,
        "NODE_FAILED",
    )
    failed_id = meta["execution_id"]
    ids.append(failed_id)
    ids.append((await wf.ExecuteWorkflow(execute("acme_contacts"), timeout=10)).id)

    listed = await all_executions(wf)
    assert [e.id for e in listed] == ids[::-1]  # newest first

    created = await all_executions(wf, workflow="create_contact")
    assert sorted(e.id for e in created) == sorted(ids[:3])
    failed = await all_executions(wf, state=S.STATE_FAILED)
    assert [e.id for e in failed] == [failed_id]
    succeeded = await all_executions(wf, state=S.STATE_SUCCEEDED)
    assert len(succeeded) == 4
    assert await all_executions(wf, workflow="boom", state=S.STATE_SUCCEEDED) == []
    assert await all_executions(wf, workflow="nothing_like_this") == []

    paged: list[str] = []
    token = ""
    for _ in range(10):
        resp = await wf.ListExecutions(wpb.ListExecutionsRequest(page_size=2, page_token=token))
        assert len(resp.executions) <= 2
        paged.extend(e.id for e in resp.executions)
        token = resp.next_page_token
        if not token:
            break
    assert paged == ids[::-1]

    first = await wf.ListExecutions(
        wpb.ListExecutionsRequest(workflow="create_contact", page_size=2)
    )
    rest = await wf.ListExecutions(
        wpb.ListExecutionsRequest(
            workflow="create_contact", page_size=2, page_token=first.next_page_token
        )
    )
    assert [e.id for e in (*first.executions, *rest.executions)] == ids[2::-1]
    assert rest.next_page_token == ""

    await expect_error(
        wf.ListExecutions(wpb.ListExecutionsRequest(page_token="garbage!")),
        INVALID,
        "PAGE_TOKEN_INVALID",
        fields=["page_token"],
    )
    await expect_error(
        wf.ListExecutions(wpb.ListExecutionsRequest(page_size=-5)),
        INVALID,
        "REQUEST_INVALID",
        fields=["page_size"],
    )


async def test_a_hundred_concurrent_executions(wf: Any, ms: Any) -> None:
    async def one(i: int) -> Any:
        req = execute("create_contact", name=f"N{i}", email=f"n{i}@x.io", score=i)
        return await wf.ExecuteWorkflow(req, timeout=30)

    async with asyncio.timeout(45):
        results = await asyncio.gather(*(one(i) for i in range(100)))
    assert all(r.state == S.STATE_SUCCEEDED for r in results)
    assert len({r.id for r in results}) == 100
    assert sorted(int(r.outputs["create"]["score"]) for r in results) == list(range(100))
    assert await count_contacts(ms) == 100
    assert len(await all_executions(wf, state=S.STATE_SUCCEEDED)) == 100


async def test_malformed_list_requests(wf: Any, expect_error: ExpectError) -> None:
    for i in range(3):
        await wf.ExecuteWorkflow(
            execute("create_contact", name=f"C{i}", email=f"c{i}@x.io"), timeout=10
        )
    await expect_error(
        wf.ListExecutions(wpb.ListExecutionsRequest(state=99)),  # type: ignore[arg-type]
        INVALID,
        "REQUEST_INVALID",
        fields=["state"],
    )
    page = await wf.ListExecutions(
        wpb.ListExecutionsRequest(workflow="create_contact", page_size=1)
    )
    assert page.next_page_token
    # a token is only valid for the listing that issued it
    for other in (
        wpb.ListExecutionsRequest(page_size=1, page_token=page.next_page_token),
        wpb.ListExecutionsRequest(
            workflow="create_contact",
            state=S.STATE_FAILED,
            page_size=1,
            page_token=page.next_page_token,
        ),
    ):
        await expect_error(
            wf.ListExecutions(other), INVALID, "PAGE_TOKEN_INVALID", fields=["page_token"]
        )


async def test_an_overlong_caller_identity_is_the_callers_mistake(
    wf: Any, ms: Any, expect_error: ExpectError
) -> None:
    long_caller = as_caller("c" * 257)
    await expect_error(
        wf.ExecuteWorkflow(execute("acme_contacts", "k1"), metadata=long_caller, timeout=10),
        INVALID,
        "REQUEST_INVALID",
        fields=["x-nexus-caller"],
    )
    await expect_error(
        wf.ExecuteWorkflow(execute("acme_contacts"), metadata=long_caller, timeout=10),
        INVALID,
        "REQUEST_INVALID",
    )
    await expect_error(
        ms.CreateRecord(
            mpb.CreateRecordRequest(
                model="Contact", record=struct(name="A", email="a@x.io"), request_id="k2"
            ),
            metadata=long_caller,
        ),
        INVALID,
        "REQUEST_INVALID",
    )
    assert await all_executions(wf) == []
    assert await count_contacts(ms) == 0
    ok = await wf.ExecuteWorkflow(
        execute("acme_contacts", "k1"), metadata=as_caller("c" * 256), timeout=10
    )
    assert ok.state == S.STATE_SUCCEEDED


async def test_a_retry_while_running_waits_and_its_deadline_cancels_nothing(
    wf: Any, gates: dict[str, asyncio.Event]
) -> None:
    req = execute("gated", "slow-1", gate="g", value=5)

    async def first_call() -> Any:
        return await wf.ExecuteWorkflow(req, timeout=10)

    first = asyncio.create_task(first_call())
    async with asyncio.timeout(10):
        await gates["g:started"].wait()
    with pytest.raises(grpc.aio.AioRpcError) as impatient:
        await wf.ExecuteWorkflow(req, timeout=0.5)  # a retry that gives up early
    assert impatient.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert not gates["g:cancelled"].is_set()
    (running,) = await all_executions(wf, state=S.STATE_RUNNING)

    async def retry() -> Any:
        return await wf.ExecuteWorkflow(req, timeout=10)

    patient = asyncio.create_task(retry())
    gates["g"].set()
    async with asyncio.timeout(10):
        done, again = await first, await patient
    assert done.id == again.id == running.id
    assert done.state == S.STATE_SUCCEEDED
    assert MessageToDict(done.outputs) == {"wait": {"value": 5}}


async def test_non_json_numbers_in_inputs(wf: Any, expect_error: ExpectError) -> None:
    await expect_error(
        wf.ExecuteWorkflow(
            execute("create_contact", name="A", email="a@x.io", score=float("nan")), timeout=10
        ),
        INVALID,
        "REQUEST_INVALID",
        fields=["inputs.score"],
    )
    assert await all_executions(wf) == []


async def test_concurrent_retries_execute_once(wf: Any, ms: Any) -> None:
    req = execute("create_contact", "burst", name="Ada", email="ada@x.io")

    async def one() -> str:
        return str((await wf.ExecuteWorkflow(req, timeout=10)).id)

    async with asyncio.timeout(20):
        ids = await asyncio.gather(*(one() for _ in range(10)))
    assert len(set(ids)) == 1
    assert await count_contacts(ms) == 1
    assert len(await all_executions(wf)) == 1
