import datetime

from google.api import annotations_pb2 as _annotations_pb2
from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import empty_pb2 as _empty_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.rpc import status_pb2 as _status_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Workflow(_message.Message):
    __slots__ = ("name", "description", "atomic", "inputs", "outputs", "definition", "builtin", "update_time", "owner")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    ATOMIC_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    DEFINITION_FIELD_NUMBER: _ClassVar[int]
    BUILTIN_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    atomic: bool
    inputs: _containers.RepeatedCompositeFieldContainer[WorkflowInput]
    outputs: _containers.RepeatedCompositeFieldContainer[WorkflowOutput]
    definition: WorkflowDefinition
    builtin: bool
    update_time: _timestamp_pb2.Timestamp
    owner: str
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., atomic: _Optional[bool] = ..., inputs: _Optional[_Iterable[_Union[WorkflowInput, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[WorkflowOutput, _Mapping]]] = ..., definition: _Optional[_Union[WorkflowDefinition, _Mapping]] = ..., builtin: _Optional[bool] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., owner: _Optional[str] = ...) -> None: ...

class WorkflowInput(_message.Message):
    __slots__ = ("name", "type", "required", "default", "description", "targets")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    required: bool
    default: _struct_pb2.Value
    description: str
    targets: _containers.RepeatedCompositeFieldContainer[ParameterRef]
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., required: _Optional[bool] = ..., default: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., description: _Optional[str] = ..., targets: _Optional[_Iterable[_Union[ParameterRef, _Mapping]]] = ...) -> None: ...

class ParameterRef(_message.Message):
    __slots__ = ("node_id", "param")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    PARAM_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    param: str
    def __init__(self, node_id: _Optional[str] = ..., param: _Optional[str] = ...) -> None: ...

