"""The query cache of `DataFlow(enable_caching=True)`: reads by id, lists, counts and
searches, in memory or in Redis (shared by replicas).

Invalidation is by versioned keys. Every model's table has a version; every cached
entry's key holds the version current when the read began; every write to the model
through DataFlow replaces the version once its transaction has committed. A read that starts
after a write completed therefore looks under the new version and misses, whatever the
replica: it never sees the value from before the write. An entry stored by a read that
overlapped a write sits under the old version, which no later read uses.

In Redis a version is a random token, not a counter: a version key that is lost
(evicted, flushed) comes back as a new token, never as one an old entry was stored
under. Entries expire after the TTL; old versions' entries simply age out.

Every key holds the tenant (`dataflow.current_tenant()`) and the cache scope
(`cache_scope`, which the server sets to the calling principal), so that no caller is
served an entry another tenant or principal filled.
"""

from __future__ import annotations

import base64
import contextvars
import datetime as dt
import decimal
import enum
import hashlib
import json
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

from ._errors import ValidationError
from ._model import ModelInfo

__all__ = [
    "DEFAULT_CACHE_MAX_ENTRIES",
    "DEFAULT_CACHE_TTL",
    "MemoryCache",
    "QueryCache",
    "RedisCache",
    "args_digest",
    "args_text",
    "cache_scope",
    "current_cache_scope",
    "default_prefix",
]

_log = logging.getLogger("dataflow.cache")

#: Seconds a cached read is kept (an upper bound: writes through DataFlow end it sooner).
DEFAULT_CACHE_TTL = 60.0
#: Entries the in-memory cache keeps (least recently used go first).
DEFAULT_CACHE_MAX_ENTRIES = 10_000

_SCOPE: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "dataflow_cache_scope", default=None
)


def current_cache_scope() -> str | None:
    """The cache scope of the current context (None: none set)."""
    return _SCOPE.get()


class cache_scope:  # lower case: used like a function, as tenant_scope
    """Run a block with a cache scope: a string that is part of every cache key, so that
    entries filled inside one scope are served inside the same scope only.

    The Nexus server sets it to the calling principal's id for each call (DataFlow knows
    nothing of principals). Without one, entries are shared by every caller of the same
    tenant, which is safe for DataFlow's own reads (their results depend on the tenant
    and the arguments only) once the caller was authorised.
    """

    __slots__ = ("_token", "scope")

    def __init__(self, scope: str | None) -> None:
        if scope is not None and not isinstance(scope, str):
            raise ValidationError("cache_scope", "expects a string (or None)")
        self.scope = scope
        self._token: contextvars.Token[str | None] | None = None

    def __enter__(self) -> str | None:
        if self._token is not None:
            raise RuntimeError("this cache_scope is already active; make a new one")
        self._token = _SCOPE.set(self.scope)
        return self.scope

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        token, self._token = self._token, None
        if token is not None:
            _SCOPE.reset(token)


# -- keys -------------------------------------------------------------------------------


def _key_default(value: Any) -> Any:
    """JSON for the argument values a filter may hold beyond JSON's own."""
    if isinstance(value, enum.Enum):
        return ["enum", type(value).__qualname__, _key_default(value.value)]
    if isinstance(value, bytes):
        return ["bytes", value.hex()]
    if isinstance(value, set | frozenset | tuple):
        items = sorted(map(repr, value)) if isinstance(value, set | frozenset) else list(value)
        return ["seq", items]
    return [type(value).__qualname__, repr(value)]


_KEY_ENCODER = json.JSONEncoder(sort_keys=True, default=_key_default)


def args_text(op: str, args: tuple[Any, ...]) -> str | None:
    """One operation's arguments as text (None: they cannot be keyed; do not cache).

    Types are kept apart (``1``, ``"1"`` and ``True`` write differently), so two calls
    share an entry only when the database would see the same values."""
    if op == "read":  # the id, already of the primary key's type
        key = args[0]
        return f"r{key}" if type(key) is str else f"r#{key}"
    try:
        return op + _KEY_ENCODER.encode(args)
    except (TypeError, ValueError):
        return None


def args_digest(op: str, args: tuple[Any, ...]) -> str | None:
    """`args_text`, hashed (for Redis keys, which should stay short)."""
    text = args_text(op, args)
    if text is None:
        return None
    return hashlib.blake2b(text.encode(), digest_size=20).hexdigest()


def _who(tenant: str | None, scope: str | None) -> str:
    """The tenant and scope as one key part (lengths first: no two pairs collide)."""
    t, s = tenant or "", scope or ""
    return f"{len(t)}.{t}{len(s)}.{s}" if (t or s) else "-"


# -- copies (memory) ---------------------------------------------------------------------


