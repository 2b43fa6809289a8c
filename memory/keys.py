"""Redis key layout of L2, in one place.

Every key of one session shares the hash tag ``{<tenant>:<session>}`` so that a
Lua script or MULTI/EXEC touching several of them runs on one Redis Cluster slot.
Ids are validated before they get here (``validate_id``): no ``{``, ``}``, ``*``,
``:`` or NUL can reach a key, so one session can never address another's keys.
Per-tenant keys (the rate limits, ``RateLimitKeys``) use the hash tag
``{<tenant>}`` instead: both limits of a tenant are checked by one script.

| key | type | holds | TTL |
|---|---|---|---|
| ``tm:{t:s}:meta`` | hash | session state: version, counters, cursors, summaries | session TTL |
| ``tm:{t:s}:log`` | list | append-only turn log (one JSON entry per turn) | session TTL |
| ``tm:{t:s}:turn:<turn_id>`` | string | idempotency record of a turn (index) | turn TTL |
| ``tm:{t:s}:lease:archive`` | string | archive lease holder | lease length |
| ``tm:{t:s}:batch:<batch_id>`` | hash | batch outbox record | none until L3 confirms; 1 day |
| ``tm:{t:s}:cp:<ns>:<checkpoint_id>`` | string | LangGraph checkpoint record | session TTL |
| ``tm:{t:s}:cpidx:<ns>`` | zset | checkpoint ids of a namespace (lex order) | session TTL |
| ``tm:{t:s}:cpw:<ns>:<checkpoint_id>`` | hash | LangGraph pending writes | session TTL |
| ``tm:{t:s}:cpns`` | set | checkpoint namespaces of the thread | session TTL |
| ``tm:{t:s}:c:<kind>:<sha256>`` | string | a session's cache entry (memory/cache.py) | by kind |
| ``tm:c:{t}:<kind>:<sha256>`` | string | a tenant's cache entry | by kind |
| ``tm:c:shared:<kind>:<sha256>`` | string | a cache entry of every tenant (embeddings) | by kind |
| ``<cache entry key>:lease`` | string | single-flight lease of that entry | lease length |
| ``tm:rl:{t}:turns`` | zset | turns a tenant started in the last 60 s | 61 s |
| ``tm:rl:{t}:streams`` | zset | a tenant's running streams, by lease deadline | 2 x lease |
"""

from __future__ import annotations

import re

from infra.errors import InvalidInput

ID_PATTERN = r"^[A-Za-z0-9._-]{1,128}$"
_ID_RE = re.compile(ID_PATTERN)

PREFIX = "tm"


class InvalidId(InvalidInput, ValueError):
    """An id that could escape its key or filter (braces, wildcards, quotes, NUL...)."""

    code = "invalid_id"


def validate_id(value: str, what: str) -> str:
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise InvalidId(f"{what} must match [A-Za-z0-9._-]{{1,128}}")
    return value


def thread_id(tenant: str, session: str) -> str:
    """LangGraph thread id of a session: ``{tenant}:{session}``."""
    return f"{validate_id(tenant, 'tenant')}:{validate_id(session, 'session_id')}"


def split_thread_id(thread: str) -> tuple[str, str]:
    tenant, sep, session = thread.partition(":")
    if not sep:
        raise InvalidId("thread id must be '<tenant>:<session>'")
    return validate_id(tenant, "tenant"), validate_id(session, "session_id")


def tag(thread: str) -> str:
    """The key prefix ``tm:{<tenant>:<session>}`` shared by all keys of a thread."""
    split_thread_id(thread)
    return f"{PREFIX}:{{{thread}}}"


