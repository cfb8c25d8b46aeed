"""The CLI's credentials against a real server with authentication on (issue 16).

The server (conftest's `server` fixture, with this module's `app_builder`) accepts an
operator key from `NEXUS_API_KEY_ROOT` (role admin) and HS256 tokens signed with
`NEXUS_JWT_SECRET`; the tokens are made here with PyJWT. The CLI runs as a subprocess
with its own `XDG_CONFIG_HOME` and `HOME`, so a stored login never touches the real
home. Every result is checked for the credentials it must never print.

The in-process tests at the end cover the pieces without a server: the credentials
file (modes, content, other servers' entries), precedence, `--expires` and the JWT
shape test of the login prompt.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest

from clients._grpc import Credential
from clients.cli._app import parse_expires
from clients.cli._credentials import (
    CredentialError,
    credentials_path,
    forget,
    load_stored,
    looks_like_jwt,
    resolve,
    store,
)
from dataflow import DataFlow
from nexus_server import Nexus
from workflow import WorkflowBuilder

pytestmark = pytest.mark.timeout(120)

OK, USAGE, PERMISSION = 0, 2, 7

ADMIN_KEY = "root_" + secrets.token_hex(16)
JWT_SECRET = secrets.token_hex(32)


def token(sub: str, roles: list[str], *, tenant: str | None = None, ttl: float = 3600) -> str:
    """An HS256 token the server accepts (or, with a negative `ttl`, an expired one)."""
    claims: dict[str, Any] = {"sub": sub, "roles": roles, "exp": int(time.time() + ttl)}
    if tenant is not None:
        claims["tenant"] = tenant
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


def build_auth_app(db_url: str) -> tuple[Nexus, DataFlow]:
    """Notes, and three workflows: one for writers, one for auditors, one public."""
    app = Nexus(grpc_port=0, grace_period=1.0, enable_auth=True, audit_table=True)
    db = DataFlow(db_url)

    @db.model
    class Note:
        """A short note."""

        id: str
        text: str

    app.integrate_dataflow(db)

    add = WorkflowBuilder("Add a note.")
    add.add_input("text", str, description="what the note says")
    add.add_node("NoteCreateNode", "create", {"text": "{{text}}"})
    app.register("add_note", add.build(), roles=["writer"])

    report = WorkflowBuilder("Count the notes.")
    report.add_node("NoteCountNode", "count", {})
    app.register("note_report", report.build(), roles=["auditor"])

    hello = WorkflowBuilder("Count the notes, for anyone.")
    hello.add_node("NoteCountNode", "count", {})
    app.register("hello", hello.build(), public=True)
    return app, db


@pytest.fixture(scope="module")
def app_builder() -> Iterator[Any]:
    """The auth-on app; the server reads its credential sources from the environment."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NEXUS_API_KEY_ROOT", ADMIN_KEY)
        mp.setenv("NEXUS_JWT_SECRET", JWT_SECRET)
        yield build_auth_app


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def nx(cli: Any, home: Path) -> Any:
    """`nx(*args, input=None, env=None)`: the CLI with this test's own config home."""
    home.mkdir(exist_ok=True)

    def run(*args: str, input: str | None = None, env: dict[str, str] | None = None) -> Any:
        base = {"HOME": str(home), "XDG_CONFIG_HOME": str(home / "config")}
        return cli(*args, input=input, env={**base, **(env or {})})

    return run


def hidden(result: Any, *values: str) -> None:
    """No credential in any output, and no traceback."""
    for value in (ADMIN_KEY, JWT_SECRET, *values):
        assert value not in result.out and value not in result.err
    assert "Traceback" not in result.err


def stored_file(home: Path) -> Path:
    return home / "config" / "nexus" / "credentials.json"


# ---------------------------------------------------------------------------- refusals


def test_no_credential_is_exit_7_with_how_to_log_in(nx: Any) -> None:
    r = nx("workflows", "list")
    assert r.code == PERMISSION, r.err
    assert "UNAUTHENTICATED (CREDENTIALS_MISSING)" in r.err
    assert "nexus login" in r.err and "--token/--api-key" in r.err
    hidden(r)


