"""The CLI's credential: which one a command sends, and the one `nexus login` stores.

A command sends one credential, from the first of these that gives one:

1. the root flags `--token TOKEN` / `--api-key KEY`;
2. the environment, `$NEXUS_TOKEN` / `$NEXUS_API_KEY`;
3. the login stored for the server by `nexus login`.

A token and a key given at the same level is a usage error: which one was meant cannot
be told. A lower level is not read once a higher one gave a credential.

`nexus login` stores the credential in `$XDG_CONFIG_HOME/nexus/credentials.json`
(`~/.config/nexus/credentials.json` without it), one entry per server address. The
directory is created 0700 and the file 0600, and the file is replaced whole through a
temporary file created 0600 in the same directory, so the credential is never readable
by another user, not even for a moment.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

from .._grpc import Credential, call_metadata, credential_from_env

__all__ = [
    "CredentialError",
    "Resolved",
    "StoredLogin",
    "StoredLoginError",
    "checked",
    "credentials_path",
    "forget",
    "load_stored",
    "looks_like_jwt",
    "resolve",
    "store",
    "with_call_metadata",
]

_FILE_MODE = 0o600
_DIR_MODE = 0o700
_VERSION = 1


class CredentialError(ValueError):
    """The credential cannot be chosen or stored: two at one level, an empty one, or a
    credentials file that cannot be read. The message never holds a credential."""


class StoredLoginError(CredentialError):
    """The credentials file cannot be used (unreadable, broken, or readable by others)."""


@dataclass(frozen=True)
class Resolved:
    """The credential a command sends and where it came from (for messages).

    `source` is `--token`, `--api-key`, `NEXUS_TOKEN`, `NEXUS_API_KEY`, `stored login`,
    or empty when there is none.
    """

    credential: Credential | None
    source: str = ""


@dataclass(frozen=True)
class StoredLogin:
    """One server's entry in the credentials file."""

    credential: Credential
    principal: str
    stored_at: str


def credentials_path() -> Path:
    """`$XDG_CONFIG_HOME/nexus/credentials.json`, else `~/.config/nexus/credentials.json`.

    An empty or relative `$XDG_CONFIG_HOME` is ignored, as the XDG specification says.
    """
    base = os.environ.get("XDG_CONFIG_HOME", "")
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".config"
    return root / "nexus" / "credentials.json"


#: What a credential may hold: printable ASCII without spaces, what a header carries
#: unchanged (gRPC refuses anything else before the call leaves).
_PRINTABLE = re.compile(r"^[\x21-\x7e]+$")


def checked(value: str, where: str) -> str:
    """`value` without surrounding whitespace, if it can be sent as a credential.

    Raises:
        CredentialError: empty, or a character a header cannot carry (the message names
            `where`, never the value).
    """
    value = value.strip()
    if not value:
        raise CredentialError(f"{where}: the value is empty")
    if not _PRINTABLE.match(value):
        raise CredentialError(
            f"{where}: a credential is printable ASCII without spaces; this value is not"
        )
    return value


def resolve(server: str, token: str | None, api_key: str | None) -> Resolved:
    """The credential for a command against `server`: flags, else env, else stored.

    Raises:
        CredentialError: a token and a key at one level, an empty flag, or a stored
            credentials file that cannot be read.
    """
    if token is not None and api_key is not None:
        raise CredentialError("give --token or --api-key, not both")
    for flag, kind, value in (("--token", "token", token), ("--api-key", "api_key", api_key)):
        if value is not None:
            return Resolved(Credential(kind, checked(value, flag)), flag)
    try:
        env = credential_from_env()
    except ValueError as exc:
        raise CredentialError(str(exc)) from None
    if env is not None:
        source = "NEXUS_TOKEN" if env.kind == "token" else "NEXUS_API_KEY"
        return Resolved(Credential(env.kind, checked(env.value, source)), source)
    stored = load_stored(server)
    if stored is not None:
        return Resolved(stored.credential, "stored login")
    return Resolved(None)


def looks_like_jwt(value: str) -> bool:
    """Whether `value` has the shape of a JWT (three base64url parts, a JSON header):
    how a credential typed at the `nexus login` prompt is told from an API key."""
    parts = value.split(".")
    if len(parts) != 3 or not all(parts[:2]):
        return False
    allowed = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    return value.startswith("eyJ") and all(set(p) <= allowed for p in parts)


