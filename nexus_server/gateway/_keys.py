"""API keys the server manages, in the app's database (`nexus_api_keys`).

A key reads `nxk_<id>_<secret>`: `id` is 16 random hex digits, the row's primary key, so
a key is found with one primary-key query; `secret` is 32 random bytes (base64url). Only
a salted hash of the secret is stored (HMAC-SHA256 keyed with a per-key random salt: the
secret is high-entropy, so a fast hash is the right one; a slow password hash would only
slow every call). Hashes are compared in constant time.

Every `lookup` reads the row (one primary-key query, on the driver), nothing is cached:
a revocation takes effect on the next call, on every server sharing the database.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from dataflow import AlreadyExistsError, DataFlow

__all__ = [
    "KEY_PREFIX",
    "ApiKeyExistsError",
    "ApiKeyNotFoundError",
    "ApiKeyRecord",
    "KeyStore",
]

#: Every managed key starts with this.
KEY_PREFIX = "nxk_"
_ID_HEX = 16
_KEY_SHAPE = re.compile(r"^nxk_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")

_META = sa.MetaData()
API_KEYS = sa.Table(
    "nexus_api_keys",
    _META,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("roles", sa.Text, nullable=False),  # a JSON list of role names
    sa.Column("tenant", sa.String(128), nullable=True),
    sa.Column("salt", sa.String(64), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("expire_time", sa.DateTime(timezone=True), nullable=True),
    sa.Column("revoke_time", sa.DateTime(timezone=True), nullable=True),
    sa.Column("creator", sa.String(256), nullable=False),
)
# a name is unique among the keys in force; revoked ones keep theirs, for the record.
# Its SQL is the same on SQLite and PostgreSQL (partial indexes)
_ACTIVE_NAME_DDL = (
    "CREATE UNIQUE INDEX IF NOT EXISTS uq_nexus_api_keys_active_name "
    "ON nexus_api_keys (name) WHERE revoke_time IS NULL"
)
_LIST_ORDER_DDL = (
    "CREATE INDEX IF NOT EXISTS ix_nexus_api_keys_order ON nexus_api_keys (create_time, id)"
)

_COLUMNS = tuple(c.name for c in API_KEYS.columns)


class ApiKeyExistsError(Exception):
    """A key in force already has this name."""

    def __init__(self, name: str) -> None:
        super().__init__(f"an API key named {name!r} exists already")
        self.name = name


class ApiKeyNotFoundError(Exception):
    """No key has this name."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no API key is named {name[:60]!r}")
        self.name = name


def _utc(value: _dt.datetime | str | None) -> _dt.datetime | None:
    """A stored time in UTC: a datetime from SQLAlchemy or asyncpg, or the text SQLite's
    driver returns for a DateTime column."""
    if value is None:
        return None
    if isinstance(value, str):
        value = _dt.datetime.fromisoformat(value)
    return value.replace(tzinfo=_dt.UTC) if value.tzinfo is None else value.astimezone(_dt.UTC)


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    """A managed key's row (never the key, nor its hash).

    Attributes:
        id: the lookup id (the `<id>` of `nxk_<id>_<secret>`).
        name: its name; its principal is `key:<name>`.
        roles: the roles it grants.
        tenant: the tenant of its calls, or None.
        create_time, expire_time, revoke_time: UTC; None for never / not revoked.
        creator: the principal that created it.
    """

    id: str
    name: str
    roles: tuple[str, ...]
    tenant: str | None
    create_time: _dt.datetime
    expire_time: _dt.datetime | None
    revoke_time: _dt.datetime | None
    creator: str

    @property
    def prefix(self) -> str:
        """The key's first characters (`nxk_<id>`): no secret, tells keys apart."""
        return f"{KEY_PREFIX}{self.id}"

    def expired(self, now: _dt.datetime | None = None) -> bool:
        """Whether its expiry time has passed."""
        if self.expire_time is None:
            return False
        return self.expire_time <= (now or _dt.datetime.now(_dt.UTC))

    @classmethod
    def _from_row(cls, row: Mapping[Any, Any]) -> ApiKeyRecord:
        created = _utc(row["create_time"])
        assert created is not None
        return cls(
            id=row["id"],
            name=row["name"],
            roles=tuple(json.loads(row["roles"])),
            tenant=row["tenant"],
            create_time=created,
            expire_time=_utc(row["expire_time"]),
            revoke_time=_utc(row["revoke_time"]),
            creator=row["creator"],
        )


def _digest(salt: str, secret: str) -> str:
    return hmac.digest(bytes.fromhex(salt), secret.encode(), "sha256").hex()


#: Keys `KeyStore.lookup` remembers as checked (the map is emptied when full).
_CHECKED_MAX = 10_000