def test_bad_credentials_are_exit_7_and_never_printed(nx: Any) -> None:
    wrong_key = "wrong_" + secrets.token_hex(16)
    r = nx("--api-key", wrong_key, "workflows", "list")
    assert r.code == PERMISSION and "CREDENTIALS_INVALID" in r.err, r.err
    assert "(from --api-key) was refused" in r.err
    hidden(r, wrong_key)

    forged = jwt.encode(
        {"sub": "eve", "roles": ["admin"], "exp": int(time.time()) + 60},
        "x" * 40,
        algorithm="HS256",
    )
    r = nx("-o", "json", "models", "list", env={"NEXUS_TOKEN": forged})
    assert r.code == PERMISSION and "CREDENTIALS_INVALID" in r.err, r.err
    assert "(from NEXUS_TOKEN)" in r.err
    hidden(r, forged)

    expired = token("ada", ["writer"], ttl=-3600)
    r = nx("--token", expired, "whoami")
    assert r.code == PERMISSION and "CREDENTIALS_EXPIRED" in r.err, r.err
    hidden(r, expired)


def test_valid_credential_without_the_right_is_exit_7(nx: Any) -> None:
    auditor = token("aud", ["auditor"])
    r = nx("--token", auditor, "run", "add_note", "--text", "nope")
    assert r.code == PERMISSION, r.err
    assert "PERMISSION_DENIED" in r.err
    hidden(r, auditor)
    r = nx("--token", auditor, "keys", "list")
    assert r.code == PERMISSION and "PERMISSION_DENIED" in r.err, r.err
    assert "nexus whoami" in r.err
    hidden(r, auditor)


# ---------------------------------------------------------------------------- precedence


def test_flag_beats_env_beats_stored_login(nx: Any, home: Path) -> None:
    writer = token("wendy", ["writer"])
    r = nx("login", "--api-key", ADMIN_KEY)
    assert r.code == OK, r.err

    r = nx("-o", "json", "whoami")
    assert r.code == OK, r.err
    assert r.json()["id"] == "key:root" and "admin" in r.json()["roles"]
    r = nx("whoami")
    assert "stored login" in r.out

    r = nx("-o", "json", "whoami", env={"NEXUS_TOKEN": writer})
    assert r.code == OK and r.json()["id"] == "jwt:wendy", r.err

    r = nx("-o", "json", "--api-key", ADMIN_KEY, "whoami", env={"NEXUS_TOKEN": writer})
    assert r.code == OK and r.json()["id"] == "key:root", r.err
    r = nx("-o", "json", "--token", writer, "whoami")
    assert r.code == OK and r.json()["id"] == "jwt:wendy", r.err
    hidden(r, writer)


def test_a_token_and_a_key_at_one_level_is_a_usage_error(nx: Any) -> None:
    writer = token("wendy", ["writer"])
    r = nx("--token", writer, "--api-key", ADMIN_KEY, "whoami")
    assert r.code == USAGE and "not both" in r.err, r.err
    hidden(r, writer)
    r = nx("whoami", env={"NEXUS_TOKEN": writer, "NEXUS_API_KEY": ADMIN_KEY})
    assert r.code == USAGE and "NEXUS_TOKEN" in r.err and "NEXUS_API_KEY" in r.err, r.err
    hidden(r, writer)
    # a higher level decides alone: the ambiguous environment is not read
    r = nx("-o", "json", "--token", writer, "whoami", env={"NEXUS_API_KEY": "x" * 20})
    assert r.code == OK and r.json()["id"] == "jwt:wendy", r.err


# ---------------------------------------------------------------------------- login


def test_login_stores_per_server_0600_and_logout_removes(nx: Any, home: Path, server: Any) -> None:
    path = stored_file(home)
    path.parent.mkdir(parents=True, mode=0o700)
    other = {"kind": "api_key", "value": "other-server-key-0123", "principal": "key:x"}
    path.write_text(json.dumps({"version": 1, "servers": {"127.0.0.1:1": other}}))
    path.chmod(0o600)

    writer = token("wendy", ["writer"], tenant="acme")
    r = nx("login", "--token", writer)
    assert r.code == OK, r.err
    assert "jwt:wendy" in r.out and "writer" in r.out and "acme" in r.out
    assert f"logged in to {server.address}" in r.err
    hidden(r, writer)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    doc = json.loads(path.read_text())
    assert doc["servers"]["127.0.0.1:1"] == other  # another server's login is kept
    mine = doc["servers"][server.address]
    assert mine["kind"] == "token" and mine["value"] == writer
    assert mine["principal"] == "jwt:wendy"
    assert not [p for p in path.parent.iterdir() if p.name != path.name]  # no temp file left

    r = nx("-o", "json", "whoami")
    assert r.code == OK and r.json()["tenant"] == "acme", r.err

    r = nx("logout")
    assert r.code == OK and f"logged out of {server.address}" in r.err, r.err
    doc = json.loads(path.read_text())
    assert list(doc["servers"]) == ["127.0.0.1:1"]
    r = nx("whoami")
    assert r.code == PERMISSION and "CREDENTIALS_MISSING" in r.err, r.err
    r = nx("logout")
    assert r.code == OK and "no login stored" in r.err


