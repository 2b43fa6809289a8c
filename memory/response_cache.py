"""Whole LLM replies through the cache layer (memory/cache.py, kind ``response``).

Used by the stateless ``/v1/chat/completions`` (app/routes/openai.py): the client
sends the whole conversation, so an identical request is an identical question.
Session turns do not use it (decision): their prompt is the session's own history
and memories, so it never repeats within the session, and sharing it across
sessions would keep one user's conversation under the tenant after that user is
forgotten.

What may be cached (``bypass_reason``): only deterministic requests, those with a
``temperature`` at most ``TIERMEM_CACHE_MAX_TEMPERATURE`` (0.3; a request without
one is sampled at the model's default, so it is not), ``n`` 1 (the route allows no
other), and no ``tools``: a client's tools are the client's to run, tiermem cannot
know which change something, and a cached tool call would be sent again without
the model looking (decision). ``Cache-Control: no-cache`` bypasses too.

The key (``key_parts``): the tenant (the scope), the model asked for and the model
that answers (``LLMClient.model_label``), the messages, tools, tool_choice,
temperature, top_p, max_tokens, stop, seed and response_format.

What is stored: the reply's text, tool calls, finish reason and usage. A hit is
streamed back in the format a live reply has (``chat.completion.chunk`` events, the
usage chunk when asked for); its text is all ready at once, so it comes in one
content chunk. Only a reply that
ended normally: an error, a stream cut short (the client gone, the drain) or an
empty reply raise or are refused, and nothing is stored.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from infra.llm import LLMDone, LLMEvent, LLMToken, LLMUsage, ToolCall

# What a request may carry and still be answered from the cache; the fields that
# change the reply, all in the key.
KEY_FIELDS = ("messages", "tools", "tool_choice", "temperature", "top_p", "max_tokens",
              "max_completion_tokens", "stop", "seed", "response_format")  # fmt: skip


def bypass_reason(
    request: Mapping[str, Any], max_temperature: float, *, no_cache: bool
) -> str | None:
    """Why the request is not answered from (nor stored in) the cache; None: it may be."""
    if no_cache:
        return "no_cache"
    temperature = request.get("temperature")
    if temperature is None or temperature > max_temperature:
        return "nondeterministic"
    if (request.get("n") or 1) != 1:
        return "nondeterministic"
    if request.get("tools"):
        return "side_effects"
    return None


def key_parts(request: Mapping[str, Any], model: str, model_label: str) -> dict[str, Any]:
    return {"model": model, "served": model_label,
            **{f: request.get(f) for f in KEY_FIELDS}}  # fmt: skip


@dataclass
class RecordedReply:
    """A reply: its text as it streamed, then how it ended."""

    parts: list[str] = field(default_factory=list)
    done: LLMDone | None = None

    def add(self, event: LLMEvent) -> None:
        if isinstance(event, LLMToken):
            if event.text:
                self.parts.append(event.text)
        else:
            self.done = event

    def cacheable(self) -> bool:
        d = self.done
        return (d is not None and d.finish_reason in (None, "stop", "length", "tool_calls")
                and bool(self.parts or d.tool_calls))  # fmt: skip

    def events(self) -> Iterator[LLMEvent]:
        for text in self.parts:
            yield LLMToken(text)
        if self.done is not None:
            yield self.done

    def encode(self) -> bytes:
        d = self.done
        assert d is not None
        u = d.usage
        return orjson.dumps({
            "text": "".join(self.parts),
            "finish_reason": d.finish_reason,
            "tool_calls": [[c.id, c.name, c.arguments] for c in d.tool_calls],
            "usage": None if u is None else [u.prompt_tokens, u.completion_tokens, u.cached_tokens],
        })  # fmt: skip

    @classmethod
    def decode(cls, raw: bytes) -> RecordedReply:
        d = orjson.loads(raw)
        u: Sequence[Any] | None = d["usage"]
        usage = None if u is None else LLMUsage(int(u[0]), int(u[1]), u[2])
        calls = tuple(ToolCall(str(i), str(n), str(a)) for i, n, a in d["tool_calls"])
        # A hit took no replica and no time to a first token of the model's.
        done = LLMDone(usage, replica="cache", ttft_ms=0.0, finish_reason=d["finish_reason"],
                       tool_calls=calls)  # fmt: skip
        return cls([d["text"]] if d["text"] else [], done)