# ---------------------------------------------------------------------------- the file


def _read(path: Path) -> dict[str, Any]:
    """The whole credentials file (an empty document when there is none)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {"version": _VERSION, "servers": {}}
    except OSError as exc:
        raise StoredLoginError(f"cannot read {path}: {exc.strerror}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        doc = None
    if not isinstance(doc, dict) or not isinstance(doc.get("servers"), dict):
        raise StoredLoginError(
            f"{path} is not a nexus credentials file; remove it and run nexus login again"
        )
    return doc


def _entry(raw: Any) -> StoredLogin | None:
    if not isinstance(raw, Mapping):
        return None
    kind, value = raw.get("kind"), raw.get("value")
    if kind not in ("token", "api_key") or not isinstance(value, str) or not value:
        return None
    return StoredLogin(
        Credential(kind, value), str(raw.get("principal", "")), str(raw.get("stored_at", ""))
    )


def load_stored(server: str) -> StoredLogin | None:
    """The login stored for `server`, if any.

    Raises:
        CredentialError: the file exists but cannot be read, is not a credentials file,
            or other users may read it (a credential they could have copied is not used).
    """
    path = credentials_path()
    doc = _read(path)
    entry = doc["servers"].get(server)
    if entry is None:
        return None
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise StoredLoginError(
            f"{path} can be read by other users (mode {mode:04o}); "
            f"run chmod 600 {path}, or nexus login again"
        )
    login = _entry(entry)
    if login is None:
        raise StoredLoginError(f"{path} has a broken entry for {server}; run nexus login again")
    return login


def store(server: str, credential: Credential, principal: str) -> Path:
    """Store `credential` as the login for `server`; returns the file's path.

    The directory is created 0700 (and tightened to 0700 if it was wider: it holds
    credentials only); the file is written to a temporary file made 0600 in the same
    directory, then renamed over the old one, so a reader sees the old or the new file,
    whole, and never one readable by others.
    """
    path = credentials_path()
    doc = _read(path)
    doc["version"] = _VERSION
    doc["servers"][server] = {
        "kind": credential.kind,
        "value": credential.value,
        "principal": principal,
        "stored_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
    }
    _write(path, doc)
    return path


def forget(server: str) -> bool:
    """Remove the login stored for `server`; False when there was none. The file is
    removed with its last entry."""
    path = credentials_path()
    doc = _read(path)
    if doc["servers"].pop(server, None) is None:
        return False
    if doc["servers"]:
        _write(path, doc)
    else:
        path.unlink(missing_ok=True)
    return True


def _write(path: Path, doc: Mapping[str, Any]) -> None:
    directory = path.parent
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        directory.mkdir(mode=_DIR_MODE, exist_ok=True)
        if stat.S_IMODE(directory.stat().st_mode) != _DIR_MODE:
            os.chmod(directory, _DIR_MODE)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".credentials-", suffix=".tmp")
    except OSError as exc:
        raise CredentialError(f"cannot write {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            os.fchmod(fh.fileno(), _FILE_MODE)  # mkstemp's mode, whatever the platform
            json.dump(doc, fh, indent=2)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise CredentialError(f"cannot write {path}: {exc.strerror}") from None


# ---------------------------------------------------------------------------- the channel


@dataclass(frozen=True)
class _Details(grpc.ClientCallDetails):  # type: ignore[misc]
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str | bytes]] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class _CallMetadata(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[misc]
    grpc.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    """Adds `call_metadata()` (the credential, the channel) to every call that does not
    already send those keys: the calls made by libraries that take no metadata, server
    reflection above all, carry the credential too. A request with a `request_id`
    sends it as a header too (`call_metadata`)."""

    def _details(self, details: Any, request: Any = None) -> _Details:
        given = list(details.metadata or ())
        keys = {k for k, _ in given}
        key = str(getattr(request, "request_id", "") or "")
        extra = [(k, v) for k, v in call_metadata(key) if k not in keys]
        return _Details(
            details.method,
            details.timeout,
            given + extra,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details, request), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details, request), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


def with_call_metadata(channel: grpc.Channel) -> grpc.Channel:
    """`channel`, sending this context's credential and channel name on every call."""
    return grpc.intercept_channel(channel, _CallMetadata())
