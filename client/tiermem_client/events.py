"""The events of a turn, as typed objects.

Each is a frozen dataclass with the SSE event name (``.event``), its JSON
payload (``.data``, exactly as the server sent it) and the SSE id
(``.id``, ``<turn_id>:<seq>``), plus typed accessors for the fields the server
documents. ``ResetEvent`` is the client's own (see the package README,
*Resumption*): it never comes from the server.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Event:
    """One event of a turn's stream. Events the client does not know come as
    this base class, with their name and data as sent."""

    event: str
    data: dict[str, Any]
    id: str | None = None


@dataclass(frozen=True, slots=True)
class MetaEvent(Event):
    """The turn started (or, with ``replayed``, is sent again from storage)."""

    @property
    def turn_id(self) -> str:
        return str(self.data.get("turn_id", ""))

    @property
    def session_id(self) -> str:
        return str(self.data.get("session_id", ""))

    @property
    def turn(self) -> int:
        return int(self.data.get("turn", 0))

    @property
    def replayed(self) -> bool:
        return bool(self.data.get("replayed", False))

    @property
    def agent(self) -> str | None:
        agent = self.data.get("agent")
        return None if agent is None else str(agent)


@dataclass(frozen=True, slots=True)
class TokenEvent(Event):
    """A piece of the reply's text."""

    @property
    def text(self) -> str:
        return str(self.data.get("text", ""))


@dataclass(frozen=True, slots=True)
class MemoryEvent(Event):
    """Long-term memories the turn used."""

    @property
    def source(self) -> str:
        return str(self.data.get("source", ""))

    @property
    def memories(self) -> list[dict[str, Any]]:
        return list(self.data.get("memories") or [])


@dataclass(frozen=True, slots=True)
class ToolCallEvent(Event):
    """The model called a tool (``arguments`` is the JSON text it wrote)."""

    @property
    def call_id(self) -> str:
        return str(self.data.get("id", ""))

    @property
    def name(self) -> str:
        return str(self.data.get("name", ""))

    @property
    def arguments(self) -> str:
        return str(self.data.get("arguments", ""))


@dataclass(frozen=True, slots=True)
class ToolResultEvent(Event):
    """What a tool call gave the model (cut for the stream when ``truncated``)."""

    @property
    def call_id(self) -> str:
        return str(self.data.get("id", ""))

    @property
    def name(self) -> str:
        return str(self.data.get("name", ""))

    @property
    def ok(self) -> bool:
        return bool(self.data.get("ok", False))

    @property
    def content(self) -> str:
        return str(self.data.get("content", ""))

    @property
    def truncated(self) -> bool:
        return bool(self.data.get("truncated", False))


@dataclass(frozen=True, slots=True)
class SkillEvent(Event):
    """A skill's body entered the turn."""

    @property
    def name(self) -> str:
        return str(self.data.get("name", ""))

    @property
    def version(self) -> str:
        return str(self.data.get("version", ""))

    @property
    def how(self) -> str:
        return str(self.data.get("how", ""))


@dataclass(frozen=True, slots=True)
class DoneEvent(Event):
    """The turn is stored: the stream's last event."""

    @property
    def turn_id(self) -> str:
        return str(self.data.get("turn_id", ""))

    @property
    def turn(self) -> int:
        return int(self.data.get("turn", 0))

    @property
    def status(self) -> str:
        return str(self.data.get("status", ""))

    @property
    def usage(self) -> dict[str, Any]:
        return dict(self.data.get("usage") or {})

    @property
    def replayed(self) -> bool:
        return bool(self.data.get("replayed", False))


@dataclass(frozen=True, slots=True)
class ErrorEvent(Event):
    """The turn did not complete. The client never yields these: a retryable
    one is retried, any other raises a ``TiermemError``."""

    @property
    def code(self) -> str:
        err = self.data.get("error")
        return str(err.get("code", "")) if isinstance(err, dict) else ""

    @property
    def message(self) -> str:
        err = self.data.get("error")
        return str(err.get("message", "")) if isinstance(err, dict) else ""

    @property
    def retryable(self) -> bool:
        return bool(self.data.get("retryable", False))


@dataclass(frozen=True, slots=True)
class ResetEvent(Event):
    """The client's own event (``event == "reset"``, ``id`` None): a retried or
    resumed attempt produced a reply that does not continue the text yielded so
    far (the server generated it again, e.g. after a drain). ``text`` is the
    reply as it stands now: replace what you have shown with it; later tokens
    append to it."""

    @property
    def text(self) -> str:
        return str(self.data.get("text", ""))

    @property
    def reason(self) -> str:
        return str(self.data.get("reason", ""))


EVENT_TYPES: dict[str, type[Event]] = {
    "meta": MetaEvent,
    "token": TokenEvent,
    "memory": MemoryEvent,
    "tool_call": ToolCallEvent,
    "tool_result": ToolResultEvent,
    "skill": SkillEvent,
    "done": DoneEvent,
    "error": ErrorEvent,
}


def make_event(event: str, data: dict[str, Any], id: str | None = None) -> Event:
    """The typed event for an SSE event name (the base ``Event`` if unknown)."""
    return EVENT_TYPES.get(event, Event)(event, data, id)
