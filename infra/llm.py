"""The LLM client: streaming chat completions from OpenAI-compatible servers (vLLM).

This module owns the client interface the rest of tiermem codes against
(``LLMClient``, its messages, events and results, ``LLMError``), the base both
implementations share (``LLMBase``: ``complete`` on top of ``stream_chat``),
the HTTP implementation (``OpenAICompatibleLLM``) and ``build_llm``, which
picks the implementation from Settings: the offline development LLM when no
URL is set, else one or more replicas behind a router (fixed URLs, or
discovered from Kubernetes).

Messages are OpenAI's chat format (``ChatMessage``). Tool definitions go in
the request's ``tools`` field exactly as the caller gives them, encoded by
orjson, so identical input gives identical bytes; their canonical order is the
caller's business (it is part of the stable prefix vLLM caches). ``tool_choice``
constrains which tools may be called without changing that list. A request
without tools carries neither key. Text streams as ``LLMToken``s as it
arrives; tool calls stream as fragments (``ToolCallAssembler`` puts them
together) and are delivered only complete, in the final ``LLMDone``.

Failure handling, in one place:
- every failure surfaces as ``LLMError`` with a ``kind`` (timeout, connect,
  http, protocol) and ``retryable`` (True only when nothing had been streamed
  to the consumer yet and the cause is transient: a caller may retry without
  the user seeing a duplicated start of a reply). Tool-call fragments are never
  relayed, so a reply that fails while only they had arrived stays retryable;
- a connect error marks the replica unhealthy and the request moves to the
  session's next replica, if there is one;
- the first output (text or a tool-call fragment) must come within
  ``first_token_timeout_s`` of the request (prefill of a long prompt may take
  a while) and each later chunk within ``read_timeout_s``;
- when the consumer stops iterating (the user went away) the HTTP response is
  closed at once, which makes vLLM abort the request and free its KV blocks.
  Consumers should close the iterator explicitly
  (``async with contextlib.aclosing(llm.stream_chat(...))``) rather than rely
  on garbage collection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, Required, TypeAlias, TypedDict

import httpx2
import orjson

from infra.errors import Unavailable
from infra.routing import NoReplicas, Pick, RendezvousRouter, Router
from infra.settings import Settings

log = logging.getLogger(__name__)

ErrorKind = Literal["timeout", "connect", "http", "protocol"]

# --- messages, tools and tool calls (OpenAI's chat format) ---------------------------

Role = Literal["system", "user", "assistant", "tool"]


class FunctionCallDict(TypedDict):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCallDict(TypedDict):
    """One entry of an assistant message's ``tool_calls``."""

    id: str
    type: Literal["function"]
    function: FunctionCallDict


class ChatMessage(TypedDict, total=False):
    """One message of a chat request.

    ``content`` is None on an assistant message that only calls tools. A
    ``tool`` message answers the call whose id is its ``tool_call_id``.
    """

    role: Required[Role]
    content: str | None
    tool_calls: list[ToolCallDict]
    tool_call_id: str
    name: str


class NamedFunction(TypedDict):
    name: str


class NamedToolChoice(TypedDict):
    """``tool_choice`` that forces a call of one function."""

    type: Literal["function"]
    function: NamedFunction


ToolChoice: TypeAlias = Literal["auto", "none", "required"] | NamedToolChoice
_TOOL_CHOICE_MODES = ("auto", "none", "required")


def named_tool_choice(name: str) -> NamedToolChoice:
    """The ``tool_choice`` that makes the model call function ``name``."""
    return {"type": "function", "function": {"name": name}}


def tool_name(tool: Mapping[str, Any]) -> str | None:
    """The function name of a tool definition (``{"type": "function", "function": {...}}``)."""
    function = tool.get("function")
    name = function.get("name") if isinstance(function, Mapping) else None
    return name if isinstance(name, str) else None


class InvalidToolArguments(ValueError):
    """A tool call's ``arguments`` are not a JSON object (models do write broken JSON)."""

    def __init__(self, call: ToolCall, reason: str) -> None:
        super().__init__(
            f"arguments of tool call {call.id} ({call.name}) are {reason}: {call.arguments[:200]!r}"
        )
        self.call = call


_JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}  # fmt: skip


