"""A real OpenAI-compatible HTTP server behaving like one vLLM replica, for tests and benches.

It speaks the wire protocol for real (SSE chunks in OpenAI's format, usage with
``prompt_tokens_details.cached_tokens``, ``/tokenize``, ``/v1/embeddings``,
``/v1/models``, ``/health``, ``/metrics`` with vLLM's metric names) and models
the one vLLM behaviour tiermem is built around: automatic prefix caching
(``PrefixCacheSimulator``). Replies are deterministic text, not a model.

Knobs per instance: first-token delay, inter-token delay, reply length or a
reply function, injected failures (HTTP 500, hang before the first token, drop
the connection mid-stream). Every request is recorded (the body as parsed and
as the exact bytes received, headers, tokens sent, tool calls sent, whether
and when the client disconnected) for tests to assert on.

Tool calls, streamed as vLLM and OpenAI stream them (a first fragment with
``index``, ``id``, ``type`` and the name, then ``arguments`` in fragments of a
few characters; several calls interleaved by index; finish_reason
"tool_calls"; usage as for text), come two ways:
- scripted: ``fake.script(ScriptedReply(text=..., tool_calls=(FakeToolCall(name,
  arguments), ...)))`` queues replies; each chat request takes the next one,
  whatever it asks (``reset`` empties the queue). ``ScriptedReply`` also sets
  the fragment size, whether calls interleave, whether ids are sent at all.
- by rule: a request that has ``tools`` (and no ``tool_choice`` "none") and
  whose last message is the user's, with lines ``CALL <tool_name> <json
  arguments>``, gets one call per such line
  (arguments ``{}`` when the line has none; neither the name nor the JSON is
  checked, so a test can provoke an unknown tool or broken JSON). Once a tool
  result follows the user's message, the reply is text again: an agent loop
  against the fake ends.
Prompts are counted as ``infra.dev_llm.render_prompt`` renders them, so tool
definitions and earlier calls take part in the prefix-cache simulation; a
request without them counts exactly as ``render_chat``.

In-process: ``FakeVLLM(...).start()`` serves on a free 127.0.0.1 port from a
background thread; ``.base_url`` ends in ``/v1``. As a process (benchmarks):
``python -m tests.servers.fake_vllm --port P --first-token-delay-ms D --token-interval-ms I``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import random
import re
import socket
import threading
import time
import uuid
from array import array
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import uvicorn
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from infra.dev_llm import render_prompt, tool_calls_text
from infra.tokenizer import Tokenizer, default_tokenizer

# --------------------------------------------------------------------------------------
# Prefix-cache simulator
# --------------------------------------------------------------------------------------


class PromptTooLong(ValueError):
    """A request needs more KV blocks than the whole pool has."""


@dataclass(frozen=True)
class CacheResult:
    prompt_tokens: int
    cached_tokens: int
    evicted_blocks: int


class PrefixCacheSimulator:
    """vLLM's automatic prefix caching (v1 engine), reduced to its arithmetic.

    What it reproduces, from ``vllm/v1/core`` (kv_cache_manager, block_pool):
    - a sequence is cut into blocks of ``block_size`` tokens; only full blocks
      are hashed and can be shared. A block's hash chains its parent's hash and
      its own tokens, so a block hits only if everything before it matched too.
    - the hit is the longest run of leading full prompt blocks found in the
      pool, capped at ``prompt_len - 1`` tokens and rounded down to whole blocks
      (vLLM must compute at least the last prompt token to get logits, and its
      hits are block-aligned). So a prompt of exactly k full blocks, all
      cached, hits k - 1 blocks; a prompt of k blocks + 1 token hits all k.
    - after the request, the blocks of the tokens whose KV was computed stay
      cached: prompt + output minus the last sampled token (vLLM never feeds
      that token back through the model), full blocks only.
    - the pool has ``num_blocks`` physical blocks in a free queue; allocating
      pops the head and evicts whatever cached block sits there; a finished
      request returns its blocks to the tail in reverse order, so its tail
      blocks are evicted before its head blocks (LRU with vLLM's tie-break).

    Simplifications: requests are processed one at a time and atomically (no
    blocks pinned by concurrent requests); a computed full block whose hash is
    already cached reuses the cached block instead of holding a duplicate;
    tokens are counted in ``queries``/``hits`` like vLLM's counters.
    """

    def __init__(self, block_size: int = 16, num_blocks: int = 8192) -> None:
        if block_size < 1 or num_blocks < 1:
            raise ValueError("block_size and num_blocks must be positive")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self._ids = itertools.count()
        # free queue, head (next evicted) first: entry id -> block hash (None: uncached)
        self._queue: OrderedDict[int, bytes | None] = OrderedDict(
            (next(self._ids), None) for _ in range(num_blocks)
        )
        self._where: dict[bytes, int] = {}  # cached block hash -> its queue entry
        self.queries = 0
        self.hits = 0
        self.evictions = 0
        self._lock = threading.Lock()

    def block_hashes(self, tokens: Sequence[int]) -> list[bytes]:
        """Chained hashes of the full blocks of ``tokens``."""
        bs = self.block_size
        parent = b""
        out: list[bytes] = []
        for start in range(0, len(tokens) - bs + 1, bs):
            block = array("Q", tokens[start : start + bs]).tobytes()
            parent = hashlib.blake2b(parent + block, digest_size=16).digest()
            out.append(parent)
        return out

    @property
    def cached_blocks(self) -> int:
        return len(self._where)

    def peek(self, prompt: Sequence[int]) -> int:
        """The cached tokens ``prompt`` would get now, changing nothing."""
        with self._lock:
            return self._hit_blocks(self.block_hashes(prompt), len(prompt)) * self.block_size

    def process(self, prompt: Sequence[int], output: Sequence[int] = ()) -> CacheResult:
        """Run one request: look up the prompt, then cache what it computed."""
        bs = self.block_size
        with self._lock:
            seq = list(prompt) + list(output[:-1])
            n_blocks = -(-len(seq) // bs)
            if n_blocks > self.num_blocks:
                raise PromptTooLong(
                    f"request needs {n_blocks} KV blocks, the pool has {self.num_blocks}"
                )
            hashes = self.block_hashes(seq)
            hit = self._hit_blocks(hashes, len(prompt))
            self.queries += len(prompt)
            self.hits += hit * bs
            held: list[bytes | None] = []
            # Hit blocks leave the free queue while the request uses them.
            for hit_hash in hashes[:hit]:
                del self._queue[self._where[hit_hash]]
                held.append(hit_hash)
            evicted = 0
            for i in range(hit, n_blocks):
                # The last block of the sequence may be partial: never hashed.
                new_hash = hashes[i] if i < len(hashes) else None
                if new_hash is not None and new_hash in self._where:
                    del self._queue[self._where[new_hash]]
                    held.append(new_hash)
                    continue
                _, old = self._queue.popitem(last=False)
                if old is not None:
                    del self._where[old]
                    evicted += 1
                held.append(new_hash)
            # Freed in reverse, so the request's tail blocks are evicted first.
            for block_hash in reversed(held):
                entry = next(self._ids)
                self._queue[entry] = block_hash
                if block_hash is not None:
                    self._where[block_hash] = entry
            self.evictions += evicted
            return CacheResult(len(prompt), hit * bs, evicted)

    def _hit_blocks(self, hashes: list[bytes], prompt_len: int) -> int:
        limit = max(prompt_len - 1, 0) // self.block_size
        hit = 0
        for h in hashes[:limit]:
            if h not in self._where:
                break
            hit += 1
        return hit

    def reset(self) -> None:
        """Forget every cached block (like vLLM's /reset_prefix_cache)."""
        with self._lock:
            self._queue = OrderedDict((next(self._ids), None) for _ in range(self.num_blocks))
            self._where.clear()


# --------------------------------------------------------------------------------------
# Replies
# --------------------------------------------------------------------------------------

ReplyFn = Callable[[list[dict[str, str]]], str]

_FILLER = [
    "memory", "context", "prefix", "cache", "token", "replica", "session", "archive",
    "summary", "vector", "stream", "answer", "detail", "note", "fact", "plan", "step",
    "result", "value", "model", "prompt", "reply",
]  # fmt: skip


def last_user_message(messages: list[dict[str, str]]) -> str:
    for m in reversed(messages):
        if m.get("role") == "user":
            return m.get("content") or ""
    return ""


def default_reply(messages: list[dict[str, str]], n_tokens: int, tokenizer: Tokenizer) -> str:
    """Deterministic text of about ``n_tokens`` tokens derived from the last user message.

    It opens with the first words of the message, so tests can tell turns
    apart, then continues with filler words chosen by a seed from the message.
    """
    last = last_user_message(messages)
    words = ["Re:", *last.split()[:8]]
    seed = int.from_bytes(hashlib.blake2b(last.encode(), digest_size=8).digest(), "big")
    rng = random.Random(seed)
    text = ""
    count = 0
    for word in itertools.chain(words, iter(lambda: rng.choice(_FILLER), None)):
        if count >= n_tokens:
            break
        piece = word if not text else " " + word
        text += piece
        count += tokenizer.count(piece)
    return text + "."


def split_pieces(text: str) -> list[str]:
    """Stream pieces: each word with the whitespace before it."""
    pieces: list[str] = []
    current = ""
    for ch in text:
        if ch.isspace() and current.strip():
            pieces.append(current)
            current = ""
        current += ch
    if current:
        pieces.append(current)
    return pieces


@dataclass(frozen=True)
class FakeToolCall:
    """One tool call a scripted reply makes."""

    name: str
    arguments: str = "{}"  # JSON text, sent as is (it may be broken on purpose)
    id: str | None = None  # None: generated per request, as vLLM does


@dataclass(frozen=True)
class ScriptedReply:
    """A reply a test orders (``FakeVLLM.script``): text, then ``deltas``, then tool calls.

    ``deltas`` are hand-written ``choices[0].delta`` objects sent as they are
    (a delta with content and tool_calls at once, a malformed one); only their
    ``content`` counts as output. ``finish_reason`` None means "tool_calls"
    when ``tool_calls`` has calls, else "stop"; a reply whose text
    ``max_tokens`` cuts ends with "length" and nothing after the text. Tool
    calls themselves are not cut. A request that does not stream gets the
    text and ``tool_calls``, not ``deltas``.
    """

    text: str = ""
    tool_calls: tuple[FakeToolCall, ...] = ()
    deltas: tuple[dict[str, Any], ...] = ()
    fragment_chars: int = 3  # arguments are streamed in pieces of this many characters
    interleave: bool = True  # fragments of several calls alternate by index
    send_ids: bool = True  # False: no fragment carries an id
    finish_reason: str | None = None

    def resolved_calls(self) -> list[dict[str, Any]]:
        """The calls in OpenAI's message format, ids filled in (None when not sent)."""
        return [
            {
                "id": (call.id or f"chatcmpl-tool-{uuid.uuid4().hex}") if self.send_ids else None,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }
            for call in self.tool_calls
        ]

    def fragments(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The ``delta.tool_calls`` entries that stream ``calls``, in sending order."""
        n = max(self.fragment_chars, 1)
        per_call: list[list[dict[str, Any]]] = []
        for index, call in enumerate(calls):
            first: dict[str, Any] = {"index": index}
            if call["id"] is not None:
                first["id"] = call["id"]
            first["type"] = "function"
            first["function"] = {"name": call["function"]["name"], "arguments": ""}
            arguments = call["function"]["arguments"]
            per_call.append(
                [first]
                + [
                    {"index": index, "function": {"arguments": arguments[i : i + n]}}
                    for i in range(0, len(arguments), n)
                ]
            )
        if not self.interleave:
            return [f for fragments in per_call for f in fragments]
        rounds = itertools.zip_longest(*per_call)
        return [f for round_ in rounds for f in round_ if f is not None]


_CALL_LINE = re.compile(r"^[ \t]*CALL[ \t]+(\S+)[ \t]*(.*?)[ \t]*$", re.MULTILINE)


def called_tools(body: dict[str, Any]) -> ScriptedReply | None:
    """The reply the ``CALL <tool_name> <json>`` rule gives ``body``, if it applies."""
    messages = body.get("messages") or []
    if not body.get("tools") or body.get("tool_choice") == "none":
        return None
    if not messages or messages[-1].get("role") != "user":
        return None
    content = messages[-1].get("content")
    calls = tuple(
        FakeToolCall(m.group(1), m.group(2) or "{}")
        for m in _CALL_LINE.finditer(content if isinstance(content, str) else "")
    )
    return ScriptedReply(tool_calls=calls) if calls else None


# --------------------------------------------------------------------------------------
# Recording and failures
# --------------------------------------------------------------------------------------

FailureKind = Literal["http_500", "hang", "drop"]


@dataclass
class RecordedRequest:
    path: str
    body: dict[str, Any]
    headers: dict[str, str]
    received_at: float  # time.monotonic() of this process
    status: int = 200
    failure: FailureKind | None = None
    prompt_tokens: int = 0
    cached_tokens: int | None = None
    completion_tokens: int = 0
    chunks_sent: int = 0
    first_token_at: float | None = None
    finished_at: float | None = None
    disconnected_at: float | None = None
    raw_body: bytes = b""  # the request body exactly as received
    # The complete tool calls the reply streamed (OpenAI message format).
    tool_calls_sent: list[dict[str, Any]] = field(default_factory=list)

    @property
    def messages(self) -> list[dict[str, str]]:
        return list(self.body.get("messages") or [])

    def raw_field(self, name: str) -> bytes | None:
        """The exact bytes of the body's top-level field ``name``, as the client encoded them.

        So a test can tell that two requests carried byte-identical ``tools``.
        """
        text = self.raw_body.decode()
        decoder = json.JSONDecoder()
        i = _skip_ws(text, 0)
        if text[i : i + 1] != "{":
            return None
        i = _skip_ws(text, i + 1)
        while text[i : i + 1] not in ("}", ""):
            key, i = decoder.raw_decode(text, i)
            i = _skip_ws(text, _skip_ws(text, i) + 1)  # past the colon
            _, end = decoder.raw_decode(text, i)
            if key == name:
                return text[i:end].encode()
            i = _skip_ws(text, end)
            if text[i : i + 1] == ",":
                i = _skip_ws(text, i + 1)
        return None

    @property
    def session_id(self) -> str | None:
        return self.headers.get("x-session-id")


_WS = re.compile(r"[ \t\n\r]*")


def _skip_ws(text: str, i: int) -> int:
    match = _WS.match(text, i)
    return match.end() if match else i


@dataclass
class _Failure:
    kind: FailureKind
    remaining: int | None  # None: every request until cleared
    after_chunks: int


# --------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip


class _Metrics:
    """vLLM's metric families, in a registry of this instance's own."""

    def __init__(self, model: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name", "engine"]
        self.labels = {"model_name": model, "engine": "0"}
        r = self.registry
        self.prefix_queries = Counter(
            "vllm:prefix_cache_queries", "Prefix cache queries, in tokens.", labels, registry=r
        )
        self.prefix_hits = Counter(
            "vllm:prefix_cache_hits", "Prefix cache hits, in tokens.", labels, registry=r
        )
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", labels, registry=r
        )
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Number of generation tokens processed.", labels, registry=r
        )
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            labels,
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.running = Gauge(
            "vllm:num_requests_running", "Number of requests running.", labels, registry=r
        )
        for metric in (self.prefix_queries, self.prefix_hits, self.prompt_tokens,
                       self.generation_tokens, self.ttft, self.running):  # fmt: skip
            metric.labels(**self.labels)


class _Dropped(Exception):
    """Raised inside a response to make uvicorn cut the connection mid-body."""


class _HideInjectedDrops(logging.Filter):
    """Keeps uvicorn from logging a traceback for each drop a test asked for."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], _Dropped))


_drop_filter = _HideInjectedDrops()
logging.getLogger("uvicorn.error").addFilter(_drop_filter)


class FakeVLLM:
    """One fake vLLM replica. Attributes may be changed while it runs; each request reads them."""

    def __init__(
        self,
        *,
        model: str = "fake-model",
        first_token_delay_s: float = 0.0,
        token_interval_s: float = 0.0,
        reply_tokens: int = 24,
        reply_fn: ReplyFn | None = None,
        block_size: int = 16,
        num_blocks: int = 8192,
        max_model_len: int = 32768,
        embedding_dim: int = 384,
        report_cached_tokens: bool = True,
        tokenizer: Tokenizer | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.model = model
        self.first_token_delay_s = first_token_delay_s
        self.token_interval_s = token_interval_s
        self.reply_tokens = reply_tokens
        self.reply_fn = reply_fn
        self.max_model_len = max_model_len
        self.embedding_dim = embedding_dim
        self.report_cached_tokens = report_cached_tokens
        self.tokenizer = tokenizer or default_tokenizer()
        self.cache = PrefixCacheSimulator(block_size=block_size, num_blocks=num_blocks)
        self.metrics = _Metrics(model)
        self.requests: list[RecordedRequest] = []
        self._failures: list[_Failure] = []
        self._scripts: list[ScriptedReply] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server = ThreadedUvicorn(self.app(), host=host, port=port)

    # --- lifecycle -----------------------------------------------------------------

    def start(self) -> FakeVLLM:
        self._stopping.clear()
        self._server.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._server.stop()

    def __enter__(self) -> FakeVLLM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def root_url(self) -> str:
        return f"http://{self._server.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    # --- test controls -------------------------------------------------------------

    def inject(self, kind: FailureKind, times: int | None = 1, after_chunks: int = 2) -> None:
        """Fail the next ``times`` chat requests (None: all until ``clear_failures``).

        ``http_500``: answer 500 with an OpenAI error body. ``hang``: send the
        headers, then nothing until the client goes away. ``drop``: stream
        ``after_chunks`` chunks of the reply (text or tool-call fragments), then
        cut the TCP connection.
        """
        with self._lock:
            self._failures.append(_Failure(kind, times, after_chunks))

    def clear_failures(self) -> None:
        with self._lock:
            self._failures.clear()

    def script(self, *replies: ScriptedReply) -> None:
        """Queue ``replies``: each next chat request streams the next one (see the module doc)."""
        with self._lock:
            self._scripts.extend(replies)

    def reset(self) -> None:
        """Forget recorded requests, scripted replies not yet given and the prefix cache."""
        with self._lock:
            self.requests.clear()
            self._scripts.clear()
        self.cache.reset()

    def chat_requests(self) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests if r.path.endswith("/chat/completions")]

    def wait_for(
        self, predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.01
    ) -> bool:
        """Poll ``predicate`` (from a test's thread) until true or ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(interval)
        return predicate()

    def _take_failure(self) -> _Failure | None:
        with self._lock:
            if not self._failures:
                return None
            failure = self._failures[0]
            if failure.remaining is not None:
                failure.remaining -= 1
                if failure.remaining <= 0:
                    self._failures.pop(0)
            return failure

    def _take_script(self) -> ScriptedReply | None:
        with self._lock:
            return self._scripts.pop(0) if self._scripts else None

    async def _record(self, request: Request, body: dict[str, Any]) -> RecordedRequest:
        rec = RecordedRequest(
            path=request.url.path,
            body=body,
            headers={k.lower(): v for k, v in request.headers.items()},
            received_at=time.monotonic(),
            # Starlette keeps the body it read for request.json(): no second read.
            raw_body=await request.body(),
        )
        with self._lock:
            self.requests.append(rec)
        return rec

    # --- the ASGI app ----------------------------------------------------------------

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/embeddings", self._embeddings, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
                Route("/tokenize", self._tokenize, methods=["POST"]),
                Route("/health", self._health, methods=["GET"]),
                Route("/metrics", self._metrics, methods=["GET"]),
            ]
        )

    async def _health(self, request: Request) -> Response:
        return Response(status_code=200)

    async def _models(self, request: Request) -> Response:
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": self.model,
                        "object": "model",
                        "created": 0,
                        "owned_by": "vllm",
                        "root": self.model,
                        "max_model_len": self.max_model_len,
                    }
                ],
            }
        )

    async def _metrics(self, request: Request) -> Response:
        # Prometheus text by default, OpenMetrics when asked, as vLLM's endpoint does.
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encoder(self.metrics.registry), media_type=content_type)

    async def _tokenize(self, request: Request) -> Response:
        body = await _json_body(request)
        if body is None:
            return _error(400, "request body must be a JSON object")
        if "messages" in body:
            generation_prompt = bool(body.get("add_generation_prompt", True))
            text = render_prompt(
                body["messages"], body.get("tools"), add_generation_prompt=generation_prompt
            )
        elif isinstance(body.get("prompt"), str):
            text = body["prompt"]
        else:
            return _error(400, "give 'prompt' (a string) or 'messages'")
        tokens = self.tokenizer.encode(text)
        return JSONResponse(
            {
                "count": len(tokens),
                "max_model_len": self.max_model_len,
                "tokens": tokens,
                "token_strs": None,
            }
        )

    async def _embeddings(self, request: Request) -> Response:
        body = await _json_body(request)
        if body is None:
            return _error(400, "request body must be a JSON object")
        raw = body.get("input")
        inputs = [raw] if isinstance(raw, str) else raw
        if not isinstance(inputs, list) or not all(isinstance(t, str) for t in inputs):
            return _error(400, "'input' must be a string or a list of strings")
        await self._record(request, body)
        data = [
            {"object": "embedding", "index": i, "embedding": self.embed(text)}
            for i, text in enumerate(inputs)
        ]
        n = sum(self.tokenizer.count(t) for t in inputs)
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "model": self.model,
                "usage": {"prompt_tokens": n, "total_tokens": n},
            }
        )

    def embed(self, text: str) -> list[float]:
        """A deterministic unit vector for ``text`` (same text, same vector)."""
        seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")
        v = np.random.default_rng(seed).standard_normal(self.embedding_dim)
        v /= np.linalg.norm(v)
        return [float(x) for x in v]

    async def _chat(self, request: Request) -> Response | _ChatStream:
        body = await _json_body(request)
        if body is None:
            return _error(400, "request body must be a JSON object")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return _error(400, "'messages' must be a non-empty list")
        rec = await self._record(request, body)
        failure = self._take_failure()
        if failure is not None:
            rec.failure = failure.kind
            if failure.kind == "http_500":
                rec.status = 500
                return _error(500, "injected failure: internal server error", "InternalServerError")
        prompt_ids = self.tokenizer.encode(render_prompt(messages, body.get("tools")))
        rec.prompt_tokens = len(prompt_ids)
        if len(prompt_ids) >= self.max_model_len:
            rec.status = 400
            return _error(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens. "
                f"However, your request has {len(prompt_ids)} input tokens.",
            )
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 1 << 30
        scripted = self._take_script() or called_tools(body)
        if scripted is not None:
            reply = scripted.text
        elif self.reply_fn is not None:
            reply = self.reply_fn(messages)
        else:
            reply = default_reply(messages, self.reply_tokens, self.tokenizer)
        pieces, finish_reason = self._cut(split_pieces(reply), int(max_tokens))
        deltas: list[dict[str, Any]] = [{"content": piece} for piece in pieces]
        if scripted is not None and finish_reason != "length":
            rec.tool_calls_sent = scripted.resolved_calls()
            deltas += scripted.deltas
            deltas += ({"tool_calls": [f]} for f in scripted.fragments(rec.tool_calls_sent))
            finish_reason = scripted.finish_reason or (
                "tool_calls" if rec.tool_calls_sent else "stop"
            )
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return _ChatStream(self, rec, prompt_ids, deltas, finish_reason, include_usage, failure)
        return await self._chat_whole(rec, prompt_ids, pieces, finish_reason)

    def _cut(self, pieces: list[str], max_tokens: int) -> tuple[list[str], str]:
        out: list[str] = []
        total = 0
        for piece in pieces:
            n = self.tokenizer.count(piece)
            if total + n > max_tokens:
                return out, "length"
            out.append(piece)
            total += n
        return out, "stop"

    async def _chat_whole(
        self, rec: RecordedRequest, prompt_ids: list[int], pieces: list[str], finish: str
    ) -> Response:
        self.metrics.running.labels(**self.metrics.labels).inc()
        try:
            await asyncio.sleep(self.first_token_delay_s)
            rec.first_token_at = time.monotonic()
            self.metrics.ttft.labels(**self.metrics.labels).observe(
                rec.first_token_at - rec.received_at
            )
            await asyncio.sleep(self.token_interval_s * max(len(pieces) - 1, 0))
        finally:
            self.metrics.running.labels(**self.metrics.labels).dec()
        text = "".join(pieces)
        usage = self._finish(rec, prompt_ids, text + tool_calls_text(rec.tool_calls_sent))
        rec.finished_at = time.monotonic()
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if rec.tool_calls_sent:
            message["content"] = text or None
            message["tool_calls"] = rec.tool_calls_sent
        return JSONResponse(
            {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.model,
                "choices": [
                    {
                        "index": 0,
                        "message": message,
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                ],
                "usage": usage,
            }
        )

    def _finish(self, rec: RecordedRequest, prompt_ids: list[int], text: str) -> dict[str, Any]:
        """Account a request that ran: prefix cache, counters, the usage object."""
        output_ids = self.tokenizer.encode(text)
        try:
            result = self.cache.process(prompt_ids, output_ids)
        except PromptTooLong:
            # Larger than the whole KV pool: served, but nothing stays cached.
            result = CacheResult(len(prompt_ids), 0, 0)
        rec.cached_tokens = result.cached_tokens
        rec.completion_tokens = len(output_ids)
        m = self.metrics
        m.prefix_queries.labels(**m.labels).inc(result.prompt_tokens)
        m.prefix_hits.labels(**m.labels).inc(result.cached_tokens)
        m.prompt_tokens.labels(**m.labels).inc(result.prompt_tokens)
        m.generation_tokens.labels(**m.labels).inc(len(output_ids))
        usage: dict[str, Any] = {
            "prompt_tokens": len(prompt_ids),
            "total_tokens": len(prompt_ids) + len(output_ids),
            "completion_tokens": len(output_ids),
        }
        if self.report_cached_tokens:
            usage["prompt_tokens_details"] = {"cached_tokens": result.cached_tokens}
        return usage


class _ChatStream:
    """The SSE body of one streamed chat completion, as a raw ASGI response.

    It listens for the client's disconnect while it streams (or hangs), so the
    disconnect is recorded when it happens, not at the next write.
    """

    def __init__(
        self,
        server: FakeVLLM,
        rec: RecordedRequest,
        prompt_ids: list[int],
        deltas: list[dict[str, Any]],
        finish_reason: str,
        include_usage: bool,
        failure: _Failure | None,
    ) -> None:
        self.server = server
        self.rec = rec
        self.prompt_ids = prompt_ids
        self.deltas = deltas
        self.finish_reason = finish_reason
        self.include_usage = include_usage
        self.failure = failure
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.sent_pieces: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                ],
            }
        )
        running = self.server.metrics.running.labels(**self.server.metrics.labels)
        running.inc()
        producer = asyncio.ensure_future(self._produce(send))
        watcher = asyncio.ensure_future(self._watch_disconnect(receive))
        try:
            done, _ = await asyncio.wait({producer, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if producer not in done:
                # The client left first: stop generating, as vLLM aborts the request.
                producer.cancel()
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await producer
                if self.sent_pieces:
                    # vLLM keeps the KV it computed before the abort.
                    self.server._finish(self.rec, self.prompt_ids, "".join(self.sent_pieces))
            else:
                producer.result()  # re-raise _Dropped so uvicorn cuts the connection
        finally:
            watcher.cancel()
            running.dec()
            self.rec.finished_at = time.monotonic()

    async def _watch_disconnect(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.rec.disconnected_at = time.monotonic()
                return

    async def _produce(self, send: Send) -> None:
        async for chunk in self._chunks():
            try:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except OSError:
                if self.rec.disconnected_at is None:
                    self.rec.disconnected_at = time.monotonic()
                raise
            self.rec.chunks_sent += 1
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _event(self, payload: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        return self._event(
            {
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.server.model,
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                ],
            }
        )

    async def _chunks(self) -> AsyncIterator[bytes]:
        server = self.server
        failure = self.failure
        if failure is not None and failure.kind == "hang":
            # Until the client leaves (the watcher cancels this) or the server
            # stops; _stopping is a threading.Event set from the test's thread.
            while not server._stopping.is_set():  # noqa: ASYNC110
                await asyncio.sleep(0.02)
            return
        await asyncio.sleep(server.first_token_delay_s)
        yield self._chunk({"role": "assistant", "content": ""})
        for i, delta in enumerate(self.deltas):
            if i > 0 and server.token_interval_s > 0:
                await asyncio.sleep(server.token_interval_s)
            if failure is not None and failure.kind == "drop" and i >= failure.after_chunks:
                raise _Dropped("injected failure: connection dropped mid-stream")
            if i == 0:
                self.rec.first_token_at = time.monotonic()
                server.metrics.ttft.labels(**server.metrics.labels).observe(
                    self.rec.first_token_at - self.rec.received_at
                )
            last = i == len(self.deltas) - 1
            if isinstance(delta.get("content"), str):
                self.sent_pieces.append(delta["content"])
            yield self._chunk(delta, self.finish_reason if last else None)
        if not self.deltas:
            yield self._chunk({}, self.finish_reason)
        calls = tool_calls_text(self.rec.tool_calls_sent)
        usage = server._finish(self.rec, self.prompt_ids, "".join(self.sent_pieces) + calls)
        self.sent_pieces = []  # accounted; a late disconnect must not count them again
        if self.include_usage:
            yield self._event(
                {
                    "id": self.id,
                    "object": "chat.completion.chunk",
                    "created": self.created,
                    "model": server.model,
                    "choices": [],
                    "usage": usage,
                }
            )
        yield b"data: [DONE]\n\n"


async def _json_body(request: Request) -> dict[str, Any] | None:
    try:
        body = await request.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _error(status: int, message: str, kind: str = "BadRequestError") -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": None, "code": status}},
        status_code=status,
    )


# --------------------------------------------------------------------------------------
# Running a uvicorn server from a thread
# --------------------------------------------------------------------------------------


@dataclass
class ThreadedUvicorn:
    """An ASGI app served by uvicorn on 127.0.0.1 from a daemon thread.

    The socket is bound before the thread starts, so the port is known and
    cannot be taken in between.
    """

    app: Any
    host: str = "127.0.0.1"
    port: int = 0
    _server: uvicorn.Server | None = field(default=None, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)

    def start(self, timeout: float = 10.0) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = int(sock.getsockname()[1])
        # log_config=None: leave the process's logging setup alone (pytest's, the app's).
        config = uvicorn.Config(
            self.app,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=1,
        )
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, daemon=True, name=f"uvicorn-{self.port}"
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn on {self.host}:{self.port} did not start")
            time.sleep(0.01)

    def stop(self, timeout: float = 5.0) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.should_exit = True
        thread.join(timeout)
        if thread.is_alive():
            server.force_exit = True
            thread.join(timeout)
        self._server = None
        self._thread = None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="fake vLLM replica (OpenAI-compatible)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--model", default="fake-model")
    parser.add_argument("--first-token-delay-ms", type=float, default=0.0)
    parser.add_argument("--token-interval-ms", type=float, default=0.0)
    parser.add_argument("--reply-tokens", type=int, default=24)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-blocks", type=int, default=8192)
    args = parser.parse_args(argv)
    fake = FakeVLLM(
        model=args.model,
        first_token_delay_s=args.first_token_delay_ms / 1000.0,
        token_interval_s=args.token_interval_ms / 1000.0,
        reply_tokens=args.reply_tokens,
        block_size=args.block_size,
        num_blocks=args.num_blocks,
        host=args.host,
        port=args.port,
    )
    uvicorn.run(fake.app(), host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
