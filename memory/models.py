"""The data of a session: its turns and its state, and how they are encoded in L2.

A turn is encoded once, when it is committed, and never re-serialised: the log in
L2 is append-only, so what a checkpoint writes per turn does not grow with the
conversation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

SCHEMA_VERSION = 1

TurnStatus = Literal["complete", "failed", "interrupted"]


@dataclass(slots=True)
class Turn:
    index: int  # 1-based position in the session
    turn_id: str
    user: str
    assistant: str
    status: TurnStatus = "complete"
    # The memory block retrieved for this turn, rendered exactly as it was sent:
    # appended at the turn that used it, so earlier prompt tokens never move.
    memories: str | None = None
    created_at: float = 0.0
    usage: dict[str, Any] | None = None
    # Prompt tokens of this turn's messages, counted once at commit and stored,
    # so a session reloaded on an L1 miss is not tokenised again.
    n_tokens: int = -1

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "v": SCHEMA_VERSION,
                "i": self.index,
                "id": self.turn_id,
                "u": self.user,
                "a": self.assistant,
                "s": self.status,
                "m": self.memories,
                "t": self.created_at,
                "usage": self.usage,
                "n": self.n_tokens,
            }
        )

    @classmethod
    def decode(cls, raw: bytes | str) -> Turn:
        d = orjson.loads(raw)
        if d.get("v") != SCHEMA_VERSION:
            raise ValueError(f"unknown turn schema version {d.get('v')!r}")
        return cls(
            index=int(d["i"]),
            turn_id=d["id"],
            user=d["u"],
            assistant=d["a"],
            status=d["s"],
            memories=d.get("m"),
            created_at=float(d.get("t") or 0.0),
            usage=d.get("usage"),
            n_tokens=int(d.get("n", -1)),
        )

    def approx_bytes(self) -> int:
        return 96 + len(self.user) + len(self.assistant) + len(self.memories or "")


@dataclass(slots=True)
class SessionState:
    """What a pod holds of a session: the meta of L2 plus the live context's turns.

    ``version`` is the compare-and-set token: a commit succeeds only if L2 still
    has the version this state was loaded (or last committed) at.
    """

    tenant: str
    session_id: str
    user_id: str | None = None
    version: int = 0
    turn_count: int = 0
    archived_upto: int = 0  # last turn index stored in L3
    context_start: int = 1  # first turn index in the live context
    context_summary: str = ""  # summary rendered in the live context (set by compaction)
    summary: str = ""  # running summary of archived turns (set by archive)
    summary_upto: int = 0
    prefix_version: str = ""
    log_base: int = 1  # turn index of the first entry kept in the L2 list
    checkpoint_id: str = ""
    created_at: float = 0.0
    updated_at: float = 0.0
    turns: list[Turn] = field(default_factory=list)  # turns context_start..turn_count
    # Text of the previous prompt and reply as rendered, for prefix accounting.
    last_rendered: str | None = None

    @property
    def unarchived(self) -> int:
        return self.turn_count - self.archived_upto

    def approx_bytes(self) -> int:
        return (
            512
            + len(self.context_summary)
            + len(self.summary)
            + len(self.last_rendered or "")
            + sum(t.approx_bytes() for t in self.turns)
        )

    def meta_fields(self) -> dict[str, str]:
        """The meta hash as stored in L2 (all values as strings)."""
        return {
            "schema": str(SCHEMA_VERSION),
            "user_id": self.user_id or "",
            "version": str(self.version),
            "turn_count": str(self.turn_count),
            "archived_upto": str(self.archived_upto),
            "context_start": str(self.context_start),
            "context_summary": self.context_summary,
            "summary": self.summary,
            "summary_upto": str(self.summary_upto),
            "prefix_version": self.prefix_version,
            "log_base": str(self.log_base),
            "checkpoint_id": self.checkpoint_id,
            "created_at": repr(self.created_at),
            "updated_at": repr(self.updated_at),
        }

    def checkpoint_values(self) -> dict[str, Any]:
        """The session as LangGraph channel values: small and of bounded size."""
        return {
            "user_id": self.user_id,
            "version": self.version,
            "turn_count": self.turn_count,
            "archived_upto": self.archived_upto,
            "context_start": self.context_start,
            "summary_upto": self.summary_upto,
            "prefix_version": self.prefix_version,
        }

    @classmethod
    def from_meta(cls, tenant: str, session_id: str, meta: dict[str, str]) -> SessionState:
        if meta and meta.get("schema", str(SCHEMA_VERSION)) != str(SCHEMA_VERSION):
            raise ValueError(f"unknown session schema version {meta.get('schema')!r}")

        def i(name: str, default: int = 0) -> int:
            v = meta.get(name)
            return int(v) if v else default

        def f(name: str) -> float:
            v = meta.get(name)
            return float(v) if v else 0.0

        return cls(
            tenant=tenant,
            session_id=session_id,
            user_id=meta.get("user_id") or None,
            version=i("version"),
            turn_count=i("turn_count"),
            archived_upto=i("archived_upto"),
            context_start=i("context_start", 1),
            context_summary=meta.get("context_summary", ""),
            summary=meta.get("summary", ""),
            summary_upto=i("summary_upto"),
            prefix_version=meta.get("prefix_version", ""),
            log_base=i("log_base", 1),
            checkpoint_id=meta.get("checkpoint_id", ""),
            created_at=f("created_at"),
            updated_at=f("updated_at"),
        )