class SessionKeys:
    """All L2 keys of one session."""

    __slots__ = ("base", "session", "tenant", "thread")

    def __init__(self, tenant: str, session: str) -> None:
        self.tenant = validate_id(tenant, "tenant")
        self.session = validate_id(session, "session_id")
        self.thread = f"{tenant}:{session}"
        self.base = f"{PREFIX}:{{{self.thread}}}"

    @property
    def meta(self) -> str:
        return f"{self.base}:meta"

    @property
    def log(self) -> str:
        return f"{self.base}:log"

    @property
    def archive_lease(self) -> str:
        return f"{self.base}:lease:archive"

    @property
    def cp_namespaces(self) -> str:
        return f"{self.base}:cpns"

    def turn(self, turn_id: str) -> str:
        return f"{self.base}:turn:{validate_id(turn_id, 'turn_id')}"

    def tool_steps(self, turn_id: str) -> str:
        """The tool steps a turn has run (graph/nodes.py), before it is committed."""
        return f"{self.base}:tools:{validate_id(turn_id, 'turn_id')}"

    @property
    def forgotten(self) -> str:
        """Set while a forgotten session's id is refused (memory/forget.py): a turn
        in flight when it was forgotten cannot commit, an archive in flight
        deletes what it wrote."""
        return f"{self.base}:forgotten"

    def batch(self, batch_id: str) -> str:
        return f"{self.base}:batch:{batch_id}"

    def cp(self, ns: str, checkpoint_id: str) -> str:
        return f"{self.base}:cp:{ns}:{checkpoint_id}"

    def cp_index(self, ns: str) -> str:
        return f"{self.base}:cpidx:{ns}"

    def cp_writes(self, ns: str, checkpoint_id: str) -> str:
        return f"{self.base}:cpw:{ns}:{checkpoint_id}"


class RateLimitKeys:
    """The rate-limit keys of one tenant (memory/rate_limits.py), one hash tag."""

    __slots__ = ("base", "tenant")

    def __init__(self, tenant: str) -> None:
        self.tenant = validate_id(tenant, "tenant")
        self.base = f"{PREFIX}:rl:{{{self.tenant}}}"

    @property
    def turns(self) -> str:
        return f"{self.base}:turns"

    @property
    def streams(self) -> str:
        return f"{self.base}:streams"


class TenantKeys:
    """The session index of one tenant (newest first), one hash tag: the tenant's."""

    __slots__ = ("base", "tenant")

    def __init__(self, tenant: str) -> None:
        self.tenant = validate_id(tenant, "tenant")
        self.base = f"{PREFIX}:idx:{{{self.tenant}}}"

    @property
    def sessions(self) -> str:
        """Sorted set: session id -> created_at."""
        return f"{self.base}:sessions"

    def user_sessions(self, user_id: str) -> str:
        """Sorted set: the user's session ids -> created_at."""
        return f"{self.base}:user:{validate_id(user_id, 'user_id')}"


META_SCAN_PATTERN = f"{PREFIX}:{{*}}:meta"

# Pub/sub channel (not a key): every commit publishes "<meta key> <version>
# <writer pod> <holders...>" on it, so pods drop stale L1 copies, and listed
# holders answer "ack <writer> <meta key> <version> <holder>" (memory/sessions.py).
INVALIDATION_CHANNEL = f"{PREFIX}:l1:invalidate"
# First word of a holder's acknowledgement on that channel (never a meta key).
ACK_TAG = "ack"


def thread_of_meta_key(key: str) -> tuple[str, str] | None:
    """(tenant, session) of a ``tm:{<tenant>:<session>}:meta`` key, or None."""
    if not key.startswith(f"{PREFIX}:{{") or not key.endswith("}:meta"):
        return None
    try:
        return split_thread_id(key[len(PREFIX) + 2 : -len("}:meta")])
    except InvalidId:
        return None


class CacheKeys:
    """Keys of the cache layer (memory/cache.py): a session's entries share its
    hash tag (deleted with it), a tenant's entries the tenant's."""

    __slots__ = ("base",)

    def __init__(self, tenant: str | None, session: str | None = None) -> None:
        if tenant is None:
            # Shared by every tenant (embeddings): no hash tag, so a cluster
            # spreads the entries over all its slots.
            self.base = f"{PREFIX}:c:shared"
        elif session is None:
            self.base = f"{PREFIX}:c:{{{validate_id(tenant, 'tenant')}}}"
        else:
            validate_id(tenant, "tenant")
            self.base = f"{PREFIX}:{{{tenant}:{validate_id(session, 'session_id')}}}:c"

    def entry(self, kind: str, digest: str) -> str:
        return f"{self.base}:{kind}:{digest}"

    @staticmethod
    def lease_of(entry: str) -> str:
        return f"{entry}:lease"
