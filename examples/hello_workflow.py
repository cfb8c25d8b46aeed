"""A two-node workflow run with the synchronous runtime, no server involved.

It greets a name, then shouts the greeting, printing each node's progress as it goes:

    .venv/bin/python examples/hello_workflow.py ada     # or: python examples/hello_workflow.py

(`make run` serves `examples/contacts_app.py` instead: the server, for the CLI and REST.)
"""

from __future__ import annotations

import sys

from workflow import Event, EventKind, LocalRuntime, Workflow, WorkflowBuilder


def build() -> Workflow:
    wf = WorkflowBuilder("Greet someone, loudly.")
    wf.add_input("name", str, default="world", description="who to greet")
    wf.add_node(
        "PythonCodeNode", "greet", {"code": "result = {'text': 'hi ' + name}", "name": "{{name}}"}
    )
    wf.add_node("PythonCodeNode", "shout", {"code": "result = {'text': text.upper()}"})
    wf.add_connection("greet", "text", "shout", "text")
    return wf.build()


def show(event: Event) -> None:
    if event.kind is EventKind.NODE_COMPLETED:
        micros = (event.duration or 0.0) * 1e6
        print(f"  {event.node_id:<6} done in {micros:.0f} us -> {dict(event.outputs or {})}")


def main(argv: list[str]) -> int:
    workflow = build()
    name = argv[1] if len(argv) > 1 else "ada"
    print(f"inputs: {', '.join(f'{i.name}: {i.type_name}' for i in workflow.inputs.values())}")
    with LocalRuntime() as runtime:
        results, run_id = runtime.execute(workflow, {"name": name}, on_event=show)
    print(f"execution {run_id}: {results['shout']['text']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
