"""The state of one turn as it flows through the graph, and the turn's controls.

The turn graph keeps per-turn values only; the session's durable state lives in
L1/L2 (``memory.models.SessionState``) and the log in L2. So nothing here grows
with the conversation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

from memory.context import ContextPlan
from memory.models import SessionState, Turn, TurnStatus

ClientEvent = dict[str, Any]


@dataclass(eq=False)
class TurnControl:
    """The turn's line to its client, and the app's hand on it.

    ``emit`` takes each client event (``{"event": ..., "data": {...}}``) the
    moment a node has it: a direct call, not LangGraph's stream, whose queue
    and per-chunk wake-ups would sit between every token and the client.
    ``stop`` lets the app end a turn's generation (client gone, drain deadline)
    while the graph still commits what was generated.
    """

    emit: Callable[[ClientEvent], None]
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    reason: str | None = None

    def stop(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        self.cancel.set()


@dataclass(frozen=True)
class TurnInput:
    tenant: str
    session_id: str
    user_id: str
    message: str
    turn_id: str
    retrieve: Literal["auto", "always", "never"] = "auto"
    # The client chose turn_id (a retry may follow): look for a stored turn first.
    client_turn_id: bool = False


class TurnState(TypedDict, total=False):
    input: TurnInput
    control: TurnControl
    started: float
    session: SessionState
    l1_hit: bool
    replayed: bool
    # Index of a failed turn this request retries in place.
    retry_of: int | None
    need_memory: bool
    memories: list[dict[str, Any]]
    memory_block: str | None
    plan: ContextPlan
    reply: str
    status: TurnStatus
    error: dict[str, Any] | None
    llm_usage: dict[str, Any]
    ttft_ms: float | None
    replica: str | None
    route_moved: bool
    committed: Turn
    version: int
    archive_batch: str | None
    timings: dict[str, float]


class TurnOutput(TypedDict, total=False):
    """What a run returns: what the runner and its callers read after the turn.
    (LangGraph reads the output channels after every step, so fewer is cheaper.)"""

    session: SessionState
    status: TurnStatus
    committed: Turn
    version: int
    archive_batch: str | None
    replayed: bool
    timings: dict[str, float]
