"""The standard health service (SERVING per service, NOT_SERVING while the database is
unreachable) and auto-discovery at startup, reproducing the original hang: a discovered
`contact_workflow.py` that declares DataFlow models and imports the app module."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy.engine import make_url

from nexus_api.nexus.model.v1 import model_service_pb2 as mpb
from nexus_api.nexus.model.v1 import model_service_pb2_grpc as mgrpc
from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as wpb
from nexus_api.nexus.workflow.v1 import workflow_service_pb2_grpc as wgrpc
from nexus_server import Nexus, Serving
from nexus_server._discovery import load_app_target

ExpectError = Callable[..., Awaitable[tuple[dict[str, str], list[tuple[str, str]]]]]
Connect = Callable[[Serving], contextlib.AbstractAsyncContextManager[grpc.aio.Channel]]
HC = health_pb2.HealthCheckResponse
WAIT = 10.0


async def health_of(channel: grpc.aio.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(resp.status)


async def wait_health(channel: grpc.aio.Channel, status: int, service: str = "") -> None:
    """Poll until the health of `service` is `status` (bounded)."""
    async with asyncio.timeout(WAIT):
        while True:
            if await health_of(channel, service) == status:
                return
            await asyncio.sleep(0.02)


async def test_health_serving_for_every_service(
    serving: Serving, channel: grpc.aio.Channel
) -> None:
    assert await health_of(channel) == HC.SERVING
    assert "nexus.models.v1.ContactService" in serving.services
    for name in serving.services:
        assert await health_of(channel, name) == HC.SERVING, name
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await health_of(channel, "no.such.Service")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


class TcpProxy:
    """A TCP proxy to PostgreSQL that the test can cut and restore: a real outage
    between the server and its database, without touching the database itself."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.close()
        self.writers.clear()
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self.writers += [writer, up_writer]
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        dst.close()


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_health_not_serving_while_the_database_is_unreachable(
    db_url: str, make_app: Callable[..., Nexus], connect: Connect, expect_error: ExpectError
) -> None:
    record = struct_pb2.Struct()
    record.update({"name": "Ada", "email": "ada@x.io"})
    url = make_url(db_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    await proxy.start()
    proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    app = make_app(url=proxied, health_check_interval=0.05)
    try:
        async with app.serving() as s, connect(s) as channel:
            assert await health_of(channel) == HC.SERVING
            await proxy.stop()
            await wait_health(channel, HC.NOT_SERVING)
            assert await health_of(channel, "nexus.workflow.v1.WorkflowService") == (HC.NOT_SERVING)
            # calls fail as the database's unavailability, not as internal errors
            ms = mgrpc.ModelServiceStub(channel)  # type: ignore[no-untyped-call]
            wf = wgrpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
            for call in (
                ms.CountRecords(mpb.CountRecordsRequest(model="Contact"), timeout=WAIT),
                ms.CreateRecord(
                    mpb.CreateRecordRequest(model="Contact", record=record), timeout=WAIT
                ),
                wf.ExecuteWorkflow(wpb.ExecuteWorkflowRequest(name="acme_contacts"), timeout=WAIT),
                wf.GetExecution(wpb.GetExecutionRequest(id="any"), timeout=WAIT),
            ):
                await expect_error(call, grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE")
            await proxy.start()  # the same port again
            await wait_health(channel, HC.SERVING)
            resp = await ms.CountRecords(mpb.CountRecordsRequest(model="Contact"), timeout=WAIT)
            assert resp.count == 0
    finally:
        await proxy.stop()


APP_PY = """
import builtins
from pathlib import Path

from dataflow import DataFlow
from nexus_server import Nexus

builtins.nexus_discovery_app_runs = getattr(builtins, "nexus_discovery_app_runs", 0) + 1
HERE = Path(__file__).parent

app = Nexus(grpc_port=0, auto_discovery=True, discovery_root=HERE, grace_period=1)
db = DataFlow(f"sqlite:///{HERE / 'app.db'}")


@db.model
class Contact:
    id: str
    name: str
    email: str


app.integrate_dataflow(db)
"""

# the shape that hung the original: models declared in a discovered file that imports
# the app module (which the server has already loaded under its own name)
CONTACT_WORKFLOW_PY = """
from app import app, db
from workflow import WorkflowBuilder


@db.model
class Note:
    id: str
    text: str


workflow = WorkflowBuilder("Create a contact (discovered).")
workflow.add_node("ContactCreateNode", "create", {"name": "{{name}}", "email": "{{email}}"})
"""

NOTE_WORKFLOW_PY = """
from workflow import WorkflowBuilder

wf = WorkflowBuilder("Write a note (discovered).")
wf.add_node("NoteCreateNode", "write", {"text": "{{text}}"})
"""


@pytest.fixture
def project(tmp_path: Path) -> Iterator[Path]:
    """A working directory with an app and its workflow files; the modules it imports are
    forgotten afterwards."""
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        del sys.modules[name]
    sys.path[:] = [p for p in sys.path if p != str(tmp_path)]
    if hasattr(builtins, "nexus_discovery_app_runs"):
        del builtins.nexus_discovery_app_runs


@contextlib.asynccontextmanager
async def started(app: Nexus) -> AsyncIterator[Serving]:
    """Serve `app`, asserting that startup completes within a generous bound, and close
    its DataFlow afterwards (it registered node types)."""
    try:
        cm = app.serving()
        async with asyncio.timeout(WAIT):
            info = await cm.__aenter__()
        try:
            yield info
        finally:
            async with asyncio.timeout(WAIT):
                await cm.__aexit__(None, None, None)
    finally:
        if app.db is not None:
            await app.db.close()


async def test_discovery_of_a_file_that_imports_the_app(
    project: Path, connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    (project / "app.py").write_text(textwrap.dedent(APP_PY))
    (project / "contact_workflow.py").write_text(textwrap.dedent(CONTACT_WORKFLOW_PY))
    (project / "workflows").mkdir()
    (project / "workflows" / "notes.py").write_text(textwrap.dedent(NOTE_WORKFLOW_PY))
    (project / "broken_workflow.py").write_text("import no_such_module_here\n")

    app = load_app_target("app.py", project)
    assert isinstance(app, Nexus)
    caplog.set_level(logging.ERROR, logger="nexus_server")
    async with started(app) as s, connect(s) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        resp = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert resp.status == HC.SERVING
        assert s.startup_seconds < WAIT

        assert builtins.nexus_discovery_app_runs == 1  # type: ignore[attr-defined]
        wf = wgrpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
        listed = await wf.ListWorkflows(wpb.ListWorkflowsRequest(), timeout=5)
        assert [w.name for w in listed.workflows] == ["contact", "notes"]
        inputs = struct_pb2.Struct()
        inputs.update({"name": "Ada", "email": "ada@x.io"})
        ex = await wf.ExecuteWorkflow(
            wpb.ExecuteWorkflowRequest(name="contact", inputs=inputs), timeout=WAIT
        )
        assert ex.outputs["create"]["name"] == "Ada"
        ms = mgrpc.ModelServiceStub(channel)  # type: ignore[no-untyped-call]
        models = await ms.ListModels(mpb.ListModelsRequest(), timeout=5)
        assert [m.name for m in models.models] == ["Contact", "Note"]

    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    broken = [m for m in errors if "broken_workflow.py" in m]
    assert len(broken) == 1, errors
    assert str(project / "broken_workflow.py") in broken[0]
    assert "no_such_module_here" in broken[0]
