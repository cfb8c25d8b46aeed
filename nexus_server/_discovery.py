"""Loading the user's app module and discovering workflow files.

The seed system hung at startup because discovery imported files that imported the app
module again under another name, re-running its model registration. Here every file is
imported at most once per process, by its resolved path, and the app module is loaded
under its importable name and put in `sys.modules` before it runs, so a discovered file
that does `from app import app` gets the module already loaded instead of a second copy.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from workflow import Workflow, WorkflowBuilder

__all__ = ["DiscoveryReport", "discover_workflows", "load_app_target", "module_name_for"]

_PATTERNS = ("workflows/*.py", "*_workflow.py", "workflow_*.py", "*.workflow.py")
_SKIP_DIRS = {".venv", "venv", "node_modules", "site-packages", "__pycache__", ".git"}
_IMPORTED: dict[Path, ModuleType] = {}


@dataclass
class DiscoveryReport:
    """What discovery found: workflows by name, and files that failed to import."""

    workflows: dict[str, Workflow] = field(default_factory=dict)
    errors: dict[Path, str] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)


def module_name_for(path: Path, root: Path) -> str:
    """The name `path` is importable as from `root` (`pkg/mod.py` -> `pkg.mod`), or a
    private name for files that are not importable (`a.workflow.py`)."""
    rel = path.resolve().relative_to(root.resolve()).with_suffix("")
    parts = list(rel.parts)
    if all(p.isidentifier() for p in parts):
        return ".".join(parts)
    return "_nexus_discovered_" + re.sub(r"\W", "_", "_".join(parts))


def _import_path(path: Path, root: Path) -> ModuleType:
    resolved = path.resolve()
    cached = _IMPORTED.get(resolved)
    if cached is not None:
        return cached
    name = module_name_for(resolved, root)
    existing = sys.modules.get(name)
    existing_file = getattr(existing, "__file__", None)
    if existing is not None and existing_file and Path(existing_file).resolve() == resolved:
        _IMPORTED[resolved] = existing
        return existing
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    _IMPORTED[resolved] = module
    return module


def _package_root(path: Path) -> Path:
    """The folder `path` imports from: its own, or, when it sits in a package (a folder
    with `__init__.py`), the folder above the outermost one, so that it is imported as
    `pkg.mod` and its relative imports (`from .models import ...`) work."""
    top = path.parent
    while (top / "__init__.py").is_file() and top.parent != top:
        top = top.parent
    return top


def load_app_target(target: str, root: Path | None = None) -> Any:
    """The object `nexus serve TARGET` names: `path/to/app.py` (its `app` attribute, or
    the only `Nexus` in it; a file in a package is imported as a module of it) or
    `module:attr`."""
    root = (root or Path.cwd()).resolve()
    attr: str | None = None
    if target.endswith(".py") or "/" in target:
        path_text, _, attr_part = target.partition(":")
        path = (root / path_text).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"app file not found: {path}")
        top = _package_root(path)
        if str(top) not in sys.path:
            sys.path.insert(0, str(top))
        module = _import_path(path, top)
        attr = attr_part or None
    else:
        mod_name, _, attr_part = target.partition(":")
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        module = importlib.import_module(mod_name)
        attr = attr_part or None
    if attr:
        try:
            return getattr(module, attr)
        except AttributeError:
            raise AttributeError(f"{module.__name__} has no attribute {attr!r}") from None
    if hasattr(module, "app"):
        return module.app
    raise AttributeError(f"{module.__name__} has no `app`; name it as MODULE:ATTR")


def _candidates(root: Path) -> Iterator[Path]:
    seen: set[Path] = set()
    for pattern in _PATTERNS:
        for path in sorted(root.glob(pattern)):
            if any(part in _SKIP_DIRS for part in path.parts) or path.name == "__init__.py":
                continue
            if path.resolve() not in seen:
                seen.add(path.resolve())
                yield path


def _workflow_name(var: str, path: Path) -> str:
    if var not in ("workflow", "wf"):
        return var
    stem = path.name.removesuffix(".py").removesuffix(".workflow")
    return re.sub(r"^workflow_|_workflow$", "", stem)


def discover_workflows(root: Path | None = None) -> DiscoveryReport:
    """Import each workflow file under `root` once and collect its module-level
    `Workflow`s (and `WorkflowBuilder`s, built). A file that fails to import is reported
    with its path and error; the others are still loaded."""
    root = (root or Path.cwd()).resolve()
    report = DiscoveryReport()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    found: list[tuple[Path, dict[str, Workflow | WorkflowBuilder]]] = []
    for path in _candidates(root):
        report.files.append(path)
        try:
            module = _import_path(path, root)
        except Exception as exc:
            report.errors[path] = f"{type(exc).__name__}: {exc}"
            continue
        found.append(
            (
                path,
                {
                    _workflow_name(var, path): value
                    for var, value in list(vars(module).items())
                    if not var.startswith("_") and isinstance(value, Workflow | WorkflowBuilder)
                },
            )
        )
    # builders are built once every file is imported: a workflow may use the node types
    # of models that a file discovered after it declares
    for path, items in found:
        try:
            built = {
                name: value.build() if isinstance(value, WorkflowBuilder) else value
                for name, value in items.items()
            }
        except Exception as exc:
            report.errors[path] = f"{type(exc).__name__}: {exc}"
            continue
        report.workflows.update(built)
    return report
