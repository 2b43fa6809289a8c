"""The offline development LLM: what ``tiermem serve`` talks to when no LLM is configured.

It needs no network and no model. Replies are deterministic, say plainly that
they come from tiermem's offline development model and not a real LLM
(``DEV_MARKER``), and are derived from the last user message (quoted, counted,
numbered), so tests and demos can tell turns apart. Its rules:

- Summaries: a request whose first system message asks to summarise
  (``summarise``/``summarize``, any case) and that offers no tools gets an
  extractive summary of the other messages: the first sentence of each line,
  capped. The rule is on the request, not on one prompt's wording, so whoever
  owns the summary prompt may reword it.
- Tools: it calls a tool only when made to. With ``tool_choice`` "required"
  it calls the first tool offered, with a named function that one: one call,
  no text, finish_reason "tool_calls", arguments built from the function's
  JSON schema (each required field: the last user message for a string,
  else the first ``enum`` value, ``default``, or the type's zero; nested
  objects alike). With "auto", "none" or no choice it answers in text, and
  quotes the last tool result it was given after the last user message.
- ``temperature`` is accepted and ignored: replies are deterministic.

Usage counts come from the tokenizer over ``render_prompt`` (``render_chat``,
which renders tool calls, plus the tool definitions), so a prompt that
carries tools or calls counts them. ``cached_tokens`` is None because nothing
is cached.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Any

import orjson

from infra.chat_template import IM_END, IM_START, render_chat, render_prompt
from infra.llm import (
    ChatMessage,
    LLMBase,
    LLMDone,
    LLMEvent,
    LLMToken,
    LLMUsage,
    ToolCall,
    ToolChoice,
    tool_name,
)
from infra.tokenizer import Tokenizer, default_tokenizer

log = logging.getLogger(__name__)

DEV_MARKER = "[tiermem offline development model, not a real LLM]"
REPLICA = "offline-dev"

_SUMMARY_REQUEST = re.compile(r"summari[sz]e", re.IGNORECASE)
_PIECE = re.compile(r"\s*\S+")
_FIRST_SENTENCE = re.compile(r"^(.+?[.!?])(?=\s|$)")
_QUOTE_CHARS = 160
_SENTENCE_CHARS = 200
_SUMMARY_CHARS = 1500
# Tokenising a long prompt is CPU work; past this size it goes to a thread.
_INLINE_TOKENIZE_CHARS = 8192
_ZERO: dict[str, Any] = {"integer": 0, "number": 0, "boolean": False, "array": [], "null": None}


class OfflineDevLLM(LLMBase):
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
        self,
        messages: Sequence[ChatMessage],
        *,
        session_key: str,
        max_tokens: int | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: ToolChoice | None = None,
        temperature: float | None = None,
    ) -> AsyncGenerator[LLMEvent, None]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        choice = self._tool_choice(tools, tool_choice)
        limit = max_tokens or self._max_tokens
        prompt_tokens = await self._count(render_prompt(messages, tools))
        call = forced_tool_call(messages, tools or (), choice)
        if call is not None:
            await asyncio.sleep(self._delay)
            text = tool_calls_text([call.to_message_dict()])
            yield LLMDone(
                usage=LLMUsage(prompt_tokens, self._tokenizer.count(text), cached_tokens=None),
                replica=REPLICA,
                ttft_ms=(loop.time() - started) * 1000.0,
                finish_reason="tool_calls",
                tool_calls=(call,),
            )
            return
        completion_tokens = 0
        finish_reason = "stop"
        ttft_ms: float | None = None
        for piece in _PIECE.findall(self.reply_text(messages, tools)):
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

    async def health(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None

    def reply_text(
        self, messages: Sequence[ChatMessage], tools: Sequence[Mapping[str, Any]] | None = None
    ) -> str:
        """The whole text reply to ``messages`` (before any max_tokens cut)."""
        if is_summary_request(messages, tools):
            return extractive_summary([m for m in messages if m.get("role") != "system"])
        user_at = [i for i, m in enumerate(messages) if m.get("role") == "user"]
        last = " ".join((messages[user_at[-1]].get("content") or "").split()) if user_at else ""
        reply = (
            f"{DEV_MARKER} You said: \u201c{_quote(last)}\u201d ({len(last.split())} words). "
            f"That is user message {len(user_at)} of this conversation. "
        )
        after = messages[user_at[-1] + 1 :] if user_at else messages
        results = [m.get("content") or "" for m in after if m.get("role") == "tool"]
        if results:
            reply += (
                f"Tools answered {len(results)} call(s); the last result: "
                f"\u201c{_quote(' '.join(results[-1].split()))}\u201d. "
            )
        return reply + (
            "Set TIERMEM_LLM_URL to an OpenAI-compatible server such as vLLM for real answers."
        )

    async def _count(self, text: str) -> int:
        if len(text) <= _INLINE_TOKENIZE_CHARS:
            return self._tokenizer.count(text)
        return await asyncio.to_thread(self._tokenizer.count, text)


def is_summary_request(
    messages: Sequence[ChatMessage], tools: Sequence[Mapping[str, Any]] | None = None
) -> bool:
    """True when the first system message asks to summarise and no tools are offered.

    An agent's system prompt may well mention summaries; an agent turn comes
    with tools, a summary request does not.
    """
    if tools:
        return False
    system = next((m for m in messages if m.get("role") == "system"), None)
    return system is not None and bool(_SUMMARY_REQUEST.search(system.get("content") or ""))


def forced_tool_call(
    messages: Sequence[ChatMessage],
    tools: Sequence[Mapping[str, Any]],
    tool_choice: ToolChoice | None,
) -> ToolCall | None:
    """The call the development model makes: only when ``tool_choice`` forces one."""
    if not tools or tool_choice is None or tool_choice in ("auto", "none"):
        return None
    if isinstance(tool_choice, str):  # "required": the first tool offered
        tool = tools[0]
    else:
        name = tool_choice["function"]["name"]
        tool = next(t for t in tools if tool_name(t) == name)
    function = tool.get("function")
    parameters = function.get("parameters") if isinstance(function, Mapping) else None
    last_user = next(
        (m.get("content") or "" for m in reversed(messages) if m.get("role") == "user"), ""
    )
    arguments = placeholder_arguments(parameters, last_user.strip())
    return ToolCall("call_dev_0", tool_name(tool) or "", orjson.dumps(arguments).decode())


def placeholder_arguments(schema: Any, text: str) -> dict[str, Any]:
    """Values for the required properties of the JSON schema of an object."""
    if not isinstance(schema, Mapping):
        return {}
    properties = schema.get("properties")
    properties = properties if isinstance(properties, Mapping) else {}
    out: dict[str, Any] = {}
    for key in schema.get("required") or ():
        prop = properties.get(key)
        out[str(key)] = _placeholder(prop if isinstance(prop, Mapping) else {}, text)
    return out


def _placeholder(schema: Mapping[str, Any], text: str) -> Any:
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("const", "default"):
        if key in schema:
            return schema[key]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = "string" if "string" in kind or not kind else kind[0]
    if kind == "object":
        return placeholder_arguments(schema, text)
    if kind in ("integer", "number") and "minimum" in schema:
        return schema["minimum"]
    # A string, or a field of no stated type: the user's words are the likeliest fit.
    return _ZERO.get(str(kind), text)


def tool_calls_text(calls: Sequence[Mapping[str, Any]]) -> str:
    """Tool calls as the model writes them: what ``render_chat`` adds to a message for them.

    Derived from ``render_chat`` itself, so what is counted as generated is
    exactly what the next prompt renders (the prefix cache depends on it).
    """
    if not calls:
        return ""
    framed = render_chat([{"role": "assistant", "content": "", "tool_calls": list(calls)}])
    return framed.removeprefix(f"{IM_START}assistant\n").removesuffix(f"{IM_END}\n")


def _quote(text: str) -> str:
    return text if len(text) <= _QUOTE_CHARS else text[:_QUOTE_CHARS].rstrip() + "..."


def extractive_summary(messages: Sequence[ChatMessage]) -> str:
    """The first sentence of each non-empty line of ``messages`` (of the part
    between ``---`` lines, where a message has one), capped.

    Lines of the development model's own replies are skipped: they carry no
    information about the user.
    """
    sentences: list[str] = []
    total = 0
    for message in messages:
        content = message.get("content") or ""
        # A request that frames the text to summarise between two "---" lines
        # (tiermem's archiver does): only that text, not the framing.
        parts = re.split(r"^---$", content, flags=re.MULTILINE)
        if len(parts) >= 3:
            content = "\n".join(parts[1:-1])
        for raw in content.splitlines():
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
