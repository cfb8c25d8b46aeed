"""Workflow discovery and app loading: each file imported once, failures isolated."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from nexus_server._discovery import discover_workflows, load_app_target, module_name_for

WF = """
from workflow import WorkflowBuilder
{var} = WorkflowBuilder()
{var}.add_node("PythonCodeNode", "n", {{"code": "result = {{'x': x}}", "x": "{{{{x}}}}"}})
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.chdir(tmp_path)
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        del sys.modules[name]
    sys.path[:] = [p for p in sys.path if p != str(tmp_path)]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def test_patterns_and_names(project: Path) -> None:
    write(project / "workflows" / "billing.py", WF.format(var="invoice"))
    write(project / "signup_workflow.py", WF.format(var="workflow"))
    write(project / "workflow_report.py", WF.format(var="wf"))
    write(project / "nightly.workflow.py", WF.format(var="workflow"))
    write(project / "unrelated.py", WF.format(var="ignored"))
    report = discover_workflows(project)
    assert sorted(report.workflows) == ["invoice", "nightly", "report", "signup"]
    assert report.errors == {}


def test_failing_file_is_reported_and_others_load(project: Path) -> None:
    write(project / "broken_workflow.py", "raise RuntimeError('boom')\n")
    write(project / "good_workflow.py", WF.format(var="workflow"))
    report = discover_workflows(project)
    assert list(report.workflows) == ["good"]
    ((path, error),) = report.errors.items()
    assert path.name == "broken_workflow.py"
    assert error == "RuntimeError: boom"


def test_each_file_imported_once(project: Path) -> None:
    counter = write(
        project / "counter_workflow.py",
        """
        import builtins
        builtins.nexus_test_imports = getattr(builtins, "nexus_test_imports", 0) + 1
    """,
    )
    import builtins

    discover_workflows(project)
    discover_workflows(project)
    assert builtins.nexus_test_imports == 1  # type: ignore[attr-defined]
    del builtins.nexus_test_imports  # type: ignore[attr-defined]
    assert counter.exists()


def test_discovered_file_importing_the_app_gets_the_loaded_module(project: Path) -> None:
    write(
        project / "app.py",
        """
        import builtins
        builtins.nexus_app_runs = getattr(builtins, "nexus_app_runs", 0) + 1
        app = object()
    """,
    )
    write(
        project / "contact_workflow.py",
        """
        from app import app
        from workflow import WorkflowBuilder
        assert app is not None
    """,
    )
    import builtins

    app = load_app_target("app.py", project)
    report = discover_workflows(project)
    assert report.errors == {}
    assert sys.modules["app"].app is app
    assert builtins.nexus_app_runs == 1  # type: ignore[attr-defined]
    del builtins.nexus_app_runs  # type: ignore[attr-defined]


def test_load_app_target_forms(project: Path) -> None:
    write(project / "pkg" / "__init__.py", "")
    write(project / "pkg" / "server.py", "app = 'the app'\nother = 'other'\n")
    assert load_app_target("pkg.server:other", project) == "other"
    assert load_app_target("pkg/server.py", project) == "the app"
    with pytest.raises(FileNotFoundError, match=r"missing\.py"):
        load_app_target("missing.py", project)
    with pytest.raises(AttributeError, match="nope"):
        load_app_target("pkg.server:nope", project)


def test_module_names(tmp_path: Path) -> None:
    assert module_name_for(tmp_path / "a" / "b.py", tmp_path) == "a.b"
    assert module_name_for(tmp_path / "x.workflow.py", tmp_path).startswith("_nexus_discovered_")
