"""The turn graph's state, its runtime context, and the turn's controls.

State and context are split the way LangGraph means them (``context_schema``):

- ``TurnState`` is data only: ids, this turn's messages, usage, flags, plain
  JSON-able values. LangGraph's serde round-trips it after every step, and the
  checkpoint the commit writes holds exactly these channels, so LangGraph tools
  can read a thread and a graph can resume from it. Nothing in it grows with the
  conversation: the log lives in L2, the hot session in L1.
- ``TurnContext`` holds the per-run objects: the collaborators, the client's
  event sink and cancellation (``TurnControl``), and ``TurnRun``, the live
  objects of this run (the L1 session the facade hands out, the prompt plan, the
  LLM stream already under way).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypedDict

from graph.events import TurnEvent

if TYPE_CHECKING:
    from graph.agents import AgentProfile
    from graph.nodes import TurnDeps
    from graph.reply import ReplyStream
    from graph.tools import ToolSet
    from memory.context import ContextPlan
    from memory.models import SessionState

RetrieveMode = Literal["auto", "always", "never"]


@dataclass(eq=False)
class TurnControl:
    """The turn's line to its client, and the app's hand on it.

    ``emit`` takes each client event the moment a node has it: a direct call,
    not LangGraph's stream, whose queue and per-chunk wake-ups would sit between
    every token and the client. ``stop`` lets the app end a turn's generation
    (client gone, drain deadline) while the graph still commits what was
    generated.

    ``underway`` is set once the turn's first LLM request is on its way, or the
    turn is about to wait on something slow before it (another turn of the
    session, an L3 search, skill detection), or it has ended. The app starts
    the HTTP response only then: the response start (headers through the ASGI
    stack, about half a millisecond of the loop) then overlaps the LLM's
    prefill instead of running between LangGraph's steps ahead of the request.
    """

    emit: Callable[[TurnEvent], None]
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    reason: str | None = None
    underway: asyncio.Event = field(default_factory=asyncio.Event)

    def stop(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        self.cancel.set()


@dataclass(frozen=True)
class TurnInput:
    """A turn as the app hands it to the graph (validated already)."""

    tenant: str
    session_id: str
    user_id: str
    message: str
    turn_id: str
    retrieve: RetrieveMode = "auto"
    # The client chose turn_id (a retry may follow): look for a stored turn first.
    client_turn_id: bool = False
    # The agent the client asks for (a name, or "auto"); only a session's first
    # turn chooses it (graph/agents.py).
    agent: str | None = None
    # How deep in agents__ask this turn runs (0: a client's own turn).
    depth: int = 0

    def state(self) -> TurnState:
        return {"tenant": self.tenant, "session_id": self.session_id, "user_id": self.user_id,
                "message": self.message, "turn_id": self.turn_id, "retrieve": self.retrieve,
                "client_turn_id": self.client_turn_id, "agent": self.agent or "",
                "depth": self.depth}  # fmt: skip


@dataclass(eq=False)
class TurnRun:
    """The live objects of one run, made by its nodes and gone with it."""

    session: SessionState | None = None
    plan: ContextPlan | None = None
    reply: ReplyStream | None = None
    # The tools the plan's prefix offers (what a call may name).
    toolset: ToolSet | None = None
    # LLM requests this run sent (the first one's first token is the TTFT).
    requests: int = 0
    # The agent that answers (its profile: prompt, tool mask, generation settings).
    agent: AgentProfile | None = None

    async def aclose(self) -> None:
        """Ends what is still running when the graph stops early (an error)."""
        if self.reply is not None:
            with contextlib.suppress(Exception):
                await self.reply.aclose()


@dataclass(eq=False)
class TurnContext:
    """LangGraph's runtime context of a turn (``context_schema``)."""

    deps: TurnDeps
    control: TurnControl
    # When the request arrived (perf_counter), for TTFT.
    started: float
    run: TurnRun = field(default_factory=TurnRun)
    # A run of the runner's pool (graph/builder.py): ``prepare`` waits on this
    # for its next turn's input and the context variables of the turn's task.
    handoff: asyncio.Future[Handoff] | None = None
    # The turn this pooled run is serving now (set by ``prepare``).
    handed: Handoff | None = None
    # How a pooled run says its turn has ended (its output): True if the run
    # then waits for another turn, False if it ends (graph/builder.py).
    turn_ended: Callable[[dict[str, Any]], bool] | None = None

    def end_turn(self, output: dict[str, Any]) -> bool:
        """Called by the node that ends the turn: hands the turn's output to
        whoever waits for it; True if this run serves a next turn (the node
        then goes back to ``prepare``), False if the run ends with the turn."""
        if self.handed is None or self.turn_ended is None:
            return False  # a run of its own: its output is the run's
        handed, self.handed = self.handed, None
        if not handed.ended.done():
            handed.ended.set_result(output)
        return self.turn_ended(output)


