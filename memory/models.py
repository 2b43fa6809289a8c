"""The data of a session: its turns and its state, and how they are encoded in L2.

A turn is encoded once, when it is committed, and never re-serialised: the log in
L2 is append-only, so what a checkpoint writes per turn does not grow with the
conversation.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

# Turn records: v1 held one user string and one assistant string; v2 holds the
# turn's OpenAI-format messages. Session meta: v1 and v2 have the same fields.
SCHEMA_VERSION = 2
READABLE_SCHEMAS = ("1", "2")

TurnStatus = Literal["complete", "failed", "interrupted"]

# (length in characters, digest) of a prompt + reply: what the next turn's prefix
# accounting checks its prompt against (memory.context.ContextBuilder.after_reply).
RenderedMark = tuple[int, bytes]

# One OpenAI-format chat message: {"role": "user"|"assistant"|"tool"|"system",
# "content": str | None, "tool_calls": [...], "tool_call_id": str, "name": str}.
# Plain dicts: they are stored, checkpointed and sent to the LLM as they are.
Message = dict[str, Any]


def _v1_messages(user: str, assistant: str, status: str) -> list[Message]:
    msgs: list[Message] = [{"role": "user", "content": user}]
    # A failed v1 turn stored an empty reply: it never had an assistant message.
    if status != "failed" or assistant:
        msgs.append({"role": "assistant", "content": assistant})
    return msgs


# CPython's small-object allocator hands out blocks in multiples of 16 bytes.
_FLOAT = 32


def _alloc(n: int) -> int:
    return (n + 15) & ~15


def _size_of(obj: Any, depth: int = 0) -> int:
    """Bytes of ``obj`` and what it holds, as CPython allocates them: JSON-like
    values (str, numbers, lists, tuples, dicts). Dict keys are not counted: a
    message's and a usage dict's keys are the same interned strings in every
    turn. ``None``, booleans and the empty string are shared singletons."""
    if obj is None or obj is True or obj is False or (type(obj) is str and not obj):
        return 0
    size = _alloc(sys.getsizeof(obj))
    if depth > 8:
        return size
    if isinstance(obj, dict):
        size += sum(_size_of(v, depth + 1) for v in obj.values())
    elif isinstance(obj, list | tuple):
        size += sum(_size_of(v, depth + 1) for v in obj)
    return size


@dataclass(slots=True)
class Turn:
    """One turn: the user's message, then the assistant's messages (with any
    ``tool_calls``) and the ``tool`` results between them, in order."""

    index: int  # 1-based position in the session
    turn_id: str
    messages: list[Message]
    status: TurnStatus = "complete"
    # The blocks joined to this turn's user message, rendered exactly as they
    # were sent: the detected skills' bodies, then the retrieved memories;
    # appended at the turn that used them, so earlier prompt tokens never move.
    memories: str | None = None
    created_at: float = 0.0
    usage: dict[str, Any] | None = None
    # Prompt tokens of this turn's messages, counted once at commit and stored,
    # so a session reloaded on an L1 miss is not tokenised again.
    n_tokens: int = -1
    # The hits that made ``memories`` (batch ids, turn ranges, text, score): what
    # a replay sends as its ``memory`` event.
    memory_hits: list[dict[str, Any]] | None = None

    @classmethod
    def of_text(cls, index: int, turn_id: str, user: str, assistant: str, **kw: Any) -> Turn:
        """A plain turn: one user message and one text reply."""
        return cls(index, turn_id, _v1_messages(user, assistant, kw.get("status", "complete")),
                   **kw)  # fmt: skip

    @property
    def user(self) -> str:
        """The user's message of the turn."""
        for m in self.messages:
            if m.get("role") == "user":
                return str(m.get("content") or "")
        return ""

    @property
    def assistant(self) -> str:
        """The assistant's text of the turn (all its text messages, in order)."""
        return "\n".join(
            str(m["content"])
            for m in self.messages
            if m.get("role") == "assistant" and m.get("content")
        )

    @property
    def tool_messages(self) -> list[Message]:
        return [m for m in self.messages if m.get("role") == "tool"]

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "v": SCHEMA_VERSION,
                "i": self.index,
                "id": self.turn_id,
                "msgs": self.messages,
                "s": self.status,
                "m": self.memories,
                "mh": self.memory_hits,
                "t": self.created_at,
                "usage": self.usage,
                "n": self.n_tokens,
            }
        )

    @classmethod
    def decode(cls, raw: bytes | str) -> Turn:
        """Reads every schema version ever written (v1: user/assistant strings)."""
        d = orjson.loads(raw)
        v = d.get("v")
        if v == 2:
            messages = list(d["msgs"])
        elif v == 1:
            messages = _v1_messages(d["u"], d["a"], d["s"])
        else:
            raise ValueError(f"unknown turn schema version {v!r}")
        return cls(
            index=int(d["i"]),
            turn_id=d["id"],
            messages=messages,
            status=d["s"],
            memories=d.get("m"),
            created_at=float(d.get("t") or 0.0),
            usage=d.get("usage"),
            n_tokens=int(d.get("n", -1)),
            memory_hits=d.get("mh"),
        )

    def approx_bytes(self) -> int:
        """The memory this turn's objects take in this process: the object, its
        message dicts and their strings, usage, memory hits (see ``_size_of``)."""
        return (
            _alloc(sys.getsizeof(self))
            + _size_of(self.turn_id)
            + _size_of(self.messages)
            + _size_of(self.memories)
            + _size_of(self.usage)
            + _size_of(self.memory_hits)
            + _FLOAT  # created_at (index and n_tokens: small ints, or 32 bytes each)
        )


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
    # The agent profile that answers the session (graph/agents.py), fixed at turn 1.
    agent: str = ""
    log_base: int = 1  # turn index of the first entry kept in the L2 list
    checkpoint_id: str = ""
    created_at: float = 0.0
    updated_at: float = 0.0
    turns: list[Turn] = field(default_factory=list)  # turns context_start..turn_count
    # The previous prompt + reply as sent, for prefix accounting: its length in
    # characters and a digest, never a second copy of the text (memory.context).
    last_rendered: RenderedMark | None = None

    @property
    def unarchived(self) -> int:
        return self.turn_count - self.archived_upto

    def approx_bytes(self, turn_bytes: Callable[[Turn], int] = Turn.approx_bytes) -> int:
        """The memory this session's objects take in this process (what L1 holds
        of it): the object and its strings, the turn list and each turn (sized by
        ``turn_bytes``: L1 keeps each turn's size), the prefix-accounting mark.
        Measured against ``tracemalloc`` in tests/unit/test_l1_accounting.py."""
        size = _alloc(sys.getsizeof(self)) + 4 * _FLOAT  # + numbers: versions, times
        for text in (self.tenant, self.session_id, self.user_id, self.context_summary,
                     self.summary, self.prefix_version, self.checkpoint_id):  # fmt: skip
            size += _size_of(text)
        size += _alloc(sys.getsizeof(self.turns)) + sum(map(turn_bytes, self.turns))
        if self.last_rendered is not None:
            size += _size_of(self.last_rendered)
        return size

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
            "agent": self.agent,
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
        if meta and meta.get("schema", str(SCHEMA_VERSION)) not in READABLE_SCHEMAS:
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
            agent=meta.get("agent", ""),
            log_base=i("log_base", 1),
            checkpoint_id=meta.get("checkpoint_id", ""),
            created_at=f("created_at"),
            updated_at=f("updated_at"),
        )
