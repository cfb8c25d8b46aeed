"""Every service is registered through generic handlers only: grpcio's asyncio server
charges every incoming call for each registered method (see `GenericHandlersOnly`), so
the server registers none, and every service still answers."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as wpb
from nexus_api.nexus.workflow.v1 import workflow_service_pb2_grpc as wgrpc
from nexus_server import Nexus, Serving

Connect = Callable[[Serving], contextlib.AbstractAsyncContextManager[grpc.aio.Channel]]


async def test_the_server_registers_no_method_and_every_service_answers(
    make_app: Callable[..., Nexus], connect: Connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    registered: list[str] = []
    generic: list[Any] = []
    server_type = type(grpc.aio.server())
    add_registered = server_type.add_registered_method_handlers
    add_generic = server_type.add_generic_rpc_handlers

    def record_registered(self: Any, service: str, handlers: Any) -> None:
        registered.append(service)
        add_registered(self, service, handlers)

    def record_generic(self: Any, handlers: Any) -> None:
        generic.extend(handlers)
        add_generic(self, handlers)

    monkeypatch.setattr(server_type, "add_registered_method_handlers", record_registered)
    monkeypatch.setattr(server_type, "add_generic_rpc_handlers", record_generic)

    async with make_app().serving() as serving, connect(serving) as channel:
        assert registered == []
        # one generic handler per static service, plus the typed services' handler
        assert len(generic) >= 5
        health = health_pb2_grpc.HealthStub(channel)
        check = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        wf = wgrpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
        listed = await wf.ListWorkflows(wpb.ListWorkflowsRequest())
        assert "create_contact" in [w.name for w in listed.workflows]
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)  # type: ignore[no-untyped-call]
        call = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = [s.name async for r in call for s in r.list_services_response.service]
        assert "nexus.workflow.v1.WorkflowService" in names
        assert any(n.endswith(".ContactService") for n in names)  # a typed service