@dataclass(frozen=True)
class Handoff:
    """What a pooled run gets when its turn arrives."""

    state: TurnState
    # The turn task's context variables (log fields: tenant, session), which a
    # run started from another task does not have.
    context: tuple[tuple[contextvars.ContextVar[Any], Any], ...]
    # Set to the turn's output (``TurnOutput``) by the node that ends the turn.
    ended: asyncio.Future[dict[str, Any]]


def _merge(old: dict[str, float] | None, new: dict[str, float] | None) -> dict[str, float]:
    return {**(old or {}), **(new or {})}


class TurnState(TypedDict, total=False):
    # --- the input ---
    tenant: str
    session_id: str
    user_id: str
    message: str
    turn_id: str
    retrieve: RetrieveMode
    client_turn_id: bool
    agent: str  # asked for on input ("" none, "auto", a name); the session's from prepare on
    depth: int
    # --- prepare ---
    turn: int  # the index this turn gets (or retries in place)
    l1_hit: bool
    replayed: bool
    retry_of: int | None  # a failed or drained turn retried in place
    need_memory: bool
    # --- retrieve ---
    memories: list[dict[str, Any]]  # hits: batch_id, session_id, turns, text, score
    memory_block: str | None
    # --- prepare: the detected skills' bodies (graph/nodes.py) ---
    skills_block: str | None
    # --- agent <-> tools ---
    # This turn's messages, OpenAI format: the user's, then per LLM step the
    # assistant's (with its tool_calls) and the tool results.
    messages: list[dict[str, Any]]
    step: int  # LLM requests answered so far this turn
    # Per LLM request: {"prompt", "completion", "cached"} tokens (prefix accounting).
    llm_steps: list[dict[str, Any]]
    # Per tool call: {"id", "name", "ok"}.
    tool_calls: list[dict[str, Any]]
    status: Literal["complete", "failed", "interrupted"]
    error: dict[str, Any] | None  # {"code", "message", "retryable"}
    usage: dict[str, Any]
    # --- commit ---
    version: int
    archive_batch: str | None
    # Seconds per phase; each node adds its own.
    timings: Annotated[dict[str, float], _merge]


class TurnOutput(TypedDict, total=False):
    """What a run returns: what the runner and its callers read after the turn.
    (LangGraph reads the output channels after every step, so fewer is cheaper.)"""

    turn: int
    status: str
    version: int
    archive_batch: str | None
    replayed: bool
    timings: dict[str, float]


# Per-turn channels a new run starts from scratch: a graph resumed from a
# checkpoint carries the previous turn's values until prepare resets them.
PER_TURN_RESET: TurnState = {
    "turn": 0, "l1_hit": False, "replayed": False, "retry_of": None, "need_memory": False,
    "memories": [], "memory_block": None, "skills_block": None, "messages": [], "step": 0,
    "llm_steps": [], "tool_calls": [], "status": "complete",
    "error": None, "usage": {}, "version": 0, "archive_batch": None,
}  # fmt: skip
