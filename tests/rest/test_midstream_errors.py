"""An error after a stream has started (the HTTP status is sent already) reaches a REST
client as the `grpc-status` / `grpc-message` trailers of the Server-Sent Events stream.

Our servicers end a failed execution with a terminal event, not a failed call, so the
stream here comes from a small stand-in WorkflowService that fails after one event,
behind the same Envoy configuration `nexus serve` uses."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import grpc
import h11

from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as w
from nexus_api.nexus.workflow.v1 import workflow_service_pb2_grpc as wg
from nexus_server import Serving
from nexus_server._envoy import (
    EnvoyOptions,
    EnvoySupervisor,
    merged_descriptor_set,
    transcoded_services,
)

WAIT = 15.0


class _FailsMidStream(wg.WorkflowServiceServicer):
    async def StreamExecution(
        self, request: w.StreamExecutionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[w.ExecutionEvent]:
        yield w.ExecutionEvent(execution_id="e1", sequence=1)
        await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is stopping")


def _sse_with_trailers(port: int) -> tuple[int, list[Any], dict[str, str]]:
    """POST the stream route over HTTP/1.1; the events and the trailers."""
    conn = h11.Connection(h11.CLIENT)
    body = json.dumps({"inputs": {}}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        request = h11.Request(
            method="POST",
            target="/v1/workflows/anything:stream",
            headers=[
                ("host", f"127.0.0.1:{port}"),
                ("content-type", "application/json"),
                ("content-length", str(len(body))),
                ("te", "trailers"),
            ],
        )
        sock.sendall(conn.send(request) + conn.send(h11.Data(data=body)))
        sock.sendall(conn.send(h11.EndOfMessage()))
        status = 0
        data = b""
        trailers: dict[str, str] = {}
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(sock.recv(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                data += event.data
            elif isinstance(event, h11.EndOfMessage):
                trailers = {k.decode(): v.decode() for k, v in event.headers}
                break
    events = [
        json.loads(line.removeprefix(b"data: "))
        for line in data.splitlines()
        if line.startswith(b"data: ")
    ]
    return status, events, trailers


def test_a_mid_stream_error_arrives_as_trailers(serving: Serving) -> None:
    async def run() -> tuple[int, list[Any], dict[str, str]]:
        server = grpc.aio.server()
        wg.add_WorkflowServiceServicer_to_server(_FailsMidStream(), server)  # type: ignore[no-untyped-call]
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        sup = EnvoySupervisor(
            merged_descriptor_set(serving.typed),
            EnvoyOptions(grpc_port=port, api_port=0, services=transcoded_services(serving.typed)),
            ready_timeout=WAIT,
        )
        try:
            await sup.start()
            assert sup.api_port is not None
            return await asyncio.to_thread(_sse_with_trailers, sup.api_port)
        finally:
            await sup.stop()
            await server.stop(0)

    status, events, trailers = asyncio.run(run())
    assert status == 200
    assert [(e["execution_id"], e["sequence"]) for e in events] == [("e1", "1")]
    assert trailers.get("grpc-status") == str(grpc.StatusCode.UNAVAILABLE.value[0])
    assert trailers.get("grpc-message") == "the server is stopping"
