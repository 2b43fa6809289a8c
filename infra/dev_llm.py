"""The offline development LLM: what ``tiermem serve`` talks to when no LLM is configured.

It needs no network and no model. Replies are deterministic, say plainly that
they come from tiermem's offline development model and not a real LLM, and
are derived from the last user message (quoted, counted, numbered), so tests
and demos can tell turns apart. Asked for a summary (``SUMMARIZE_SYSTEM_PROMPT``
as the system message) it returns an extractive summary: the first sentence
of each line of the conversation, capped. Usage counts come from the
tokenizer; ``cached_tokens`` is None because nothing is cached.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncGenerator

from infra.chat_template import render_chat
from infra.llm import SUMMARIZE_SYSTEM_PROMPT, LLMDone, LLMEvent, LLMToken, LLMUsage, collect
from infra.tokenizer import Tokenizer, default_tokenizer

log = logging.getLogger(__name__)

DEV_MARKER = "[tiermem offline development model, not a real LLM]"
REPLICA = "offline-dev"

_PIECE = re.compile(r"\s*\S+")
_FIRST_SENTENCE = re.compile(r"^(.+?[.!?])(?=\s|$)")
_QUOTE_CHARS = 160
_SENTENCE_CHARS = 200
_SUMMARY_CHARS = 1500
# Tokenising a long prompt is CPU work; past this size it goes to a thread.
_INLINE_TOKENIZE_CHARS = 8192


class OfflineDevLLM:
    """A deterministic stand-in for an LLM, for development without a GPU."""

    name = "offline-dev"
    is_dev = True

    def __init__(
        self,
        *,
        tokenizer: Tokenizer | None = None,
        token_delay_s: float = 0.0,
        max_tokens: int = 512,
    ) -> None:
        self._tokenizer = tokenizer or default_tokenizer()
        self._delay = token_delay_s
        self._max_tokens = max_tokens
        log.warning(
            "Using tiermem's offline development LLM: replies are canned text, not a "
            "real model. Set TIERMEM_LLM_URL to an OpenAI-compatible base URL "
            "(e.g. http://vllm:8000/v1) to use a real LLM."
        )

    async def stream_chat(
        self, messages: list[dict[str, str]], *, session_key: str, max_tokens: int | None = None
    ) -> AsyncGenerator[LLMEvent, None]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        limit = max_tokens or self._max_tokens
        prompt_tokens = await self._count(render_chat(messages, add_generation_prompt=True))
        completion_tokens = 0
        finish_reason = "stop"
        ttft_ms: float | None = None
        for piece in _PIECE.findall(self.reply_text(messages)):
            n = self._tokenizer.count(piece)
            if completion_tokens + n > limit:
                finish_reason = "length"
                break
            if self._delay > 0:
                await asyncio.sleep(self._delay)
            else:
                # Stay a good citizen of the event loop even with no delay.
                await asyncio.sleep(0)
            completion_tokens += n
            if ttft_ms is None:
                ttft_ms = (loop.time() - started) * 1000.0
            yield LLMToken(piece)
        yield LLMDone(
            usage=LLMUsage(prompt_tokens, completion_tokens, cached_tokens=None),
            replica=REPLICA,
            ttft_ms=ttft_ms if ttft_ms is not None else (loop.time() - started) * 1000.0,
            finish_reason=finish_reason,
        )

    async def complete(
        self, messages: list[dict[str, str]], *, session_key: str, max_tokens: int | None = None
    ) -> tuple[str, LLMUsage | None]:
        text, done = await collect(
            self.stream_chat(messages, session_key=session_key, max_tokens=max_tokens)
        )
        return text, done.usage if done is not None else None

    async def health(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None

    def reply_text(self, messages: list[dict[str, str]]) -> str:
        """The whole reply to ``messages`` (before any max_tokens cut)."""
        first = messages[0] if messages else {}
        if first.get("role") == "system" and first.get("content") == SUMMARIZE_SYSTEM_PROMPT:
            return extractive_summary(messages[1:])
        user_messages = [m.get("content") or "" for m in messages if m.get("role") == "user"]
        last = " ".join((user_messages[-1] if user_messages else "").split())
        quote = last if len(last) <= _QUOTE_CHARS else last[:_QUOTE_CHARS].rstrip() + "..."
        return (
            f"{DEV_MARKER} You said: \u201c{quote}\u201d ({len(last.split())} words). "
            f"That is user message {len(user_messages)} of this conversation. "
            "Set TIERMEM_LLM_URL to an OpenAI-compatible server such as vLLM for real answers."
        )

    async def _count(self, text: str) -> int:
        if len(text) <= _INLINE_TOKENIZE_CHARS:
            return self._tokenizer.count(text)
        return await asyncio.to_thread(self._tokenizer.count, text)


def extractive_summary(messages: list[dict[str, str]]) -> str:
    """The first sentence of each non-empty line of ``messages``, capped.

    Lines of the development model's own replies are skipped: they carry no
    information about the user.
    """
    sentences: list[str] = []
    total = 0
    for message in messages:
        for raw in (message.get("content") or "").splitlines():
            line = " ".join(raw.split())
            if not line or DEV_MARKER in line:
                continue
            m = _FIRST_SENTENCE.match(line)
            sentence = m.group(1) if m else line
            if len(sentence) > _SENTENCE_CHARS:
                sentence = sentence[:_SENTENCE_CHARS].rstrip() + "..."
            if total + len(sentence) > _SUMMARY_CHARS:
                return " ".join(sentences)
            sentences.append(sentence)
            total += len(sentence) + 1
    return " ".join(sentences) if sentences else "(nothing to summarise)"