class WorkflowOutput(_message.Message):
    __slots__ = ("node_id", "name", "type", "description")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    name: str
    type: str
    description: str
    def __init__(self, node_id: _Optional[str] = ..., name: _Optional[str] = ..., type: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class WorkflowDefinition(_message.Message):
    __slots__ = ("description", "atomic", "nodes", "connections", "inputs")
    class Node(_message.Message):
        __slots__ = ("id", "type", "params")
        ID_FIELD_NUMBER: _ClassVar[int]
        TYPE_FIELD_NUMBER: _ClassVar[int]
        PARAMS_FIELD_NUMBER: _ClassVar[int]
        id: str
        type: str
        params: _struct_pb2.Struct
        def __init__(self, id: _Optional[str] = ..., type: _Optional[str] = ..., params: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...
    class Connection(_message.Message):
        __slots__ = ("source", "output", "target", "input")
        SOURCE_FIELD_NUMBER: _ClassVar[int]
        OUTPUT_FIELD_NUMBER: _ClassVar[int]
        TARGET_FIELD_NUMBER: _ClassVar[int]
        INPUT_FIELD_NUMBER: _ClassVar[int]
        source: str
        output: str
        target: str
        input: str
        def __init__(self, source: _Optional[str] = ..., output: _Optional[str] = ..., target: _Optional[str] = ..., input: _Optional[str] = ...) -> None: ...
    class Input(_message.Message):
        __slots__ = ("name", "type", "required", "description", "default")
        NAME_FIELD_NUMBER: _ClassVar[int]
        TYPE_FIELD_NUMBER: _ClassVar[int]
        REQUIRED_FIELD_NUMBER: _ClassVar[int]
        DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
        DEFAULT_FIELD_NUMBER: _ClassVar[int]
        name: str
        type: str
        required: bool
        description: str
        default: _struct_pb2.Value
        def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., required: _Optional[bool] = ..., description: _Optional[str] = ..., default: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ...) -> None: ...
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    ATOMIC_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    description: str
    atomic: bool
    nodes: _containers.RepeatedCompositeFieldContainer[WorkflowDefinition.Node]
    connections: _containers.RepeatedCompositeFieldContainer[WorkflowDefinition.Connection]
    inputs: _containers.RepeatedCompositeFieldContainer[WorkflowDefinition.Input]
    def __init__(self, description: _Optional[str] = ..., atomic: _Optional[bool] = ..., nodes: _Optional[_Iterable[_Union[WorkflowDefinition.Node, _Mapping]]] = ..., connections: _Optional[_Iterable[_Union[WorkflowDefinition.Connection, _Mapping]]] = ..., inputs: _Optional[_Iterable[_Union[WorkflowDefinition.Input, _Mapping]]] = ...) -> None: ...

class Execution(_message.Message):
    __slots__ = ("id", "workflow", "state", "inputs", "outputs", "error", "request_id", "create_time", "start_time", "end_time", "duration", "owner")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[Execution.State]
        STATE_PENDING: _ClassVar[Execution.State]
        STATE_RUNNING: _ClassVar[Execution.State]
        STATE_SUCCEEDED: _ClassVar[Execution.State]
        STATE_FAILED: _ClassVar[Execution.State]
        STATE_CANCELLED: _ClassVar[Execution.State]
        STATE_INTERRUPTED: _ClassVar[Execution.State]
        STATE_QUEUED: _ClassVar[Execution.State]
    STATE_UNSPECIFIED: Execution.State
    STATE_PENDING: Execution.State
    STATE_RUNNING: Execution.State
    STATE_SUCCEEDED: Execution.State
    STATE_FAILED: Execution.State
    STATE_CANCELLED: Execution.State
    STATE_INTERRUPTED: Execution.State
    STATE_QUEUED: Execution.State
    ID_FIELD_NUMBER: _ClassVar[int]
    WORKFLOW_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    DURATION_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    id: str
    workflow: str
    state: Execution.State
    inputs: _struct_pb2.Struct
    outputs: _struct_pb2.Struct
    error: _status_pb2.Status
    request_id: str
    create_time: _timestamp_pb2.Timestamp
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    duration: _duration_pb2.Duration
    owner: str
    def __init__(self, id: _Optional[str] = ..., workflow: _Optional[str] = ..., state: _Optional[_Union[Execution.State, str]] = ..., inputs: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., outputs: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., request_id: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., owner: _Optional[str] = ...) -> None: ...

class ExecutionEvent(_message.Message):
    __slots__ = ("execution_id", "sequence", "time", "execution_started", "node_started", "node_completed", "node_failed", "execution_completed", "execution_failed", "execution_cancelled")
    EXECUTION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_STARTED_FIELD_NUMBER: _ClassVar[int]
    NODE_STARTED_FIELD_NUMBER: _ClassVar[int]
    NODE_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    NODE_FAILED_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_FAILED_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_CANCELLED_FIELD_NUMBER: _ClassVar[int]
    execution_id: str
    sequence: int
    time: _timestamp_pb2.Timestamp
    execution_started: ExecutionStarted
    node_started: NodeStarted
    node_completed: NodeCompleted
    node_failed: NodeFailed
    execution_completed: ExecutionFinished
    execution_failed: ExecutionFinished
    execution_cancelled: ExecutionFinished
    def __init__(self, execution_id: _Optional[str] = ..., sequence: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., execution_started: _Optional[_Union[ExecutionStarted, _Mapping]] = ..., node_started: _Optional[_Union[NodeStarted, _Mapping]] = ..., node_completed: _Optional[_Union[NodeCompleted, _Mapping]] = ..., node_failed: _Optional[_Union[NodeFailed, _Mapping]] = ..., execution_completed: _Optional[_Union[ExecutionFinished, _Mapping]] = ..., execution_failed: _Optional[_Union[ExecutionFinished, _Mapping]] = ..., execution_cancelled: _Optional[_Union[ExecutionFinished, _Mapping]] = ...) -> None: ...

class ExecutionStarted(_message.Message):
    __slots__ = ("workflow", "inputs")
    WORKFLOW_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    workflow: str
    inputs: _struct_pb2.Struct
    def __init__(self, workflow: _Optional[str] = ..., inputs: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class NodeStarted(_message.Message):
    __slots__ = ("node_id", "node_type")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_TYPE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    node_type: str
    def __init__(self, node_id: _Optional[str] = ..., node_type: _Optional[str] = ...) -> None: ...

class NodeCompleted(_message.Message):
    __slots__ = ("node_id", "node_type", "outputs", "duration")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_TYPE_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    DURATION_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    node_type: str
    outputs: _struct_pb2.Struct
    duration: _duration_pb2.Duration
    def __init__(self, node_id: _Optional[str] = ..., node_type: _Optional[str] = ..., outputs: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class NodeFailed(_message.Message):
    __slots__ = ("node_id", "node_type", "error", "duration")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_TYPE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    DURATION_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    node_type: str
    error: _status_pb2.Status
    duration: _duration_pb2.Duration
    def __init__(self, node_id: _Optional[str] = ..., node_type: _Optional[str] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class ExecutionFinished(_message.Message):
    __slots__ = ("execution",)
    EXECUTION_FIELD_NUMBER: _ClassVar[int]
    execution: Execution
    def __init__(self, execution: _Optional[_Union[Execution, _Mapping]] = ...) -> None: ...

class ListWorkflowsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListWorkflowsResponse(_message.Message):
    __slots__ = ("workflows", "next_page_token")
    WORKFLOWS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    workflows: _containers.RepeatedCompositeFieldContainer[Workflow]
    next_page_token: str
    def __init__(self, workflows: _Optional[_Iterable[_Union[Workflow, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetWorkflowRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class RegisterWorkflowRequest(_message.Message):
    __slots__ = ("name", "definition", "replace", "validate_only")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEFINITION_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    VALIDATE_ONLY_FIELD_NUMBER: _ClassVar[int]
    name: str
    definition: WorkflowDefinition
    replace: bool
    validate_only: bool
    def __init__(self, name: _Optional[str] = ..., definition: _Optional[_Union[WorkflowDefinition, _Mapping]] = ..., replace: _Optional[bool] = ..., validate_only: _Optional[bool] = ...) -> None: ...

class DeleteWorkflowRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ExecuteWorkflowRequest(_message.Message):
    __slots__ = ("name", "inputs", "request_id", "mode")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    name: str
    inputs: _struct_pb2.Struct
    request_id: str
    mode: str
    def __init__(self, name: _Optional[str] = ..., inputs: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., request_id: _Optional[str] = ..., mode: _Optional[str] = ...) -> None: ...

class StartExecutionRequest(_message.Message):
    __slots__ = ("name", "inputs", "request_id")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    inputs: _struct_pb2.Struct
    request_id: str
    def __init__(self, name: _Optional[str] = ..., inputs: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class StreamExecutionRequest(_message.Message):
    __slots__ = ("name", "inputs", "request_id")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    inputs: _struct_pb2.Struct
    request_id: str
    def __init__(self, name: _Optional[str] = ..., inputs: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class WatchExecutionRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class GetExecutionRequest(_message.Message):
    __slots__ = ("id", "workflow")
    ID_FIELD_NUMBER: _ClassVar[int]
    WORKFLOW_FIELD_NUMBER: _ClassVar[int]
    id: str
    workflow: str
    def __init__(self, id: _Optional[str] = ..., workflow: _Optional[str] = ...) -> None: ...

class ListExecutionsRequest(_message.Message):
    __slots__ = ("workflow", "state", "page_size", "page_token")
    WORKFLOW_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    workflow: str
    state: Execution.State
    page_size: int
    page_token: str
    def __init__(self, workflow: _Optional[str] = ..., state: _Optional[_Union[Execution.State, str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListExecutionsResponse(_message.Message):
    __slots__ = ("executions", "next_page_token")
    EXECUTIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    executions: _containers.RepeatedCompositeFieldContainer[Execution]
    next_page_token: str
    def __init__(self, executions: _Optional[_Iterable[_Union[Execution, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelExecutionRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...