@dataclass(frozen=True)
class ToolCall:
    """A complete tool call the model made."""

    id: str
    name: str
    arguments: str  # the raw JSON text the model produced

    def to_message_dict(self) -> ToolCallDict:
        """The call as an entry of the assistant message's ``tool_calls``."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }

    def parsed_arguments(self) -> dict[str, Any]:
        """The arguments as a dict; raises ``InvalidToolArguments`` when they are not an object.

        Empty arguments are ``{}``: some servers send nothing for a call of a
        function without parameters.
        """
        if not self.arguments.strip():
            return {}
        try:
            value = orjson.loads(self.arguments)
        except orjson.JSONDecodeError as e:
            raise InvalidToolArguments(self, f"not valid JSON ({e})") from None
        if not isinstance(value, dict):
            kind = _JSON_KINDS.get(type(value), type(value).__name__)
            raise InvalidToolArguments(self, f"{kind}, not an object")
        return value


def assistant_message(text: str, tool_calls: Sequence[ToolCall] = ()) -> ChatMessage:
    """The assistant message of a reply, to append to the conversation."""
    message: ChatMessage = {
        "role": "assistant",
        "content": text if text or not tool_calls else None,
    }
    if tool_calls:
        message["tool_calls"] = [call.to_message_dict() for call in tool_calls]
    return message


@dataclass
class _PartialCall:
    id: str | None = None
    name: list[str] = field(default_factory=list)
    arguments: list[str] = field(default_factory=list)


class ToolCallAssembler:
    """Puts the tool-call fragments of a streamed reply together into complete calls.

    OpenAI's streaming format (vLLM's too) sends ``delta.tool_calls`` as a list
    of fragments ``{"index", "id", "type", "function": {"name", "arguments"}}``.
    The ``index`` says which call a fragment belongs to (several calls may
    interleave); ``id`` and ``name`` usually come only with the first fragment
    of an index, ``arguments`` in many pieces that are only JSON once joined.
    Pieces of a name are joined too. A call whose id never came gets
    ``call_<index>``, stable across a retry of the same reply. A fragment
    without ``index`` continues the previous call (or starts call 0): servers
    that omit it send one call at a time.
    """

    def __init__(self) -> None:
        self._calls: dict[int, _PartialCall] = {}
        self._last: int = 0

    def add(self, fragments: Any) -> None:
        """Take the ``delta.tool_calls`` of one chunk; ValueError when it is malformed."""
        if not isinstance(fragments, list):
            raise ValueError(f"tool_calls is {type(fragments).__name__}, not a list")
        for fragment in fragments:
            if not isinstance(fragment, dict):
                raise ValueError(f"a tool_calls entry is {type(fragment).__name__}, not an object")
            index = fragment.get("index", self._last)
            if not isinstance(index, int) or isinstance(index, bool) or index < 0:
                raise ValueError(f"tool call index {index!r} is not a non-negative integer")
            self._last = index
            call = self._calls.setdefault(index, _PartialCall())
            call_id = fragment.get("id")
            if call_id and isinstance(call_id, str) and call.id is None:
                call.id = call_id
            function = fragment.get("function") or {}
            if not isinstance(function, dict):
                raise ValueError(f"function of tool call {index} is not an object")
            name = function.get("name")
            if name and isinstance(name, str):
                call.name.append(name)
            arguments = function.get("arguments")
            if isinstance(arguments, str):
                call.arguments.append(arguments)
            elif arguments is not None:
                # A server that sends the arguments as an object, not as JSON text.
                call.arguments.append(orjson.dumps(arguments).decode())

    def calls(self) -> tuple[ToolCall, ...]:
        """The complete calls in ``index`` order; ValueError for a call without a name."""
        out: list[ToolCall] = []
        for index in sorted(self._calls):
            call = self._calls[index]
            name = "".join(call.name)
            if not name:
                raise ValueError(f"tool call {index} has no function name")
            out.append(ToolCall(call.id or f"call_{index}", name, "".join(call.arguments)))
        return tuple(out)


# --- events and results --------------------------------------------------------------


@dataclass(frozen=True)
class LLMUsage:
    prompt_tokens: int
    completion_tokens: int
    # Prompt tokens served from the prefix cache; None when the server does
    # not report it (vLLM reports it with --enable-prompt-tokens-details).
    cached_tokens: int | None


@dataclass(frozen=True)
class LLMToken:
    text: str


@dataclass(frozen=True)
class LLMDone:
    usage: LLMUsage | None
    replica: str
    # Time to the first output of the reply: text, or a tool-call fragment.
    ttft_ms: float
    finish_reason: str | None
    # The session did not get its first-choice replica (see routing.Pick):
    # a prefix-cache break with reason route_change.
    moved: bool = False
    # Complete calls, in index order; never delivered piecemeal.
    tool_calls: tuple[ToolCall, ...] = ()


LLMEvent = LLMToken | LLMDone


@dataclass(frozen=True)
class LLMResult:
    """A whole reply (``complete``)."""

    text: str
    tool_calls: tuple[ToolCall, ...]
    usage: LLMUsage | None
    finish_reason: str | None

    def to_message(self) -> ChatMessage:
        return assistant_message(self.text, self.tool_calls)


class LLMError(Unavailable):
    """Any failure of an LLM request, with what a caller needs to react.

    Its ``code`` is ``llm_<kind>`` (``llm_timeout``, ``llm_connect``, ``llm_http``,
    ``llm_protocol``); as an HTTP error it is a 502 (the LLM behind us failed)."""

    http_status = 502

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        retryable: bool,
        status: int | None = None,
        replica: str | None = None,
    ) -> None:
        super().__init__(message, code=f"llm_{kind}", retryable=retryable)
        self.kind: ErrorKind = kind
        self.status = status
        self.replica = replica

    def __repr__(self) -> str:
        return f"LLMError(kind={self.kind!r}, retryable={self.retryable}, {self.message!r})"


class LLMClient(Protocol):
    """What the rest of tiermem codes against.

    ``stream_chat`` yields ``LLMToken``s, then exactly one ``LLMDone`` (with
    the reply's tool calls, if any), or raises ``LLMError``. It is an async
    generator: close it when you stop early (``contextlib.aclosing``) so the
    upstream request is aborted at once. A ``tool_choice`` that cannot be
    honoured (no tools, a function not offered) raises ``ValueError`` before
    any request is sent.
    """

    name: str
    is_dev: bool

    @property
    def model_label(self) -> str:
        """Which model answers, as far as this client knows: part of every cache
        key of what the model wrote (memory/cache.py), so a new model misses."""
        ...

    def stream_chat(
        self,
        messages: Sequence[ChatMessage],
        *,
        session_key: str,
        max_tokens: int | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: ToolChoice | None = None,
        temperature: float | None = None,
    ) -> AsyncGenerator[LLMEvent, None]: ...

    async def complete(
        self,
        messages: Sequence[ChatMessage],
        *,
        session_key: str,
        max_tokens: int | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: ToolChoice | None = None,
        temperature: float | None = None,
    ) -> LLMResult: ...

    async def health(self) -> bool: ...

    async def aclose(self) -> None: ...


class ReplicaDiscovery(Protocol):
    """Something that keeps a router's replica set current (see k8s_discovery)."""

    async def start(self) -> None: ...

    async def wait_ready(self, within_s: float) -> bool: ...

    async def aclose(self) -> None: ...


async def collect(events: AsyncGenerator[LLMEvent, None]) -> tuple[str, LLMDone | None]:
    """Drain a stream: the whole text and its final ``LLMDone``."""
    parts: list[str] = []
    done: LLMDone | None = None
    async with contextlib.aclosing(events):
        async for ev in events:
            if isinstance(ev, LLMToken):
                parts.append(ev.text)
            else:
                done = ev
    return "".join(parts), done


class LLMBase(ABC):
    """What every ``LLMClient`` implementation shares: ``complete`` and the tools rules."""

    name: str
    is_dev: bool

    @property
    def model_label(self) -> str:
        return self.name

    @abstractmethod
    def stream_chat(
        self,
        messages: Sequence[ChatMessage],
        *,
        session_key: str,
        max_tokens: int | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: ToolChoice | None = None,
        temperature: float | None = None,
    ) -> AsyncGenerator[LLMEvent, None]: ...

    async def complete(
        self,
        messages: Sequence[ChatMessage],
        *,
        session_key: str,
        max_tokens: int | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: ToolChoice | None = None,
        temperature: float | None = None,
    ) -> LLMResult:
        """The whole reply of ``stream_chat`` with the same arguments."""
        text, done = await collect(
            self.stream_chat(
                messages,
                session_key=session_key,
                max_tokens=max_tokens,
                tools=tools,
                tool_choice=tool_choice,
                temperature=temperature,
            )
        )
        if done is None:
            raise LLMError(
                "protocol", f"{self.name}: the reply ended without LLMDone", retryable=False
            )
        return LLMResult(text, done.tool_calls, done.usage, done.finish_reason)

    @abstractmethod
    async def health(self) -> bool: ...

    @abstractmethod
    async def aclose(self) -> None: ...

    @staticmethod
    def _tool_choice(
        tools: Sequence[Mapping[str, Any]] | None, tool_choice: ToolChoice | None
    ) -> ToolChoice | None:
        """The ``tool_choice`` to send (None: send none); ValueError when it cannot be honoured.

        Without tools, "auto" and "none" mean what no tools mean anyway, so
        they are dropped; "required" or a named function would ask the server
        for the impossible (vLLM answers 400), so they fail here, before any
        request.
        """
        if tool_choice is None:
            return None
        if isinstance(tool_choice, str):
            if tool_choice not in _TOOL_CHOICE_MODES:
                raise ValueError(f"tool_choice {tool_choice!r} is not one of {_TOOL_CHOICE_MODES}")
            if not tools:
                if tool_choice == "required":
                    raise ValueError("tool_choice 'required' needs tools")
                return None
            return tool_choice
        function = tool_choice.get("function") if isinstance(tool_choice, Mapping) else None
        name = function.get("name") if isinstance(function, Mapping) else None
        if (
            not isinstance(tool_choice, Mapping)
            or tool_choice.get("type") != "function"
            or not isinstance(name, str)
        ):
            raise ValueError(
                f"tool_choice {tool_choice!r} is not "
                "{'type': 'function', 'function': {'name': ...}}"
            )
        if not any(tool_name(tool) == name for tool in tools or ()):
            raise ValueError(f"tool_choice names {name!r}, which is not among the tools")
        return tool_choice


def _json_default(value: Any) -> Any:
    # orjson encodes dicts, lists and tuples itself; other mappings and
    # sequences a caller may hand over (a MappingProxyType of a frozen tool
    # list) come here.
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return list(value)
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


class _ReadDeadline:
    """The deadlines of one response's reads, on one timer for the whole stream.

    A read must return by the first-token deadline until output has started,
    then within ``read_timeout`` of when it began. Entering ``asyncio.timeout``
    around every read armed and cancelled a timer per chunk (a few microseconds
    of the event loop per token, on every turn); this timer is armed once and,
    when it fires early, moved to the deadline of the read in progress.

    Only a read is timed: the time the consumer spends between events is its
    own. When the deadline passes while no read is in progress, the timer looks
    again shortly (``RECHECK_S``) rather than cancel the consumer elsewhere.
    Expiry cancels the reading task the way ``asyncio.timeout`` does, and
    ``timed_out`` tells that cancellation from anyone else's.
    """

    RECHECK_S = 0.05

    __slots__ = (
        "_base", "_first", "_handle", "_loop", "_read_timeout", "_task",
        "expired", "output_started", "read_from", "reading",
    )  # fmt: skip

    def __init__(
        self, loop: asyncio.AbstractEventLoop, first_deadline: float, read_timeout: float
    ) -> None:
        task = asyncio.current_task()
        assert task is not None, "reads are timed from inside a task"
        self._loop = loop
        self._task = task
        self._base = task.cancelling()
        self._first = first_deadline
        self._read_timeout = read_timeout
        self.output_started = False
        self.read_from = 0.0  # when the read in progress began (after output started)
        self.reading = False
        self.expired = False
        self._handle = loop.call_at(first_deadline, self._check)

    def _check(self) -> None:
        now = self._loop.time()
        due = self.read_from + self._read_timeout if self.output_started else self._first
        if now < due:
            self._handle = self._loop.call_at(due, self._check)
        elif not self.reading:
            self._handle = self._loop.call_at(now + self.RECHECK_S, self._check)
        else:
            self.expired = True
            self._task.cancel()

    def start_read_deadlines(self) -> None:
        """Output has started: from now on each read has ``read_timeout`` from
        ``read_from`` (sooner, as a rule, than the first-token deadline)."""
        self.output_started = True
        self._handle.cancel()
        self._handle = self._loop.call_at(self.read_from + self._read_timeout, self._check)

    def timed_out(self) -> bool:
        """On a CancelledError out of a read: whether this deadline caused it
        (and no one else asked for a cancel as well)."""
        return self.expired and self._task.uncancel() <= self._base

    def close(self) -> None:
        self._handle.cancel()


class _ConnectFailed(Exception):
    """Internal: the replica could not be reached; the request may move on."""

    def __init__(self, error: LLMError) -> None:
        super().__init__(error.message)
        self.error = error


class OpenAICompatibleLLM(LLMBase):
    """Streams ``/chat/completions`` from one or more OpenAI-compatible replicas.

    Replica URLs are base URLs ending in ``/v1``. One ``httpx2.AsyncClient`` is
    shared by all requests; create the object inside the process that uses it
    (never at import time, never across a fork).
    """

    is_dev = False

    def __init__(
        self,
        replicas: Iterable[str] = (),
        *,
        router: Router | None = None,
        discovery: ReplicaDiscovery | None = None,
        model: str = "default",
        api_key: str | None = None,
        connect_timeout_s: float = 5.0,
        first_token_timeout_s: float = 60.0,
        read_timeout_s: float = 30.0,
        max_tokens: int = 512,
        temperature: float = 0.7,
        name: str = "openai-compatible",
        transport: httpx2.AsyncBaseTransport | None = None,
    ) -> None:
        self.name = name
        self.router: Router = router or RendezvousRouter()
        replicas = list(replicas)
        if replicas:
            self.router.set_replicas(replicas)
        self._discovery = discovery
        self._discovery_started = False
        self._model = model
        self._served_models: dict[str, str] = {}
        self._api_key = api_key
        self._connect_timeout = connect_timeout_s
        self._first_token_timeout = first_token_timeout_s
        self._read_timeout = read_timeout_s
        self._max_tokens = max_tokens
        self._temperature = temperature
        # httpx2's own read timeout is only a backstop: the first-token and
        # between-token deadlines are enforced on each read below (_ReadDeadline).
        self._http = httpx2.AsyncClient(
            timeout=httpx2.Timeout(
                connect=connect_timeout_s,
                read=max(first_token_timeout_s, read_timeout_s) + 1.0,
                write=connect_timeout_s,
                pool=connect_timeout_s,
            ),
            limits=httpx2.Limits(max_connections=1024, max_keepalive_connections=128),
            transport=transport,
        )

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        router: Router | None = None,
        discovery: ReplicaDiscovery | None = None,
        replicas: Sequence[str] | None = None,
        model: str | None = None,
        name: str = "openai-compatible",
    ) -> OpenAICompatibleLLM:
        """The client Settings describe; ``replicas``, ``model`` and ``name`` replace
        what they say (the embedded engine: its own URL and served model)."""
        urls = list(replicas) if replicas is not None else settings.llm_urls
        return cls(
            [] if discovery is not None else urls,
            router=router or RendezvousRouter(load_factor=settings.llm_load_factor),
            discovery=discovery,
            model=model or settings.llm_model,
            name=name,
            api_key=settings.llm_api_key,
            connect_timeout_s=settings.llm_connect_timeout_s,
            first_token_timeout_s=settings.llm_first_token_timeout_s,
            read_timeout_s=settings.llm_read_timeout_s,
            max_tokens=settings.llm_max_tokens,
            temperature=settings.llm_temperature,
        )

    # --- public API ---------------------------------------------------------------

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
        body = self._request_body(messages, max_tokens, tools, tool_choice, temperature)
        await self._ensure_discovery()
        try:
            pick = self.router.pick(session_key)
        except NoReplicas as e:
            raise LLMError("connect", str(e), retryable=True) from None
        tried: set[str] = set()
        while True:
            try:
                async for event in self._stream_once(pick, body, session_key, started):
                    yield event
                return
            except _ConnectFailed as failed:
                tried.add(pick.replica)
                try:
                    nxt = self.router.pick(session_key)
                except NoReplicas:
                    raise failed.error from None
                if nxt.replica in tried:
                    raise failed.error from None
                log.warning("LLM replica %s unreachable, trying %s", pick.replica, nxt.replica)
                pick = Pick(nxt.replica, moved=True)

    @property
    def replicas(self) -> list[str]:
        """The replicas known now (configured, or as discovery last listed them)."""
        return self.router.replicas

    async def warm(
        self,
        replica: str,
        messages: Sequence[ChatMessage],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> LLMUsage | None:
        """Sends ``messages`` to ``replica`` alone for one token, so its prefix cache
        holds their KV blocks before a session needs them; raises ``LLMError``.
        With ``tools`` the request says ``tool_choice: "none"``: the model must
        not spend its token on a call."""
        await self._ensure_discovery()
        body = self._request_body(messages, 1, tools, "none" if tools else None, 0.0)
        started = asyncio.get_running_loop().time()
        usage: LLMUsage | None = None
        try:
            async for event in self._stream_once(Pick(replica, False), body, "prewarm", started):
                if isinstance(event, LLMDone):
                    usage = event.usage
        except _ConnectFailed as failed:
            raise failed.error from None
        return usage

    async def health(self) -> bool:
        """True when at least one replica answers ``GET /models``; updates router health."""
        await self._ensure_discovery()
        replicas = self.router.replicas
        if not replicas:
            return False
        results = await asyncio.gather(*(self._probe(r) for r in replicas))
        return any(results)

    async def aclose(self) -> None:
        if self._discovery is not None:
            await self._discovery.aclose()
        await self._http.aclose()

    # --- internals ----------------------------------------------------------------

    async def _ensure_discovery(self) -> None:
        if self._discovery is None or self._discovery_started:
            return
        try:
            await self._discovery.start()
        except Exception as e:
            # e.g. no in-cluster service account: say so, and try again next request.
            raise LLMError(
                "connect", f"cannot start LLM replica discovery: {_describe(e)}", retryable=True
            ) from e
        self._discovery_started = True
        if not await self._discovery.wait_ready(self._connect_timeout):
            log.warning("LLM replica discovery has not listed replicas yet")

    async def _probe(self, replica: str) -> bool:
        try:
            resp = await self._http.get(
                f"{replica}/models", headers=self._auth_headers(), timeout=self._connect_timeout
            )
        except httpx2.HTTPError:
            self.router.mark_unhealthy(replica)
            return False
        ok = resp.status_code == 200
        if ok:
            self.router.mark_healthy(replica)
            if self._model == "default" and replica not in self._served_models:
                with contextlib.suppress(ValueError, KeyError, TypeError, IndexError):
                    self._served_models[replica] = str(resp.json()["data"][0]["id"])
        else:
            self.router.mark_unhealthy(replica)
        return ok

    def _auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}

    @property
    def model_label(self) -> str:
        """The configured model, else the one the replicas serve (once asked)."""
        if self._model != "default":
            return self._model
        served = sorted(set(self._served_models.values()))
        return ",".join(served) if served else "default"

    async def _model_for(self, replica: str) -> str:
        """The model name to send: the configured one, or the replica's first served model.

        ``"default"`` means "whatever the server serves", which spares users
        from repeating vLLM's --served-model-name in tiermem's settings.
        """
        if self._model != "default":
            return self._model
        cached = self._served_models.get(replica)
        if cached is not None:
            return cached
        try:
            resp = await self._http.get(
                f"{replica}/models", headers=self._auth_headers(), timeout=self._connect_timeout
            )
            data = (resp.json().get("data") or []) if resp.status_code == 200 else []
            model = str(data[0]["id"]) if data else "default"
        except (httpx2.ConnectError, httpx2.ConnectTimeout):
            raise
        except (httpx2.HTTPError, ValueError, KeyError, TypeError, AttributeError):
            return "default"
        self._served_models[replica] = model
        return model

    def _request_body(
        self,
        messages: Sequence[ChatMessage],
        max_tokens: int | None,
        tools: Sequence[Mapping[str, Any]] | None,
        tool_choice: ToolChoice | None,
        temperature: float | None,
    ) -> dict[str, Any]:
        """The request body but its ``model``, which depends on the replica."""
        choice = self._tool_choice(tools, tool_choice)
        body: dict[str, Any] = {
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": max_tokens or self._max_tokens,
            "temperature": self._temperature if temperature is None else temperature,
        }
        if tools:
            # As given: reordering here would hide a caller's unstable order
            # from the caller and still break the prefix cache.
            body["tools"] = tools
            if choice is not None:
                body["tool_choice"] = choice
        return body

    async def _stream_once(
        self,
        pick: Pick,
        body: dict[str, Any],
        session_key: str,
        started: float,
    ) -> AsyncGenerator[LLMEvent, None]:
        replica = pick.replica
        loop = asyncio.get_running_loop()
        first_deadline = started + self._first_token_timeout
        emitted = False
        self.router.acquire(replica)
        try:
            try:
                async with asyncio.timeout_at(first_deadline):
                    model = await self._model_for(replica)
                    # orjson, not httpx2's json= (the standard library's encoder):
                    # the body is the whole prompt, encoded on the way to TTFT.
                    request = self._http.build_request(
                        "POST",
                        f"{replica}/chat/completions",
                        content=orjson.dumps({"model": model, **body}, default=_json_default),
                        headers={
                            "Content-Type": "application/json",
                            "X-Session-ID": session_key,
                            "Accept": "text/event-stream",
                            **self._auth_headers(),
                        },
                    )
                    resp = await self._http.send(request, stream=True)
            except TimeoutError:
                raise LLMError(
                    "timeout",
                    f"LLM replica {replica} did not answer within "
                    f"{self._first_token_timeout:g} s (TIERMEM_LLM_FIRST_TOKEN_TIMEOUT_S)",
                    retryable=True,
                    replica=replica,
                ) from None
            try:
                if resp.status_code != 200:
                    raise await self._http_error(resp, replica)
                self.router.mark_healthy(replica)
                # The body as it arrives, split into lines here: httpx2's
                # aiter_lines (text decoding, then a line decoder, each a
                # generator of its own) would cost more than the rest of a token.
                raw = resp.aiter_bytes()
                pending = b""
                finish_reason: str | None = None
                usage: LLMUsage | None = None
                ttft_ms: float | None = None
                assembler = ToolCallAssembler()
                done = False
                watch = _ReadDeadline(loop, first_deadline, self._read_timeout)
                try:
                    while not done:
                        # After the first output (ttft_ms set) the per-read deadline
                        # applies, also to a reply that is only a tool call.
                        if ttft_ms is not None:
                            watch.read_from = loop.time()
                            if not watch.output_started:
                                watch.start_read_deadlines()
                        watch.reading = True
                        try:
                            data = await anext(raw)
                        except StopAsyncIteration:
                            if finish_reason is not None:
                                break  # ended without [DONE]; the reply itself is complete
                            raise LLMError(
                                "protocol",
                                f"LLM replica {replica} ended the stream before the reply finished",
                                retryable=not emitted,
                                replica=replica,
                            ) from None
                        except asyncio.CancelledError:
                            if watch.timed_out():
                                raise self._timeout_error(
                                    replica, ttft_ms is not None, emitted
                                ) from None
                            raise
                        finally:
                            watch.reading = False
                        *lines, pending = (pending + data).split(b"\n")
                        for line in lines:
                            payload = _sse_data(line)
                            if payload is None:
                                continue
                            if payload == b"[DONE]":
                                done = True
                                break
                            chunk = _parse_chunk(payload, replica, emitted)
                            usage = _usage(chunk.get("usage")) or usage
                            for choice in chunk.get("choices") or ():
                                finish_reason = choice.get("finish_reason") or finish_reason
                                delta = choice.get("delta") or {}
                                text = delta.get("content")
                                if text:
                                    if ttft_ms is None:
                                        ttft_ms = (loop.time() - started) * 1000.0
                                    emitted = True
                                    yield LLMToken(text)
                                fragments = delta.get("tool_calls")
                                if fragments:
                                    if ttft_ms is None:
                                        ttft_ms = (loop.time() - started) * 1000.0
                                    try:
                                        assembler.add(fragments)
                                    except ValueError as e:
                                        raise _malformed_tool_call(replica, e, emitted) from None
                finally:
                    watch.close()
                # Read to the end of the body (normally nothing is left after
                # [DONE]) so the connection returns to the pool: closing it
                # half-read would make httpx2 drop it and reconnect next turn.
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(1.0):
                        async for _ in raw:
                            pass
                if ttft_ms is None:
                    ttft_ms = (loop.time() - started) * 1000.0
                try:
                    tool_calls = assembler.calls()
                except ValueError as e:
                    raise _malformed_tool_call(replica, e, emitted) from None
                yield LLMDone(
                    usage=usage,
                    replica=replica,
                    ttft_ms=ttft_ms,
                    finish_reason=finish_reason,
                    moved=pick.moved,
                    tool_calls=tool_calls,
                )
            finally:
                # Closing an unfinished streamed response drops the connection,
                # which is how vLLM learns to abort the request.
                await resp.aclose()
        except (httpx2.ConnectError, httpx2.ConnectTimeout) as e:
            self.router.mark_unhealthy(replica)
            raise _ConnectFailed(
                LLMError(
                    "connect",
                    f"cannot connect to LLM replica {replica}: {_describe(e)}",
                    retryable=True,
                    replica=replica,
                )
            ) from e
        except httpx2.TimeoutException as e:
            raise LLMError(
                "timeout",
                f"LLM replica {replica} timed out: {_describe(e)}",
                retryable=not emitted,
                replica=replica,
            ) from e
        except httpx2.HTTPError as e:
            raise LLMError(
                "protocol",
                f"LLM replica {replica} broke the stream: {_describe(e)}",
                retryable=not emitted,
                replica=replica,
            ) from e
        finally:
            self.router.release(replica)

    def _timeout_error(self, replica: str, output_started: bool, emitted: bool) -> LLMError:
        if output_started:
            return LLMError(
                "timeout",
                f"LLM replica {replica} stalled: no token for {self._read_timeout:g} s "
                "(TIERMEM_LLM_READ_TIMEOUT_S)",
                retryable=not emitted,
                replica=replica,
            )
        return LLMError(
            "timeout",
            f"LLM replica {replica} sent no first token within "
            f"{self._first_token_timeout:g} s (TIERMEM_LLM_FIRST_TOKEN_TIMEOUT_S)",
            retryable=True,
            replica=replica,
        )

    async def _http_error(self, resp: httpx2.Response, replica: str) -> LLMError:
        body = (await resp.aread())[:2000].decode("utf-8", errors="replace")
        detail = body
        try:
            err = json.loads(body).get("error")
            if isinstance(err, dict):
                detail = str(err.get("message") or err)
            elif err:
                detail = str(err)
        except (ValueError, AttributeError):
            pass
        status = resp.status_code
        return LLMError(
            "http",
            f"LLM replica {replica} answered HTTP {status}: {detail.strip()[:500]}",
            retryable=status == 429 or status >= 500,
            status=status,
            replica=replica,
        )