class KeyStore:
    """The managed API keys of one database.

    Call `initialize()` once (it creates the table) before the other methods.
    """

    def __init__(self, db: DataFlow) -> None:
        self.db = db
        # SHA-256 of a key -> (its row as last read, its record): a key checked against
        # the same row before needs no hash or parsing again. The row is still read on
        # every call, so a revocation (a changed row) is seen on the next one.
        self._checked: dict[bytes, tuple[tuple[Any, ...], ApiKeyRecord]] = {}

    async def initialize(self) -> None:
        """Create `nexus_api_keys` and its indexes if missing."""

        def setup(conn: sa.Connection) -> None:
            _META.create_all(conn)
            conn.execute(sa.text(_ACTIVE_NAME_DDL))
            conn.execute(sa.text(_LIST_ORDER_DDL))

        await self.db.run_sync(setup)

    async def create(
        self,
        name: str,
        roles: Sequence[str],
        tenant: str | None,
        expire_time: _dt.datetime | None,
        creator: str,
    ) -> tuple[ApiKeyRecord, str]:
        """Make a key. Returns its record and the key itself (shown to no one else: only
        its salted hash is stored).

        The caller has checked the name, roles and tenant (the servicer does).

        Raises:
            ApiKeyExistsError: a key in force has this name.
        """
        key_id = secrets.token_hex(_ID_HEX // 2)
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_hex(16)
        record = ApiKeyRecord(
            id=key_id,
            name=name,
            roles=tuple(dict.fromkeys(roles)),
            tenant=tenant or None,
            create_time=_dt.datetime.now(_dt.UTC),
            expire_time=_utc(expire_time),
            revoke_time=None,
            creator=creator,
        )
        values = {
            "id": record.id,
            "name": record.name,
            "roles": json.dumps(list(record.roles)),
            "tenant": record.tenant,
            "salt": salt,
            "hash": _digest(salt, secret),
            "create_time": record.create_time,
            "expire_time": record.expire_time,
            "revoke_time": None,
            "creator": creator,
        }
        try:
            async with self.db.connection() as conn:
                await conn.execute(API_KEYS.insert().values(**values))
        except AlreadyExistsError:
            raise ApiKeyExistsError(name) from None
        return record, f"{KEY_PREFIX}{key_id}_{secret}"

    async def lookup(self, key: str) -> ApiKeyRecord | None:
        """The record of `key` when it is one of ours and its secret matches (revoked or
        expired keys included: the caller tells those apart), else None. One
        primary-key query, or none for a string not shaped like a key."""
        shape = _KEY_SHAPE.match(key)
        if shape is None:
            return None
        key_id, secret = shape.groups()
        # straight on the driver: this runs on every call that sends a managed key, and
        # SQLAlchemy's round trip would cost many times the query itself
        raw = await self.db.fetchrow(self._by_id, (key_id,))
        if raw is None:
            return None
        seen = hashlib.sha256(key.encode()).digest()
        known = self._checked.get(seen)
        if known is not None and known[0] == tuple(raw):
            return known[1]
        row = dict(zip(_COLUMNS, raw, strict=True))
        if not hmac.compare_digest(_digest(row["salt"], secret), row["hash"]):
            return None
        record = ApiKeyRecord._from_row(row)
        if len(self._checked) >= _CHECKED_MAX:
            self._checked.clear()
        self._checked[seen] = (tuple(raw), record)
        return record

    @functools.cached_property
    def _by_id(self) -> str:
        """Driver SQL: one key's row by its id."""
        return (
            f"SELECT {', '.join(_COLUMNS)} FROM {API_KEYS.name} WHERE id = {self.db.placeholder(1)}"
        )

    async def list(
        self, page_size: int, page_token: str = "", show_revoked: bool = False
    ) -> tuple[list[ApiKeyRecord], str]:
        """A page of keys, newest first, and the next page's token ("" on the last).

        Raises:
            dataflow.ValidationError: on `page_token`, a token not issued for this
                listing.
        """
        t = API_KEYS
        q = sa.select(t)
        if not show_revoked:
            q = q.where(t.c.revoke_time.is_(None))
        context = f"api_keys:{int(show_revoked)}"
        if page_token:
            payload = await self.db.verify_token(page_token, context)
            stamp, last_id = json.loads(payload)
            after = _dt.datetime.fromisoformat(stamp)
            q = q.where(
                sa.or_(t.c.create_time < after, sa.and_(t.c.create_time == after, t.c.id < last_id))
            )
        q = q.order_by(t.c.create_time.desc(), t.c.id.desc()).limit(page_size + 1)
        async with self.db.connection() as conn:
            rows = (await conn.execute(q)).mappings().all()
        records = [ApiKeyRecord._from_row(r) for r in rows[:page_size]]
        token = ""
        if len(rows) > page_size and records:
            last = records[-1]
            payload = json.dumps([last.create_time.isoformat(), last.id]).encode()
            token = await self.db.sign_token(payload, context)
        return records, token

    async def revoke(self, name: str) -> ApiKeyRecord:
        """Revoke the key in force named `name`; revoking a revoked key changes nothing
        and returns its (latest) record.

        Raises:
            ApiKeyNotFoundError: no key, in force or revoked, has this name.
        """
        t = API_KEYS
        now = _dt.datetime.now(_dt.UTC)
        async with self.db.connection() as conn:
            await conn.execute(
                t.update()
                .where(t.c.name == name, t.c.revoke_time.is_(None))
                .values(revoke_time=now)
            )
            row = (
                (
                    await conn.execute(
                        sa.select(t)
                        .where(t.c.name == name)
                        .order_by(t.c.create_time.desc())
                        .limit(1)
                    )
                )
                .mappings()
                .first()
            )
        if row is None:
            raise ApiKeyNotFoundError(name)
        return ApiKeyRecord._from_row(row)

    async def count_active(self) -> int:
        """How many keys are in force (neither revoked nor expired)."""
        t = API_KEYS
        now = _dt.datetime.now(_dt.UTC)
        q = (
            sa.select(sa.func.count())
            .select_from(t)
            .where(
                t.c.revoke_time.is_(None),
                sa.or_(t.c.expire_time.is_(None), t.c.expire_time > now),
            )
        )
        async with self.db.connection() as conn:
            return int((await conn.execute(q)).scalar_one())
