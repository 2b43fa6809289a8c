"""One LLM reply, streamed to the client from a task of its own.

``ReplyStream.start`` sends the request at once and relays each text token to
the client as it comes; ``finish`` waits for the end of the reply, or for the
turn's cancel event (client gone, drain deadline), whichever comes first, and
says what the reply became. The request can so be sent as soon as the prompt is
known (from ``prepare``, on a turn that retrieves nothing) while the graph's
next step, ``agent``, still owns the outcome: LangGraph's steps between the two
no longer sit between the request and the first token.

One task for the whole stream, raced once against the cancel event: nothing
extra per token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from graph.events import Token
from graph.state import TurnControl
from infra.llm import ChatMessage, LLMClient, LLMDone, LLMError, LLMToken, ToolCall, ToolChoice
from memory.metrics import Metrics

log = logging.getLogger("tiermem.turn")


@dataclass(frozen=True, slots=True)
class ReplyOutcome:
    text: str
    status: Literal["complete", "failed", "interrupted"]
    done: LLMDone | None
    ttft_ms: float | None
    error: dict[str, Any] | None  # {"code", "message", "retryable"}

    @property
    def tool_calls(self) -> tuple[ToolCall, ...]:
        """The calls of a reply that completed (an interrupted one's are dropped)."""
        if self.status != "complete" or self.done is None:
            return ()
        return self.done.tool_calls


class ReplyStream:
    def __init__(
        self,
        llm: LLMClient,
        messages: Sequence[ChatMessage],
        *,
        session_key: str,
        control: TurnControl,
        metrics: Metrics,
        started: float,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: ToolChoice | None = None,
        first_step: bool = True,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> None:
        """``started`` is when the turn's request arrived; only the first step
        of a turn (``first_step``) is its time to first token."""
        self._llm = llm
        self._messages = messages
        self._tools = tools or None
        self._tool_choice = tool_choice if tools else None
        self._first_step = first_step
        self._max_tokens = max_tokens
        self._temperature = temperature
        self._session_key = session_key
        self._control = control
        self._metrics = metrics
        self._started = started
        self._pieces: list[str] = []
        self._done: LLMDone | None = None
        self._ttft_ms: float | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> ReplyStream:
        """Starts the stream and yields once, so the request is written before
        the caller goes on: a LangGraph step's bookkeeping would otherwise run
        first (the task only starts at the loop's next turn)."""
        self._task = asyncio.create_task(self._consume())
        await asyncio.sleep(0)
        return self

    async def _consume(self) -> None:
        emit = self._control.emit
        pieces = self._pieces
        stream = self._llm.stream_chat(
            self._messages, session_key=self._session_key, tools=self._tools,
            tool_choice=self._tool_choice, max_tokens=self._max_tokens,
            temperature=self._temperature,
        )  # fmt: skip
        try:
            async for ev in stream:
                if isinstance(ev, LLMToken):
                    if self._ttft_ms is None:
                        first_s = time.perf_counter() - self._started
                        self._ttft_ms = first_s * 1000
                        if self._first_step:
                            self._metrics.ttft_seconds.observe(first_s)
                    pieces.append(ev.text)
                    emit(Token(ev.text))
                elif isinstance(ev, LLMDone):
                    self._done = ev
        finally:
            # Closes the upstream response: vLLM aborts a request whose
            # connection goes away.
            await stream.aclose()

    async def finish(self) -> ReplyOutcome:
        task = self._task
        assert task is not None, "start() first"
        cancel = self._control.cancel
        status: Literal["complete", "failed", "interrupted"] = "complete"
        error: dict[str, Any] | None = None
        waiter = asyncio.create_task(cancel.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                await self.aclose()
                status = "interrupted"
            else:
                task.result()
        except LLMError as exc:
            status = "failed" if not self._pieces else "interrupted"
            error = {"code": f"llm_{exc.kind}", "message": str(exc), "retryable": True}
            self._metrics.errors.labels(f"llm_{exc.kind}").inc()
            log.warning("LLM failed: %s", exc)
        finally:
            waiter.cancel()
            if not task.done():  # the node itself was cancelled
                task.cancel()
        return ReplyOutcome("".join(self._pieces), status, self._done, self._ttft_ms, error)

    async def aclose(self) -> None:
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