def _sse_data(line: bytes) -> bytes | None:
    """The data of an SSE ``data:`` line; None for blank lines, comments, other fields."""
    if not line.startswith(b"data:"):
        return None
    return line[5:].strip()


def _parse_chunk(payload: bytes, replica: str, emitted: bool) -> dict[str, Any]:
    try:
        chunk = orjson.loads(payload)
    except ValueError:
        raise LLMError(
            "protocol",
            f"LLM replica {replica} sent a chunk that is not JSON: "
            f"{payload[:200].decode(errors='replace')!r}",
            retryable=not emitted,
            replica=replica,
        ) from None
    if not isinstance(chunk, dict):
        raise LLMError(
            "protocol",
            f"LLM replica {replica} sent a chunk that is not an object",
            retryable=not emitted,
            replica=replica,
        )
    err = chunk.get("error")
    if err:
        # vLLM reports failures after the stream started as an error chunk.
        message = err.get("message") if isinstance(err, dict) else err
        code = err.get("code") if isinstance(err, dict) else None
        raise LLMError(
            "http",
            f"LLM replica {replica} failed mid-stream: {str(message)[:500]}",
            retryable=not emitted,
            status=code if isinstance(code, int) else None,
            replica=replica,
        )
    return chunk


def _malformed_tool_call(replica: str, error: ValueError, emitted: bool) -> LLMError:
    return LLMError(
        "protocol",
        f"LLM replica {replica} sent a malformed tool call: {error}",
        retryable=not emitted,
        replica=replica,
    )


