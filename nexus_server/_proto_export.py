"""`nexus proto export`: the contracts of a served app as `.proto` files and a
descriptor set, for other languages, Envoy and the CLI.

The static contracts ship with the stubs (`nexus_api/proto/`); the per-model file is
made from the app's models (see `_typed.py`) and printed here as proto3 source, with the
model docstrings and field descriptions as comments.

Every exported file of ours carries the file options code generators want, as googleapis
sets them (`language_options`): `go_package`, `java_package`, `java_multiple_files`,
`java_outer_classname`, `csharp_namespace`, `php_namespace`, `ruby_package` and
`objc_class_prefix`. They are added here, not in `proto/`: buf breaking counts a changed
file option as a breaking change, and these are options of the export (the Go module
path), not of the contract. The google/* files keep their own.
"""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor_pb2 import FieldDescriptorProto as F

from nexus_api import descriptor_set_bytes

from ._typed import FILE_NAME, TypedModels

__all__ = [
    "DESCRIPTOR_SET_FILE",
    "GO_MODULE",
    "export_protos",
    "language_options",
    "render_models_proto",
]

DESCRIPTOR_SET_FILE = "nexus.binpb"
#: The Go import path prefix of the exported files: `nexus/workflow/v1/*.proto` is the
#: Go package `nexus.local/api/nexus/workflow/v1` (`--go-module` changes it).
GO_MODULE = "nexus.local/api"
#: The order protoc prints file options in (FileOptions field numbers).
_OPTION_ORDER = (
    "java_package",
    "java_outer_classname",
    "java_multiple_files",
    "go_package",
    "objc_class_prefix",
    "csharp_namespace",
    "php_namespace",
    "ruby_package",
)

_SCALARS = {
    F.TYPE_STRING: "string",
    F.TYPE_INT64: "int64",
    F.TYPE_INT32: "int32",
    F.TYPE_DOUBLE: "double",
    F.TYPE_BOOL: "bool",
    F.TYPE_BYTES: "bytes",
}
_VERBS = ("get", "put", "post", "delete", "patch")


def _field_type(f: descriptor_pb2.FieldDescriptorProto, package: str) -> str:
    if f.type == F.TYPE_MESSAGE:
        name = f.type_name.lstrip(".")
        return name.removeprefix(package + ".")
    return _SCALARS[f.type]


def _rule_text(rule: object, indent: str) -> list[str]:
    lines: list[str] = []
    for verb in _VERBS:
        path = getattr(rule, verb)
        if path:
            lines.append(f'{indent}{verb}: "{path}"')
    body = getattr(rule, "body", "")
    if body:
        lines.append(f'{indent}body: "{body}"')
    for extra in getattr(rule, "additional_bindings", ()):
        lines.append(f"{indent}additional_bindings {{")
        lines.extend(_rule_text(extra, indent + "  "))
        lines.append(f"{indent}}}")
    return lines


def language_options(
    fdp: descriptor_pb2.FileDescriptorProto, go_module: str = GO_MODULE
) -> descriptor_pb2.FileOptions:
    """The code-generation options of one of our files, after googleapis' conventions:
    `nexus.workflow.v1` in `nexus/workflow/v1/workflow_service.proto` is Go package
    `<go_module>/nexus/workflow/v1;workflowv1`, Java `io.nexus.workflow.v1` (one class
    per message, outer class `WorkflowServiceProto`), C# `Nexus.Workflow.V1`, PHP
    `Nexus\\Workflow\\V1`, Ruby `Nexus::Workflow::V1`, Objective-C prefix `NXWORKFLOW`.
    Swift keeps protoc's default (`Nexus_Workflow_V1_`), as googleapis does."""
    parts = fdp.package.split(".")
    area = "".join(parts[1:-1])
    version = parts[-1]
    directory = fdp.name.rsplit("/", 1)[0]
    stem = fdp.name.rsplit("/", 1)[1].removesuffix(".proto")
    pascal = [p[:1].upper() + p[1:] for p in parts]
    opts = descriptor_pb2.FileOptions()
    opts.java_package = "io." + fdp.package
    opts.java_outer_classname = "".join(w.capitalize() for w in stem.split("_")) + "Proto"
    opts.java_multiple_files = True
    opts.go_package = f"{go_module}/{directory};{area}{version}"
    opts.objc_class_prefix = "NX" + area.upper()
    opts.csharp_namespace = ".".join(pascal)
    opts.php_namespace = "\\".join(pascal)
    opts.ruby_package = "::".join(pascal)
    return opts


def _option_lines(opts: descriptor_pb2.FileOptions) -> list[str]:
    lines = []
    for name in _OPTION_ORDER:
        value = getattr(opts, name)
        if isinstance(value, bool):
            text = "true" if value else "false"
        else:
            text = '"' + value.replace("\\", "\\\\") + '"'
        lines.append(f"option {name} = {text};")
    return lines


def _comment(comments: dict[tuple[int, ...], str], path: tuple[int, ...], indent: str) -> list[str]:
    text = comments.get(path, "")
    return [f"{indent}//{line}".rstrip() for line in text.splitlines()]


