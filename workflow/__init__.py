"""The Nexus workflow engine: typed nodes, validated graphs and an async runtime.

```python
from workflow import WorkflowBuilder, LocalRuntime

wf = WorkflowBuilder()
wf.add_node("PythonCodeNode", "greet", {"code": "result = {'text': 'hi ' + name}",
                                         "name": "{{name}}"})
results, run_id = LocalRuntime().execute(wf.build(), parameters={"name": "ada"})
```
"""

from __future__ import annotations

from ._builder import Connection, Workflow, WorkflowBuilder, WorkflowInput, WorkflowOutput
from ._errors import (
    ExecutionCancelledError,
    ExecutionTimeoutError,
    InputError,
    InvalidInputsError,
    NodeExecutionError,
    Problem,
    RegistryError,
    WorkflowError,
    WorkflowValidationError,
)
from ._node import (
    MISSING,
    Node,
    NodeConfigError,
    Output,
    Param,
    get_node_class,
    node_types,
    register_node,
    unregister_node,
)
from ._python_code import PythonCodeNode
from ._runtime import (
    AsyncLocalRuntime,
    Event,
    EventKind,
    ExecutionContext,
    LocalRuntime,
    NodeHook,
    current_execution,
)
from ._suggest import closest, did_you_mean
from ._types import type_from_name, type_name

__all__ = [
    "MISSING",
    "AsyncLocalRuntime",
    "Connection",
    "Event",
    "EventKind",
    "ExecutionCancelledError",
    "ExecutionContext",
    "ExecutionTimeoutError",
    "InputError",
    "InvalidInputsError",
    "LocalRuntime",
    "Node",
    "NodeConfigError",
    "NodeExecutionError",
    "NodeHook",
    "Output",
    "Param",
    "Problem",
    "PythonCodeNode",
    "RegistryError",
    "Workflow",
    "WorkflowBuilder",
    "WorkflowError",
    "WorkflowInput",
    "WorkflowOutput",
    "WorkflowValidationError",
    "closest",
    "current_execution",
    "did_you_mean",
    "get_node_class",
    "node_types",
    "register_node",
    "type_from_name",
    "type_name",
    "unregister_node",
]