def test_login_creates_the_directory_0700_and_reads_stdin(nx: Any, home: Path) -> None:
    writer = token("wendy", ["writer"])
    r = nx("login", input=writer + "\n")  # stdin is not a terminal: read, told a JWT
    assert r.code == OK, r.err
    hidden(r, writer)
    path = stored_file(home)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    entry = next(iter(json.loads(path.read_text())["servers"].values()))
    assert entry["kind"] == "token"

    r = nx("login", "--api-key", "-", input=ADMIN_KEY + "\n")
    assert r.code == OK and "key:root" in r.out, r.err
    entry = next(iter(json.loads(path.read_text())["servers"].values()))
    assert entry == {**entry, "kind": "api_key", "value": ADMIN_KEY}
    hidden(r)


def test_a_refused_credential_is_not_stored(nx: Any, home: Path) -> None:
    wrong = "wrong_" + secrets.token_hex(16)
    r = nx("login", "--api-key", wrong)
    assert r.code == PERMISSION and "CREDENTIALS_INVALID" in r.err, r.err
    assert "not stored" in r.err
    hidden(r, wrong)
    assert not stored_file(home).exists()
    r = nx("login", input="\n")
    assert r.code == USAGE and "no credential given" in r.err, r.err
    assert not stored_file(home).exists()


def test_a_credentials_file_others_can_read_is_refused(nx: Any, home: Path) -> None:
    assert nx("login", "--api-key", ADMIN_KEY).code == OK
    path = stored_file(home)
    path.chmod(0o644)
    r = nx("whoami")
    assert r.code == USAGE and "can be read by other users" in r.err, r.err
    hidden(r)
    # logging in again mends it: the file is written anew, 0600
    r = nx("login", "--api-key", ADMIN_KEY)
    assert r.code == OK, r.err
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert nx("whoami").code == OK


# ---------------------------------------------------------------------------- keys


def test_keys_create_list_revoke(nx: Any, unique: Any) -> None:
    name = unique("ci").replace("-", "_")
    admin = ("--api-key", ADMIN_KEY)
    r = nx(*admin, "keys", "create", name, "--role", "writer", "--role", "auditor",
           "--tenant", "acme", "--expires", "30d")  # fmt: skip
    assert r.code == OK, r.err
    key = r.out.strip()
    assert key and "\n" not in key
    assert "store this key now" in r.err and "shown only once" in r.err
    assert key not in r.err

    r = nx("-o", "json", "--api-key", key, "whoami")
    assert r.code == OK, r.err
    me = r.json()
    assert me["id"] == f"key:{name}" and set(me["roles"]) == {"writer", "auditor"}
    assert me["tenant"] == "acme"

    for args in (("keys", "list"), ("-o", "json", "keys", "list")):
        r = nx(*admin, *args)
        assert r.code == OK, r.err
        assert name in r.out and key not in r.out
    listed = next(k for k in json.loads(r.out)["api_keys"] if k["name"] == name)
    assert listed["roles"] == ["writer", "auditor"] and "expire_time" in listed
    assert key.startswith(listed["prefix"])

    r = nx(*admin, "keys", "revoke", name)
    assert r.code == OK and "revoked" in r.err, r.err
    r = nx("--api-key", key, "workflows", "list")
    assert r.code == PERMISSION and "CREDENTIALS_INVALID" in r.err, r.err
    hidden(r, key)

    r = nx(*admin, "keys", "list")
    assert name not in r.out  # revoked keys only with --all
    r = nx(*admin, "-o", "json", "keys", "list", "--all")
    entry = next(k for k in r.json()["api_keys"] if k["name"] == name)
    assert entry.get("revoke_time")