def render_models_proto(fdp: descriptor_pb2.FileDescriptorProto) -> str:
    """Proto3 source text of the generated models file (messages and services), with the
    comments of its `source_code_info` and its file options."""
    from google.api import annotations_pb2

    comments = {tuple(loc.path): loc.leading_comments for loc in fdp.source_code_info.location}
    out = [
        "// Generated by `nexus proto export` from the app's DataFlow models. Do not edit:",
        "// regenerate it when the models change.",
        'syntax = "proto3";',
        "",
        f"package {fdp.package};",
        "",
    ]
    out += [f'import "{dep}";' for dep in fdp.dependency]
    out += ["", *_option_lines(fdp.options), ""]
    for i, msg in enumerate(fdp.message_type):
        out += _comment(comments, (4, i), "")
        out.append(f"message {msg.name} {{")
        for j, f in enumerate(msg.field):
            label = ""
            if f.label == F.LABEL_REPEATED:
                label = "repeated "
            elif f.proto3_optional:
                label = "optional "
            out += _comment(comments, (4, i, 2, j), "  ")
            out.append(f"  {label}{_field_type(f, fdp.package)} {f.name} = {f.number};")
        out += ["}", ""]
    for i, svc in enumerate(fdp.service):
        out += _comment(comments, (6, i), "")
        out.append(f"service {svc.name} {{")
        for j, m in enumerate(svc.method):
            req = m.input_type.lstrip(".").removeprefix(fdp.package + ".")
            resp = m.output_type.lstrip(".").removeprefix(fdp.package + ".")
            out += _comment(comments, (6, i, 2, j), "  ")
            out.append(f"  rpc {m.name}({req}) returns ({resp}) {{")
            rule = m.options.Extensions[annotations_pb2.http]
            out.append("    option (google.api.http) = {")
            out.extend(_rule_text(rule, "      "))
            out += ["    };", "  }"]
        out += ["}", ""]
    return "\n".join(out)


def _with_options(source: str, opts: descriptor_pb2.FileOptions) -> str:
    """A static `.proto` source with the file options after its imports (or its
    `package` line), where googleapis puts them; any of them the source sets is
    replaced (the export's, `nexus.binpb`'s, are the ones that count)."""
    ours = tuple(f"option {name} =" for name in _OPTION_ORDER)
    lines = [line for line in source.split("\n") if not line.startswith(ours)]
    heads = [i for i, line in enumerate(lines) if line.startswith(("package ", "import "))]
    if not heads:
        raise ValueError("a static .proto without a package line")
    at = heads[-1] + 1
    return "\n".join([*lines[:at], "", *_option_lines(opts), *lines[at:]])


def _copy_tree(
    src: resources.abc.Traversable,
    dest: Path,
    options: dict[str, descriptor_pb2.FileOptions],
    prefix: str = "",
) -> list[Path]:
    written: list[Path] = []
    for item in src.iterdir():
        target = dest / item.name
        name = f"{prefix}{item.name}"
        if item.is_dir():
            written += _copy_tree(item, target, options, name + "/")
        elif item.name.endswith(".proto"):
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(_with_options(item.read_text(), options[name]))
            written.append(target)
    return written


def _google_roots() -> list[Path]:
    import google.api
    import grpc_tools

    googleapis = Path(next(iter(google.api.__path__))).parent.parent
    well_known = Path(next(iter(grpc_tools.__path__))) / "_proto"
    return [googleapis, well_known]


def export_protos(typed: TypedModels, out: Path, *, go_module: str = GO_MODULE) -> list[Path]:
    """Write every `.proto` a client needs under `out` (ours, the per-model file, and
    the google/api, google/rpc and google/protobuf files they import) and one
    descriptor set, `nexus.binpb`, with all of them. Our files carry the language
    options of `language_options` (`go_module`: the Go import path prefix), in the
    sources and in the descriptor set. Returns the files written."""
    static = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set_bytes())
    merged = descriptor_pb2.FileDescriptorSet()
    seen: set[str] = set()
    options: dict[str, descriptor_pb2.FileOptions] = {}
    # the REST twins too (`_typed.build_rest_file`): an operator's Envoy reads this set
    for f in [*static.file, *typed.file_set().file, typed.rest_file]:
        if f.name not in seen:
            seen.add(f.name)
            merged.file.append(f)
            if f.name.startswith("nexus/"):
                options[f.name] = language_options(f, go_module)
                merged.file[-1].options.MergeFrom(options[f.name])

    out.mkdir(parents=True, exist_ok=True)
    written = _copy_tree(resources.files("nexus_api").joinpath("proto"), out, options)
    models = out / FILE_NAME
    models.parent.mkdir(parents=True, exist_ok=True)
    models_fdp = next(f for f in merged.file if f.name == FILE_NAME)
    models.write_text(render_models_proto(models_fdp))
    written.append(models)
    roots = _google_roots()
    for name in sorted(n for n in seen if n.startswith("google/")):
        for root in roots:
            if (root / name).is_file():
                (out / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(root / name, out / name)
                written.append(out / name)
                break
    ds = out / DESCRIPTOR_SET_FILE
    ds.write_bytes(merged.SerializeToString())
    written.append(ds)
    return written
