"""The events a turn sends its client, as typed objects.

Nodes create these and hand them to the turn's sink (``TurnControl.emit``); only
``app/sse.py`` turns them into bytes (SSE frames), and only there do field names
become a wire format. Each event knows its SSE ``name`` and its ``data()``, the
JSON object the client reads.

The order of one turn: ``meta``, then ``memory`` (when long-term memory was used),
then per LLM step ``token``... and, when the step calls tools, a ``tool_call``
per call and a ``tool_result`` per call (in call order once the step's calls are
done), then ``done`` or ``error``. ``skill`` follows the ``tool_result`` of a
``skills__load`` call, or comes before the first token when the detector picked it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(frozen=True, slots=True)
class Meta:
    name: ClassVar[str] = "meta"
    turn_id: str
    session_id: str
    turn: int
    l1_hit: bool | None = None
    dev_llm: bool | None = None
    replayed: bool = False
    # What answers the turn (the LLM client's name; the embedded engine's includes
    # its model), so a client can tell a real model from the development one.
    model: str | None = None
    # The agent profile that answers (graph/agents.py).
    agent: str | None = None

    def data(self) -> dict[str, Any]:
        d: dict[str, Any] = {"turn_id": self.turn_id, "session_id": self.session_id,
                             "turn": self.turn}  # fmt: skip
        if self.replayed:
            d["replayed"] = True
        else:
            d["l1_hit"] = self.l1_hit
            d["dev_llm"] = self.dev_llm
            if self.model is not None:
                d["model"] = self.model
            if self.agent is not None:
                d["agent"] = self.agent
        return d


@dataclass(frozen=True, slots=True)
class Token:
    name: ClassVar[str] = "token"
    text: str

    def data(self) -> dict[str, Any]:
        return {"text": self.text}


@dataclass(frozen=True, slots=True)
class Memory:
    """Long-term memories the turn used. One shape wherever they come from:
    ``source`` is ``l3`` (searched now), ``cache`` (the L2 retrieval cache) or
    ``replay`` (a stored turn sent again); ``memories`` are the hits, each
    ``{batch_id, session_id, first_turn, last_turn, text, score}``."""

    name: ClassVar[str] = "memory"
    source: str
    memories: list[dict[str, Any]]

    def data(self) -> dict[str, Any]:
        return {"source": self.source, "memories": self.memories}


@dataclass(frozen=True, slots=True)
class ToolCalled:
    """The model called a tool: ``arguments`` is the JSON text it wrote."""

    name: ClassVar[str] = "tool_call"
    id: str
    tool: str
    arguments: str

    def data(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.tool, "arguments": self.arguments}


@dataclass(frozen=True, slots=True)
class ToolResult:
    """What a tool call gave the model; ``content`` is cut for the stream
    (``truncated`` then says so); the model got it whole, up to its own cap."""

    name: ClassVar[str] = "tool_result"
    id: str
    tool: str
    ok: bool
    content: str
    truncated: bool = False

    def data(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "name": self.tool, "ok": self.ok,
                             "content": self.content}  # fmt: skip
        if self.truncated:
            d["truncated"] = True
        return d


@dataclass(frozen=True, slots=True)
class SkillUsed:
    """A skill's body entered the turn: loaded by the model (``how: "tool"``,
    after its ``tool_result``) or picked by the detector before the LLM call
    (``"detected"``, before the first token)."""

    name: ClassVar[str] = "skill"
    skill: str
    version: str
    how: str

    def data(self) -> dict[str, Any]:
        return {"name": self.skill, "version": self.version, "how": self.how}


@dataclass(frozen=True, slots=True)
class Done:
    """The turn is stored (or was already: ``status`` ``duplicate``, or a replay)."""

    name: ClassVar[str] = "done"
    turn_id: str
    turn: int
    status: str
    usage: dict[str, Any]
    version: int | None = None
    replayed: bool = False
    interrupted_by: str | None = None
    # An LLM that failed after some text: the turn is stored, interrupted.
    error: dict[str, Any] | None = None

    def data(self) -> dict[str, Any]:
        d: dict[str, Any] = {"turn_id": self.turn_id, "turn": self.turn, "status": self.status,
                             "usage": self.usage}  # fmt: skip
        if self.version is not None:
            d["version"] = self.version
        if self.replayed:
            d["replayed"] = True
        if self.interrupted_by:
            d["interrupted_by"] = self.interrupted_by
        if self.error:
            d["error"] = {"code": self.error["code"], "message": self.error["message"]}
            d["retryable"] = bool(self.error.get("retryable"))
        return d


@dataclass(frozen=True, slots=True)
class Error:
    """The turn did not complete. Always ``{"error": {"code", "message"},
    "retryable"}``, plus the turn fields it has (a turn that failed after the
    LLM was called is stored: its ``turn_id``, ``turn``, ``status``, ``usage``)."""

    name: ClassVar[str] = "error"
    code: str
    message: str
    retryable: bool
    turn: dict[str, Any] = field(default_factory=dict)

    def data(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message},
                "retryable": self.retryable, **self.turn}  # fmt: skip


TurnEvent = Meta | Token | Memory | ToolCalled | ToolResult | SkillUsed | Done | Error

__all__ = ["Done", "Error", "Memory", "Meta", "SkillUsed", "Token", "ToolCalled", "ToolResult",
           "TurnEvent"]  # fmt: skip
