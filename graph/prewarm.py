"""Prewarming: every LLM replica computes the stable prefix before a session needs it.

vLLM caches the KV blocks of what it has computed, so turn 1 of a new session hits
the cache only if some earlier request carried the same prefix to the same replica.
The prewarmer sends each stable prefix new sessions get (the system message and
the tools, as every request renders them) to every replica as a request for one
token (``max_tokens: 1``, ``tool_choice: "none"``):

- at start, before the first turn (waited for up to ``start_wait_s``; the rest goes
  on in the background);
- whenever the stable prefix changes (a new tool list, a new skill: ``poke``);
- when a replica appears (Kubernetes discovery, a list that grew), checked every
  ``check_s``.

A (replica, prefix version) pair warmed once is not sent again: a replica that
restarts on the same address loses its cache without tiermem noticing, until the
next prefix change (the first sessions there pay the prefill, as without
prewarming). A replica that fails is retried at the next check. The development
LLM has no cache and is never warmed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from infra.errors import TiermemError
from infra.llm import ChatMessage, LLMUsage
from memory.metrics import Metrics

log = logging.getLogger("tiermem.prewarm")

# (prefix version, messages, tools): what one stable prefix sends.
PrefixRequest = tuple[str, list[ChatMessage], tuple[dict[str, Any], ...]]


class Warmable(Protocol):
    @property
    def replicas(self) -> list[str]: ...

    async def warm(
        self,
        replica: str,
        messages: Sequence[ChatMessage],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> LLMUsage | None: ...


class Prewarmer:
    def __init__(
        self,
        llm: Warmable,
        prefixes: Callable[[], Sequence[PrefixRequest]],
        metrics: Metrics,
        *,
        check_s: float = 5.0,
    ) -> None:
        self.llm = llm
        self.prefixes = prefixes
        self.metrics = metrics
        self.check_s = check_s
        self.warmed: set[tuple[str, str]] = set()
        self._poked = asyncio.Event()

    def poke(self) -> None:
        """A stable prefix changed: warm it now, not at the next check."""
        self._poked.set()

    async def warm_now(self) -> int:
        """Warms every (replica, prefix) pair not warmed yet, concurrently; returns
        how many were warmed now."""
        jobs = []
        for version, messages, tools in self.prefixes():
            for replica in self.llm.replicas:
                if (replica, version) not in self.warmed:
                    jobs.append(self._one(replica, version, messages, tools))
        done = await asyncio.gather(*jobs)
        return sum(done)

    async def _one(
        self,
        replica: str,
        version: str,
        messages: list[ChatMessage],
        tools: tuple[dict[str, Any], ...],
    ) -> bool:
        try:
            usage = await self.llm.warm(replica, messages, tools=tools or None)
        except TiermemError as exc:
            self.metrics.prewarms.labels("error").inc()
            log.warning("prewarm of prefix %s on %s failed (%s); retried in %.0f s",
                        version, replica, exc, self.check_s)  # fmt: skip
            return False
        self.warmed.add((replica, version))
        self.metrics.prewarms.labels("ok").inc()
        log.info("prefix %s warm on %s (%s prompt tokens)", version, replica,
                 usage.prompt_tokens if usage else "?")  # fmt: skip
        return True

    async def run(self) -> None:
        """Checks every ``check_s`` (or at once when poked) until cancelled."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poked.wait(), timeout=self.check_s)
            self._poked.clear()
            try:
                await self.warm_now()
            except Exception:  # a bug here must not end the loop: prewarming is an optimisation
                log.exception("prewarm check failed")