def test_keys_create_json_and_bad_expires(nx: Any, unique: Any) -> None:
    name = unique("bot").replace("-", "_")
    r = nx("--api-key", ADMIN_KEY, "keys", "create", name, "--role", "reader", "--json")
    assert r.code == OK, r.err
    doc = json.loads(r.out)
    assert doc["api_key"]["name"] == name and doc["key"].startswith(doc["api_key"]["prefix"])
    assert "store this key now" in r.err

    for bad in ("soon", "0d", "2001-01-01T00:00:00Z"):
        r = nx("--api-key", ADMIN_KEY, "keys", "create", name + "_x", "--role", "x",
               "--expires", bad)  # fmt: skip
        assert r.code == USAGE and "--expires" in r.err, (bad, r.err)


# ---------------------------------------------------------------------------- audit


def test_audit_list_shows_cli_calls_and_refusals(nx: Any, unique: Any) -> None:
    wrong = "wrong_" + secrets.token_hex(16)
    assert nx("--api-key", wrong, "keys", "list").code == PERMISSION
    name = unique("audited").replace("-", "_")
    assert nx("--api-key", ADMIN_KEY, "keys", "create", name, "--role", "reader").code == OK
    # the server writes audit rows behind, in batches: poll until the refusal is listed
    deadline = time.monotonic() + 20.0
    while True:
        r = nx("--api-key", ADMIN_KEY, "-o", "json", "audit", "list", "--failed", "--limit", "20")
        assert r.code == OK, r.err
        events = r.json()["events"]
        refused = [e for e in events if e["reason"] == "CREDENTIALS_INVALID"]
        mine = nx("--api-key", ADMIN_KEY, "-o", "json", "audit", "list", "--principal", "key:root")
        created = [e for e in mine.json()["events"] if e["resource"] == f"api_key:{name}"]
        if (refused and created) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert events and all(e["code"] != "OK" for e in events)
    assert refused, events
    assert refused[0]["channel"] == "cli"
    assert refused[0]["method"].endswith("/ListApiKeys")
    hidden(r, wrong)

    r = nx("--api-key", ADMIN_KEY, "audit", "list", "--failed", "--limit", "5")
    assert r.code == OK, r.err
    for column in ("time", "principal", "channel", "method", "resource", "code", "reason"):
        assert column in r.out
    assert "AuthService/ListApiKeys" in r.out and "CREDENTIALS_INVALID" in r.out
    assert created and created[0]["code"] == "OK" and created[0]["channel"] == "cli"
    assert {e["principal"] for e in mine.json()["events"]} == {"key:root"}
    r = nx("--token", token("aud", ["auditor"]), "audit", "list")
    assert r.code == PERMISSION, r.err


# ---------------------------------------------------------------------------- help


def test_help_lists_only_what_the_credential_may_use(nx: Any) -> None:
    writer = token("wendy", ["writer"])
    auditor = token("aud", ["auditor"])

    r = nx("--token", writer, "run", "--help")
    assert r.code == OK, r.err
    assert "add_note" in r.out and "hello" in r.out and "note_report" not in r.out
    r = nx("--token", auditor, "run", "--help")
    assert r.code == OK, r.err
    assert "note_report" in r.out and "hello" in r.out and "add_note" not in r.out

    r = nx("--token", writer, "--help")
    assert r.code == OK and "notes" in r.out, r.err
    r = nx("--token", auditor, "--help")
    assert r.code == OK and "notes" not in r.out, r.err

    r = nx("--api-key", ADMIN_KEY, "run", "--help")
    for name in ("add_note", "note_report", "hello"):
        assert name in r.out
    r = nx("--token", writer, "run", "add_note", "--help")
    assert r.code == OK and "--text" in r.out, r.err


def test_help_without_a_credential_says_how_to_log_in(nx: Any) -> None:
    for args in (("--help",), ("run", "--help")):
        r = nx(*args)
        assert r.code == OK, r.err
        lines = [line for line in r.err.splitlines() if line.strip()]
        assert len(lines) == 1 and "nexus login" in lines[0], r.err
        assert "CREDENTIALS_MISSING" in lines[0]
        assert "Traceback" not in r.err
    assert "workflows" in r.out or "Usage" in r.out
    r = nx("run", "add_note", "--help")
    assert r.code == PERMISSION and "nexus login" in r.err, r.err
    assert "Traceback" not in r.err