def _copy(value: Any) -> Any:
    """A deep copy of a JSON document (dicts and lists; the rest is immutable)."""
    kind = type(value)
    if kind is dict:
        return {k: _copy(v) if type(v) in (dict, list) else v for k, v in value.items()}
    if kind is list:
        return [_copy(v) if type(v) in (dict, list) else v for v in value]
    return value


class _Copier:
    """Copies of one model's results a caller may change without changing the cached
    value: every value of a record is immutable except the documents of its dict and
    list fields, which are copied deeply."""

    def __init__(self, model: ModelInfo) -> None:
        self._docs = tuple(f.name for f in model.fields if f.base_type in (dict, list))

    def record(self, r: dict[str, Any]) -> dict[str, Any]:
        out = dict(r)
        for name in self._docs:
            v = out.get(name)
            if v is not None:
                out[name] = _copy(v)
        return out

    def result(self, op: str, value: Any) -> Any:
        if op == "read":
            return self.record(value)
        if op == "count":
            return value
        out = dict(value)
        rec = self.record
        out["records"] = [rec(r) for r in value["records"]]
        if "scores" in out:
            out["scores"] = list(out["scores"])
        return out


# -- encoding (Redis): by the model's field types, never pickle -------------------------


def _enc_value(v: Any) -> Any:
    if v is None or type(v) in (str, int, float, bool, dict, list):
        return v
    if isinstance(v, enum.Enum):
        return v.value
    if isinstance(v, dt.datetime | dt.date):
        return v.isoformat()
    if isinstance(v, decimal.Decimal | uuid.UUID):
        return str(v)
    if isinstance(v, bytes):
        return base64.b64encode(v).decode()
    return v


def _decoder(bt: Any) -> Callable[[Any], Any] | None:
    if bt is dt.datetime:
        return dt.datetime.fromisoformat
    if bt is dt.date:
        return dt.date.fromisoformat
    if bt is decimal.Decimal:
        return decimal.Decimal
    if bt is uuid.UUID:
        return uuid.UUID
    if bt is bytes:
        return base64.b64decode
    if isinstance(bt, type) and issubclass(bt, enum.Enum):
        return bt
    return None


class _RecordCodec:
    """Records to JSON and back by the model's field types: a JSON document a user
    stored in a field comes back as it was, whatever keys it holds."""

    def __init__(self, model: ModelInfo) -> None:
        self._dec: dict[str, Callable[[Any], Any]] = {}
        for f in model.fields:
            d = _decoder(f.base_type)
            if d is not None:
                self._dec[f.name] = d

    def encode(self, op: str, result: Any) -> bytes:
        if op in ("list", "search"):
            out = dict(result)
            out["records"] = [{k: _enc_value(v) for k, v in r.items()} for r in result["records"]]
            return json.dumps(["page", out]).encode()
        if op == "read":
            return json.dumps(["record", {k: _enc_value(v) for k, v in result.items()}]).encode()
        return json.dumps(["value", result]).encode()

    def _record(self, r: dict[str, Any]) -> dict[str, Any]:
        dec = self._dec
        for k, v in r.items():
            d = dec.get(k)
            if d is not None and v is not None:
                r[k] = d(v)
        return r

    def decode(self, raw: bytes) -> Any:
        kind, value = json.loads(raw)
        if kind == "page":
            value["records"] = [self._record(r) for r in value["records"]]
            return value
        if kind == "record":
            return self._record(value)
        return value


# -- the caches ------------------------------------------------------------------------


Loader = Callable[[], Awaitable[Any]]


class QueryCache:
    """What ModelOps uses: `fetch` (a cached read, or the loader's result, stored) and
    `written` (a write committed: the model's entries are done). Counts its hits and
    misses (metrics read them)."""

    backend = ""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.hits = 0
        self.misses = 0

    async def fetch(
        self,
        model: ModelInfo,
        op: str,
        args: tuple[Any, ...],
        tenant: str | None,
        load: Loader,
    ) -> Any:
        raise NotImplementedError

    async def written(self, tables: set[str]) -> None:
        """Writes to `tables` committed: end their entries."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release connections (Redis)."""

    def stats(self) -> dict[str, Any]:
        return {"backend": self.backend, "hits": self.hits, "misses": self.misses}


