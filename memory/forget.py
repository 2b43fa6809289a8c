"""Forgetting: a user's long-term memories, a session, or everything of a user.

The one owner of deletion. Each operation says what it removed, is idempotent (a
second call removes nothing and succeeds), and logs ids and counts, never content.

Order, so nothing comes back:

1. a forgotten session's id gets a marker in L2 (``SessionKeys.forgotten``, kept
   ``TIERMEM_FORGET_GUARD_S``): the commit script refuses a turn of that session
   while it is there (a turn in flight ends with ``session_forgotten``), and an
   archive in flight, which checks it after its upsert, deletes what it wrote;
2. the session's L2 keys go, and every pod drops its L1 copy (a version newer
   than any is published on the invalidation channel);
3. its L3 rows go (after the marker: an upsert racing the delete either lands
   before it, and is deleted, or sees the marker).

A user is found through the session index (``GET /v1/sessions``); sessions the
index missed (made before it existed, or whose first turn could not index them)
are found by a scan of the sessions' meta (forgetting is rare; a scan is O(keyspace)).
"""

from __future__ import annotations

import logging
from typing import Any

from memory.l2_store import L2Error, L2Store
from memory.l3_store import L3Store
from memory.sessions import Sessions, StorageUnavailable

log = logging.getLogger("tiermem.forget")


class Forgetter:
    def __init__(self, sessions: Sessions, l2: L2Store, l3: L3Store, *, guard_s: int) -> None:
        self.sessions = sessions
        self.l2 = l2
        self.l3 = l3
        self.guard_s = guard_s

    async def session(self, tenant: str, session_id: str) -> dict[str, Any]:
        """Its L2 keys, its L1 copies on every pod, its L3 batches."""
        removed = await self.sessions.forget(tenant, session_id, self.guard_s)
        memories = await self.l3.delete_session(tenant, session_id)
        log.info(
            "session forgotten",
            extra={
                "tenant": tenant,
                "session": session_id,
                "l2_keys": removed["l2_keys"],
                "l3_rows": memories,
            },
        )
        return {
            "session_id": session_id,
            "removed": {"l2_keys": removed["l2_keys"], "memories": memories},
        }

    async def user_memories(self, tenant: str, user_id: str) -> dict[str, Any]:
        """The user's L3 rows and the cached retrievals of the user's sessions;
        the sessions themselves stay."""
        sessions = await self._sessions_of(tenant, user_id)
        cached = 0
        try:
            for session_id in sessions:
                cached += await self.l2.drop_cached(tenant, session_id, "retrieval")
        except L2Error as exc:
            raise StorageUnavailable(str(exc)) from exc
        memories = await self.l3.delete_user(tenant, user_id)
        log.info(
            "user memories forgotten",
            extra={"tenant": tenant, "user": user_id, "l3_rows": memories, "caches": cached},
        )
        return {"user_id": user_id, "removed": {"memories": memories, "cached_retrievals": cached}}

    async def user(self, tenant: str, user_id: str) -> dict[str, Any]:
        """Everything of the user in the tenant: every session, its L3 rows."""
        sessions = await self._sessions_of(tenant, user_id)
        l2_keys = 0
        memories = 0
        for session_id in sessions:
            removed = await self.session(tenant, session_id)
            l2_keys += removed["removed"]["l2_keys"]
            memories += removed["removed"]["memories"]
        memories += await self.l3.delete_user(tenant, user_id)
        try:
            await self.l2.drop_user_index(tenant, user_id)
        except L2Error as exc:
            raise StorageUnavailable(str(exc)) from exc
        log.info(
            "user forgotten",
            extra={
                "tenant": tenant,
                "user": user_id,
                "sessions": len(sessions),
                "l3_rows": memories,
            },
        )
        return {
            "user_id": user_id,
            "removed": {"sessions": sorted(sessions), "l2_keys": l2_keys, "memories": memories},
        }

    async def _sessions_of(self, tenant: str, user_id: str) -> set[str]:
        try:
            found = set(await self.l2.user_sessions(tenant, user_id))
            async for t, session_id, _meta in self.l2.scan_sessions():
                if t != tenant or session_id in found:
                    continue
                meta = await self.l2.read_meta(t, session_id)
                if meta is not None and meta.user_id == user_id:
                    found.add(session_id)
        except L2Error as exc:
            raise StorageUnavailable(str(exc)) from exc
        return found