def _usage(raw: Any) -> LLMUsage | None:
    if not isinstance(raw, dict):
        return None
    details = raw.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return LLMUsage(
        prompt_tokens=int(raw.get("prompt_tokens") or 0),
        completion_tokens=int(raw.get("completion_tokens") or 0),
        cached_tokens=int(cached) if cached is not None else None,
    )


def _describe(e: BaseException) -> str:
    return str(e) or type(e).__name__


def build_llm(settings: Settings) -> LLMClient:
    """The LLM client Settings ask for.

    No ``TIERMEM_LLM_URL``: the offline development LLM (the embedded engine, which
    ``TIERMEM_LLM`` may select then, is a child process the app starts:
    ``app.services`` does that, and gives it an ``OpenAICompatibleLLM``). Comma-separated base
    URLs: those replicas, sessions routed by rendezvous hashing with bounded
    load. ``k8s://<namespace>/<service>:<port>``: replicas discovered from the
    service's EndpointSlices.
    """
    if not settings.llm_url:
        from infra.dev_llm import OfflineDevLLM

        return OfflineDevLLM()
    router = RendezvousRouter(load_factor=settings.llm_load_factor)
    if settings.llm_url.strip().startswith("k8s://"):
        from infra.k8s_discovery import EndpointSliceDiscovery

        discovery = EndpointSliceDiscovery.from_url(settings.llm_url.strip(), router.set_replicas)
        return OpenAICompatibleLLM.from_settings(settings, router=router, discovery=discovery)
    return OpenAICompatibleLLM.from_settings(settings, router=router)