class MemoryCache(QueryCache):
    """In this process, bounded (`max_entries`, least recently used first out) and
    timed (`ttl`). Only writes through this DataFlow invalidate it: replicas (and two
    DataFlow instances on one database) need `RedisCache`."""

    backend = "memory"

    def __init__(self, ttl: float, max_entries: int) -> None:
        super().__init__(ttl)
        self.max_entries = max_entries
        self._versions: dict[str, int] = {}
        self._entries: OrderedDict[tuple[str, int, str, str], tuple[float, Any]] = OrderedDict()
        self._copiers: dict[str, _Copier] = {}

    async def fetch(
        self,
        model: ModelInfo,
        op: str,
        args: tuple[Any, ...],
        tenant: str | None,
        load: Loader,
    ) -> Any:
        text = args_text(op, args)
        if text is None:
            return await load()
        name = model.table
        copier = self._copiers.get(name)
        if copier is None:
            copier = self._copiers[name] = _Copier(model)
        key = (name, self._versions.get(name, 0), _who(tenant, _SCOPE.get()), text)
        entries = self._entries
        found = entries.get(key)
        now = time.monotonic()
        if found is not None:
            if found[0] > now:
                entries.move_to_end(key)
                self.hits += 1
                return copier.result(op, found[1])
            del entries[key]
        self.misses += 1
        value = await load()
        if key[1] == self._versions.get(name, 0):  # no write completed meanwhile
            entries[key] = (now + self.ttl, copier.result(op, value))
            entries.move_to_end(key)
            while len(entries) > self.max_entries:
                entries.popitem(last=False)
        return value

    async def written(self, tables: set[str]) -> None:
        for name in tables:
            self._versions[name] = self._versions.get(name, 0) + 1

    def __len__(self) -> int:
        return len(self._entries)


# One round trip per lookup: the model's version (made when missing, as a fresh random
# token) and the entry stored under it.
_LOOKUP = """
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], ARGV[2], 'NX')
  v = redis.call('GET', KEYS[1])
end
return {v, redis.call('GET', ARGV[1] .. v .. ':' .. ARGV[3])}
"""


class RedisCache(QueryCache):
    """In Redis, shared by every DataFlow that uses the same Redis and key prefix (the
    replicas of a service). Keys: ``<prefix>:v:<model>`` (the version) and
    ``<prefix>:e:<model>:<version>:<tenant/scope>:<digest>`` (entries, with the TTL).
    Values are JSON written by the model's field types (never pickle: whoever can write
    to Redis must not be able to run code here).

    When Redis fails, reads go to the database (and are counted as misses); a failed
    invalidation is logged, and the entries it should have ended live at most the TTL.
    """

    backend = "redis"

    def __init__(self, url: str, prefix: str, ttl: float) -> None:
        super().__init__(ttl)
        try:
            import redis.asyncio as aioredis
        except ImportError as exc:  # pragma: no cover - a dependency of the package
            raise ValidationError(
                "cache_url", "a Redis cache needs the redis package (pip install redis)"
            ) from exc
        try:
            self._redis: Any = aioredis.Redis.from_url(url)
        except ValueError as exc:
            raise ValidationError("cache_url", f"not a Redis URL: {str(exc)[:120]}") from None
        self.prefix = prefix
        self._lookup = self._redis.register_script(_LOOKUP)
        self._codecs: dict[str, _RecordCodec] = {}
        self._ms = max(1, int(ttl * 1000))

    def _codec(self, model: ModelInfo) -> _RecordCodec:
        codec = self._codecs.get(model.table)
        if codec is None:
            codec = self._codecs[model.table] = _RecordCodec(model)
        return codec

    def _version_key(self, name: str) -> str:
        return f"{self.prefix}:v:{name}"

    async def fetch(
        self,
        model: ModelInfo,
        op: str,
        args: tuple[Any, ...],
        tenant: str | None,
        load: Loader,
    ) -> Any:
        digest = args_digest(op, args)
        if digest is None:
            return await load()
        name = model.table
        head = f"{self.prefix}:e:{name}:"
        tail = f"{_who(tenant, _SCOPE.get())}:{digest}"
        codec = self._codec(model)
        try:
            version, raw = await self._lookup(
                keys=[self._version_key(name)], args=[head, uuid.uuid4().hex, tail]
            )
        except Exception as exc:  # Redis down: the database answers
            _log.warning("cache lookup failed, reading the database: %s", type(exc).__name__)
            self.misses += 1
            return await load()
        if raw is not None:
            try:
                value = codec.decode(raw)
            except (ValueError, TypeError, KeyError):
                value = None  # not ours or damaged: read the database
            else:
                self.hits += 1
                return value
        self.misses += 1
        value = await load()
        try:
            key = f"{head}{version.decode()}:{tail}"
            await self._redis.set(key, codec.encode(op, value), px=self._ms)
        except Exception as exc:
            _log.warning("cache store failed: %s", type(exc).__name__)
        return value

    async def written(self, tables: set[str]) -> None:
        if not tables:
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for name in tables:
                    pipe.set(self._version_key(name), uuid.uuid4().hex)
                await pipe.execute()
        except Exception as exc:
            _log.error(
                "cache invalidation failed (%s): entries of %s may be served for up to %ss",
                type(exc).__name__,
                ", ".join(sorted(tables)),
                self.ttl,
            )

    async def close(self) -> None:
        await self._redis.aclose()


def default_prefix(url: str) -> str:
    """The key prefix of a database: DataFlows on one database share entries, DataFlows
    on two databases never do (the URL is hashed; no password reaches Redis)."""
    return "dataflow:" + hashlib.sha256(url.encode()).hexdigest()[:16]