def test_run_with_the_right_works_end_to_end(nx: Any) -> None:
    writer = token("wendy", ["writer"])
    r = nx("-o", "json", "--token", writer, "run", "add_note", "--text", "hi")
    assert r.code == OK, r.err
    assert r.json()["state"] == "STATE_SUCCEEDED"
    r = nx("-o", "json", "--token", writer, "notes", "count")
    assert r.code == OK and int(r.json()["count"]) >= 1, r.err
    # server reflection (nexus call to a typed service) carries the credential too
    r = nx("-o", "json", "--token", writer, "call", "NoteService/ListNotes", "-d", "{}")
    assert r.code == OK, r.err
    hidden(r, writer)


# ---------------------------------------------------------------------------- in process


@pytest.fixture
def config_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.delenv("NEXUS_TOKEN", raising=False)
    monkeypatch.delenv("NEXUS_API_KEY", raising=False)
    return tmp_path / "cfg"


def test_credentials_path_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert credentials_path() == tmp_path / "nexus" / "credentials.json"
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/dir")  # ignored, as XDG says
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert credentials_path() == tmp_path / "h" / ".config" / "nexus" / "credentials.json"


def test_store_is_never_readable_by_others_even_with_umask_0(config_home: Path) -> None:
    old = os.umask(0)
    try:
        path = store("a:1", Credential("api_key", "k" * 20), "key:a")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    store("b:2", Credential("token", "t.t.t"), "jwt:b")
    got = load_stored("a:1")
    assert got is not None and got.credential == Credential("api_key", "k" * 20)
    assert forget("a:1") and not forget("a:1")
    assert load_stored("a:1") is None and load_stored("b:2") is not None
    assert forget("b:2") and not path.exists()  # the file goes with its last entry


def test_a_wider_directory_is_tightened(config_home: Path) -> None:
    (config_home / "nexus").mkdir(parents=True, mode=0o755)
    (config_home / "nexus").chmod(0o755)
    path = store("a:1", Credential("api_key", "k" * 20), "key:a")
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_a_broken_file_is_named_not_shown(config_home: Path) -> None:
    path = credentials_path()
    path.parent.mkdir(parents=True)
    path.write_text("secret-looking garbage {")
    with pytest.raises(CredentialError, match="not a nexus credentials file") as info:
        resolve("a:1", None, None)
    assert "garbage" not in str(info.value)


def test_resolve_precedence(config_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store("a:1", Credential("api_key", "stored-key-0123456"), "key:s")
    assert resolve("a:1", None, None).source == "stored login"
    assert resolve("other:2", None, None).credential is None  # per server
    monkeypatch.setenv("NEXUS_API_KEY", "env-key-0123456789")
    got = resolve("a:1", None, None)
    assert got.credential == Credential("api_key", "env-key-0123456789")
    assert got.source == "NEXUS_API_KEY"
    got = resolve("a:1", "a.b.c", None)
    assert got.credential == Credential("token", "a.b.c") and got.source == "--token"
    with pytest.raises(CredentialError, match="not both"):
        resolve("a:1", "a.b.c", "k")
    with pytest.raises(CredentialError, match="--api-key: the value is empty"):
        resolve("a:1", None, "  ")
    for bad in ("k\u00e9y-SECRET", "two words-SECRET", "line\nbreak-SECRET"):
        with pytest.raises(CredentialError, match="printable ASCII") as info:
            resolve("a:1", bad, None)  # gRPC would refuse it with an INTERNAL error
        assert "SECRET" not in str(info.value)
    monkeypatch.setenv("NEXUS_TOKEN", "a.b.c")
    with pytest.raises(CredentialError, match="set one of them"):
        resolve("a:1", None, None)


def test_parse_expires() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_expires("30d", now) == now + timedelta(days=30)
    assert parse_expires("12h", now) == now + timedelta(hours=12)
    assert parse_expires("2w", now) == now + timedelta(weeks=2)
    assert parse_expires("2027-01-01T00:00:00Z", now) == datetime(2027, 1, 1, tzinfo=UTC)
    assert parse_expires("2027-01-01", now) == datetime(2027, 1, 1, tzinfo=UTC)
    for bad, why in (("0h", "more than 0"), ("soon", "expected a duration"),
                     ("2025-01-01T00:00:00Z", "not in the future")):  # fmt: skip
        with pytest.raises(ValueError, match=why):
            parse_expires(bad, now)


def test_looks_like_jwt() -> None:
    assert looks_like_jwt(token("a", ["r"]))
    assert not looks_like_jwt("nxk_abc.def.ghi")
    assert not looks_like_jwt(ADMIN_KEY)
    assert not looks_like_jwt("eyJ.only")
