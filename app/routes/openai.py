"""The OpenAI-compatible API: ``POST /v1/chat/completions``, ``GET /v1/models``.

Any OpenAI client (the ``openai`` SDK, LangChain's ``ChatOpenAI``, ...) talks to
tiermem with its usual calls, with the same Bearer API keys as the native API.
The ``model`` of a request names an agent profile (``GET /v1/models`` lists
them; ``"auto"`` picks one by the first message, as the native ``agent``).

Two modes, chosen per request:

**With a session** (``X-Session-ID`` header, or ``metadata.session_id``), tiermem
owns the history and the request is one turn of that session, run exactly as
``POST /v1/sessions/{id}/turns`` runs it (app/routes/turns.py ``launch_turn``):
the same graph, memory, tools, skills, idempotency and limits. The user is the
``user`` field or ``X-User-ID`` (required: a session belongs to a user); the
request's last message must be the user's, and it is the turn. ``X-Turn-ID`` (or
``metadata.turn_id``) is the turn's id: a retry with it is replayed, never run
twice. Decisions:

- *History.* A client may send only its new message, or the whole conversation
  every time (what most chat clients do). The earlier ``user``/``assistant``
  messages are compared with the turns the session holds (text compared with
  whitespace collapsed), aligned at the end, so a client that trims its window
  to the last few messages matches too. When they are what the session holds,
  only the last message becomes a turn: nothing is stored twice. When they are
  the session's history minus its last turn and the new message is that turn's
  message, the request is a retry of that turn (a client that never got the
  reply): it is replayed, or run again in place when it had failed, exactly as
  a retry with its ``turn_id`` (that also makes the SDK's own retries after a
  failed turn safe without ``X-Turn-ID``). A failed turn's user message may be
  in the client's history or not; an interrupted turn's partial reply may be
  missing or cut. Only the turns of the session's live context are compared
  (older ones, compacted into its summary or archived, are not). Anything
  else, an edited or foreign history, is **409 ``history_conflict``**, saying
  what differs: the log is append-only, and answering from the stored context
  a history the client did not send would be silently wrong. Branch into a new
  session instead.
- *System messages* of the client are **ignored**: the session's agent owns the
  stable prefix (its system prompt, tools and skills, cached on the LLM), and a
  per-request system message would break it every turn. The response says so:
  ``X-Tiermem-Ignored: messages.system`` (with any other parameters ignored).
  Generation settings (``temperature``, ``max_tokens``...) are the agent's, and
  listed there too. Client ``tools`` are refused (400): tiermem runs its own.
- *Tool calls* tiermem ran are not sent as ``tool_calls`` deltas: the client did
  not define those tools and has nothing to run. The client gets the final text
  (texts of several LLM steps joined by a newline, as the stored turn holds
  them); ``finish_reason`` is ``stop``, or ``length`` (the turn's own when its
  usage says it, else when a one-step reply used all its ``max_tokens``). What
  tiermem did is in the extension object ``tiermem`` of the response (the last
  chunk when streaming): ``session_id``, ``turn_id``,
  ``turn``, ``status``, ``replayed``, ``tool_calls`` ``[{"id", "name", "ok"}]``,
  ``memories`` (hits used), ``skills``. The native API streams every event.

**Without a session** it is a stateless proxy: the messages and the client's own
``tools``, ``tool_choice``, ``temperature``, ``max_tokens`` go to the LLM as they
are, the LLM's tool calls come back in OpenAI's format, and nothing is stored.

Both: ``stream`` (``chat.completion.chunk``s, the role first, then content,
``data: [DONE]`` at the end; ``usage`` in a last chunk with
``stream_options.include_usage``) or not (one ``chat.completion``, always with
``usage``). Errors are OpenAI's shape, ``{"error": {"message", "type", "param",
"code"}}`` (``code`` is tiermem's), on this route only (``OpenAIRoute``): 400 for
a bad body, 401, 404 ``model_not_found``, 409, 429, 5xx. Before the first token
an error is the HTTP status; after it, an error chunk ends the stream. Every
error says whether to retry (``x-should-retry``, which the OpenAI SDKs obey: they
retry 409 otherwise). Parameters tiermem does not apply (``top_p``, ``stop``,
``seed``, ...) are accepted, not applied, and named in ``X-Tiermem-Ignored``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, cast

import orjson
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse

from app.deps import RateLimiterDep, ServicesDep, TenantDep
from app.errors import ApiError
from app.logging_setup import tenant_var
from app.ratelimit import RateLimiter
from app.routes.turns import (
    admit,
    issue_turn_id,
    launch_turn,
    refuse_if_draining,
    spawn_in_flight,
    stop_if_running,
)
from app.services import Services
from app.sse import HEARTBEAT, HEARTBEAT_DUE, SSE_HEADERS, queued_events
from graph.events import Done, Error, Memory, Meta, SkillUsed, Token, ToolResult, TurnEvent
from graph.guard import InputRejected, check_message
from graph.state import TurnControl, TurnInput
from infra.errors import TiermemError
from infra.llm import ChatMessage, LLMDone, LLMError, LLMToken, ToolChoice
from memory import response_cache
from memory.cache import Scope
from memory.keys import InvalidId, validate_id
from memory.l2_store import L2Error
from memory.models import SessionState, Turn
from memory.sessions import StorageUnavailable, retryable_in_place

log = logging.getLogger("tiermem.openai")

# ``created`` of the models when the agents come from no file.
_STARTED = int(time.time())


# --- errors in OpenAI's shape ---------------------------------------------------------


class OpenAIError(ApiError):
    """An error this route decides, naming the request field it is about."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status, code, message, headers)
        self.param = param


def _error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def error_json(code: str, message: str, status: int, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _error_type(status), "param": param,
                      "code": code}}  # fmt: skip


def _error_response(
    status: int,
    code: str,
    message: str,
    *,
    param: str | None = None,
    retryable: bool = False,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    # The OpenAI SDKs retry 408, 409, 429 and 5xx unless told otherwise.
    hdrs = {**(headers or {}), "x-should-retry": "true" if retryable else "false"}
    return JSONResponse(error_json(code, message, status, param), status_code=status, headers=hdrs)


def _status_of(exc: TiermemError) -> int:
    # OpenAI answers every bad body with 400: tiermem's 422s and a message over
    # the character limit (413) are 400 here. A body over the byte limit stays 413.
    if exc.http_status == 422 or exc.code == "message_too_long":
        return 400
    if isinstance(exc, LLMError) and exc.kind == "http" and exc.status and 400 <= exc.status < 500:
        # The LLM refused the request itself (stateless mode): the client's to fix.
        return 429 if exc.status == 429 else 400
    return exc.http_status


def _tiermem_error_response(exc: TiermemError, headers: dict[str, str] | None = None) -> Response:
    status = _status_of(exc)
    if status >= 500:
        log.warning("request failed: %s (%s)", exc.code, exc.message)
    return _error_response(
        status, exc.code, exc.message, param=getattr(exc, "param", None),
        retryable=exc.retryable, headers={**dict(exc.headers), **(headers or {})},
    )  # fmt: skip


def _param(loc: Sequence[Any]) -> str | None:
    """A pydantic location as OpenAI names a field: ``messages[2].content``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in ("body",):
            out += f".{part}" if out else str(part)
    return out or None


def _validation_response(exc: RequestValidationError) -> Response:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return _error_response(400, "invalid_json", "the body is not valid JSON")
    loc = tuple(first.get("loc", ()))
    param = _param(loc)
    message = str(first.get("msg", "the request is not valid"))
    if loc == ("body",):
        message = f"the body must be a JSON object: {message}"
    return _error_response(
        400, "invalid_request", f"{param}: {message}" if param else message, param=param
    )


class OpenAIRoute(APIRoute):
    """The routes of this module answer every error in OpenAI's shape: tiermem's
    own errors, FastAPI's validation errors and Starlette's HTTP errors raised
    while the request is handled (auth, the body, limits), before the response
    starts. Other routes keep tiermem's shape (app/errors.py)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except TiermemError as exc:
                return _tiermem_error_response(exc)
            except RequestValidationError as exc:
                return _validation_response(exc)
            except StarletteHTTPException as exc:
                # A body over TIERMEM_MAX_BODY_BYTES while it streams in (413), ...
                code = {413: "body_too_large", 408: "request_timeout"}.get(
                    exc.status_code, "http_error"
                )
                if exc.status_code == 400 and "parsing the body" in str(exc.detail):
                    code = "invalid_json"
                extra = dict(getattr(exc, "headers", None) or {})
                return _error_response(exc.status_code, code, str(exc.detail), headers=extra)
            except Exception:
                log.exception("unhandled error")
                return _error_response(500, "internal_error", "internal error", retryable=True)

        return route


router = APIRouter(route_class=OpenAIRoute)


# --- the request ----------------------------------------------------------------------


class _ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[_ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool | None = False


class ChatCompletionRequest(BaseModel):
    """What this route reads of OpenAI's request; other fields are accepted and
    named in ``X-Tiermem-Ignored``."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=128)
    messages: list[_Message] = Field(min_length=1)
    stream: bool | None = False
    stream_options: _StreamOptions | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    n: int | None = Field(default=None, ge=1, le=1, description="only 1")


# Read in both modes; read only without a session (passed to the LLM).
_READ = frozenset({"model", "messages", "stream", "stream_options", "user", "metadata", "n"})
_PROXIED = frozenset({"tools", "tool_choice", "temperature", "max_tokens", "max_completion_tokens"})


def _sent(body: ChatCompletionRequest) -> dict[str, Any]:
    """The request's fields as the client sent them (unset ones left out)."""
    return body.model_dump(exclude_unset=True)


def _text(message: _Message, index: int, *, session: bool) -> str:
    """A message's text; a session takes text parts only."""
    content = message.content
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part in content:
        if part.type != "text" or part.text is None:
            if session:
                raise OpenAIError(
                    400, "unsupported_content",
                    f"a session takes text only; messages[{index}] has a {part.type!r} part",
                    f"messages[{index}].content",
                )  # fmt: skip
            continue
        texts.append(part.text)
    return "\n".join(texts)


def _norm(text: str) -> str:
    """Text as history recognition compares it: whitespace collapsed."""
    return " ".join(text.split())


def _identity(
    request: Request, body: ChatCompletionRequest
) -> tuple[str | None, str | None, str | None]:
    """(session id, user id, turn id): each from its header or the body, never
    two different ones."""
    meta = body.metadata or {}
    h = request.headers

    def one(header: str, value: str | None, field_name: str, what: str) -> str | None:
        from_header = h.get(header)
        if from_header is not None and value is not None and from_header != value:
            raise OpenAIError(
                400, "conflicting_ids", f"{header} and {field_name} name different {what}s",
                field_name,
            )  # fmt: skip
        chosen = from_header if from_header is not None else value
        if chosen is None:
            return None
        try:
            return validate_id(chosen, f"{header} ({field_name})")
        except InvalidId as exc:
            raise OpenAIError(400, exc.code, exc.message, field_name) from None

    session_id = one("x-session-id", meta.get("session_id"), "metadata.session_id", "session")
    user_id = one("x-user-id", body.user, "user", "user")
    turn_id = one("x-turn-id", meta.get("turn_id"), "metadata.turn_id", "turn")
    return session_id, user_id, turn_id


def _check_model(services: Services, model: str) -> None:
    if model != "auto" and model not in services.agents.profiles:
        raise OpenAIError(
            404, "model_not_found",
            f"the model {model!r} does not exist: models are tiermem's agents "
            "(GET /v1/models), or 'auto'",
            "model",
        )  # fmt: skip


def _ignored(data: dict[str, Any], session: bool) -> list[str]:
    read = _READ if session else _READ | _PROXIED
    return sorted(k for k, v in data.items() if k not in read and v is not None)


# --- models ---------------------------------------------------------------------------


def _model(services: Services, name: str) -> dict[str, Any]:
    agents = services.agents
    created = int(agents.mtime) if agents.mtime else _STARTED
    return {"id": name, "object": "model", "created": created, "owned_by": "tiermem"}


@router.get("/v1/models")
async def list_models(tenant: TenantDep, services: ServicesDep) -> Any:
    """The agent profiles, as OpenAI models (``model`` of a request names one)."""
    return {"object": "list", "data": [_model(services, n) for n in services.agents.profiles]}


@router.get("/v1/models/{model}")
async def get_model(model: str, tenant: TenantDep, services: ServicesDep) -> Any:
    _check_model(services, model)
    if model == "auto":
        raise OpenAIError(404, "model_not_found", "'auto' is a choice, not a model", "model")
    return _model(services, model)


# --- the route ------------------------------------------------------------------------


@router.post(
    "/v1/chat/completions",
    responses={200: {"content": {"text/event-stream": {}, "application/json": {}}}},
)
async def chat_completions(
    request: Request,
    body: ChatCompletionRequest,
    tenant: TenantDep,
    services: ServicesDep,
    limiter: RateLimiterDep,
) -> Response:
    """OpenAI's chat completion: a turn of a session (``X-Session-ID``), or a
    stateless completion (see the module's doc)."""
    started = time.perf_counter()
    refuse_if_draining(services)
    data = _sent(body)
    _check_model(services, body.model)
    session_id, user_id, turn_id = _identity(request, body)
    if session_id is None:
        no_cache = "no-cache" in request.headers.get("cache-control", "").lower()
        return await _stateless(
            services, limiter, tenant, body, data, turn_id is not None, no_cache
        )
    if user_id is None:
        raise OpenAIError(
            400, "user_required",
            "a session belongs to a user: send `user` (or X-User-ID) with X-Session-ID",
            "user",
        )  # fmt: skip
    return await _session_turn(
        services, limiter, tenant, body, data, session_id, user_id, turn_id, started
    )


# --- with a session: one turn ---------------------------------------------------------


async def _session_turn(
    services: Services,
    limiter: RateLimiter | None,
    tenant: str,
    body: ChatCompletionRequest,
    data: dict[str, Any],
    session_id: str,
    user_id: str,
    turn_id: str | None,
    started: float,
) -> Response:
    messages = body.messages
    last_index = len(messages) - 1
    if messages[-1].role != "user":
        raise OpenAIError(
            400, "last_message_not_user",
            "with a session the last message must be the user's new message: tiermem "
            "holds the history and runs the tools",
            f"messages[{last_index}].role",
        )  # fmt: skip
    if body.tools:
        raise OpenAIError(
            400, "tools_not_supported",
            "a session runs tiermem's own tools (its agent's); send client tools without "
            "a session (stateless) instead",
            "tools",
        )  # fmt: skip
    message = _text(messages[-1], last_index, session=True)
    try:
        check_message(message, services.settings.max_message_chars)
    except InputRejected as exc:
        raise OpenAIError(400, exc.code, exc.message, f"messages[{last_index}].content") from None
    ignored = _ignored(data, session=True)
    earlier: list[tuple[int, str, str]] = []
    for i, m in enumerate(messages[:-1]):
        if m.role in ("system", "developer"):
            if "messages.system" not in ignored:
                ignored.append("messages.system")
            continue
        if m.role == "tool" or m.tool_calls:
            raise OpenAIError(
                400, "tool_messages_not_supported",
                "a session's history has no client tool calls (tiermem runs its tools "
                "itself); send the conversation's user and assistant messages only",
                f"messages[{i}]",
            )  # fmt: skip
        earlier.append((i, m.role, _norm(_text(m, i, session=True))))
    # A session belongs to the user of its first turn: 409 session_user_mismatch
    # before anything else (free on an L1 hit; on a miss it loads the session
    # into L1, which the history check then reads).
    await services.sessions.check_owner(tenant, session_id, user_id)
    retry = await _recognise(services, tenant, session_id, earlier, message)
    if retry is not None:
        chosen, client_chosen = retry.turn_id, True
    else:
        chosen = turn_id or issue_turn_id(tenant, session_id)
        client_chosen = turn_id is not None
    inp = TurnInput(
        tenant=tenant, session_id=session_id, user_id=user_id, message=message,
        turn_id=chosen, client_turn_id=client_chosen, agent=body.model,
    )  # fmt: skip
    queue, control, task = await launch_turn(services, limiter, inp, started)
    headers = {"X-Session-ID": session_id, "X-Turn-ID": chosen}
    if ignored:
        headers["X-Tiermem-Ignored"] = ", ".join(ignored)
    state = services.l1.peek(tenant, session_id)
    reply = _TurnReply(
        completion_id=f"chatcmpl-{chosen}", created=int(time.time()),
        model=(state.agent if state and state.agent else body.model), session_id=session_id,
        turn_id=chosen, max_tokens=_max_tokens(services, state, body.model),
    )  # fmt: skip
    events = queued_events(queue, services.settings.heartbeat_s)
    if not body.stream:
        try:
            async for item in events:
                reply.take(cast("TurnEvent", item))
        finally:
            if not task.done():
                control.stop("client_disconnected")
        return reply.response(headers)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    first = await _preface(events, reply.take)
    if reply.ended and not reply.text_sent and reply.failure() is not None:
        # Nothing streamed yet: the failure is the HTTP status (and the SDK's retry
        # is safe: the failed turn runs again in place).
        return reply.response(headers)
    return StreamingResponse(
        _session_stream(first, events, reply, control, task, include_usage),
        media_type="text/event-stream", headers={**SSE_HEADERS, **headers},
    )  # fmt: skip


def _max_tokens(services: Services, state: SessionState | None, model: str) -> int:
    agent = services.agents.get(state.agent if state and state.agent else model)
    return agent.max_tokens or services.settings.llm_max_tokens


@dataclass(frozen=True)
class _Entry:
    """One message of a stored turn, as history recognition compares it."""

    role: str
    text: str
    turn: int
    optional: bool = False  # a client may not have it
    partial: bool = False  # a client may have it cut short


def _entries(turns: Sequence[Turn]) -> list[_Entry]:
    out: list[_Entry] = []
    for t in turns:
        failed = t.status == "failed"
        out.append(_Entry("user", _norm(t.user), t.index, optional=failed))
        reply = _norm(t.assistant)
        if not failed:
            interrupted = t.status == "interrupted"
            out.append(_Entry("assistant", reply, t.index, optional=interrupted or not reply,
                              partial=interrupted))  # fmt: skip
    return out


@dataclass(frozen=True)
class _Match:
    ok: bool
    why: str = ""


def _match(
    earlier: Sequence[tuple[int, str, str]], turns: Sequence[Turn], next_index: int
) -> _Match:
    """Whether the client's earlier messages end with what ``turns`` hold
    (``next_index``: the index the turn after them has). End-aligned: a client
    may have trimmed older messages; older messages than the turns held are only
    accepted when the session has older turns this copy does not hold."""
    stored = _entries(turns)
    i, j = len(earlier) - 1, len(stored) - 1
    while i >= 0:
        position, role, text = earlier[i]
        if j < 0:
            first = turns[0].index if turns else next_index
            if first > 1:
                return _Match(True)  # older turns than those held: not compared
            held = next_index - 1
            return _Match(
                False, f"messages[{position}] ({role}) comes before the session's first "
                f"turn (it holds {held} turn{'s' * (held != 1)})",
            )  # fmt: skip
        s = stored[j]
        same = s.role == role and (
            s.text == text or (s.partial and (s.text.startswith(text) or text.startswith(s.text)))
        )
        if same:
            i, j = i - 1, j - 1
        elif s.optional:
            j -= 1
        else:
            return _Match(
                False, f"messages[{position}] ({role}) is not the {s.role} message of turn "
                f"{s.turn} as stored",
            )  # fmt: skip
    return _Match(True)


@dataclass(frozen=True)
class _Verdict:
    retry: Turn | None = None
    conflict: str | None = None


def _compare(
    state: SessionState | None, earlier: Sequence[tuple[int, str, str]], message: str
) -> _Verdict:
    turns = list(state.turns) if state is not None else []
    count = state.turn_count if state is not None else 0
    last = turns[-1] if turns and turns[-1].index == count else None
    as_new = _match(earlier, turns, count + 1)
    as_retry = (
        last is not None
        and _norm(last.user) == _norm(message)
        and _match(earlier, turns[:-1], count).ok
    )
    if as_retry and last is not None and retryable_in_place(last):
        return _Verdict(retry=last)  # a failed (or drained) turn asked again
    if as_new.ok:
        return _Verdict()
    if as_retry:
        return _Verdict(retry=last)  # the client never got this turn's reply
    return _Verdict(conflict=as_new.why)


async def _recognise(
    services: Services,
    tenant: str,
    session_id: str,
    earlier: Sequence[tuple[int, str, str]],
    message: str,
) -> Turn | None:
    """The stored turn this request repeats (replayed, or run again in place), or
    None for a new turn; 409 ``history_conflict`` for a history the session does
    not hold. Reads this pod's L1 copy (loaded by ``check_owner``), and L2 only
    when that copy disagrees (it may be behind another pod's commit)."""
    verdict = _compare(services.l1.peek(tenant, session_id), earlier, message)
    if verdict.conflict is None:
        return verdict.retry
    try:
        fresh = await services.l2.load(tenant, session_id)
    except L2Error as exc:
        raise StorageUnavailable(str(exc)) from exc
    verdict = _compare(fresh, earlier, message)
    if verdict.conflict is not None:
        count = fresh.turn_count if fresh is not None else 0
        raise OpenAIError(
            409, "history_conflict",
            f"the request's history is not what session {session_id!r} holds ({count} "
            f"turn{'s' * (count != 1)}): {verdict.conflict}. tiermem keeps a session's "
            "history as it happened; send only the new message, or the history as GET "
            f"/v1/sessions/{session_id} shows it, or start a new session for an edited one",
            "messages",
        )  # fmt: skip
    return verdict.retry


_CODE_STATUS = {
    "draining": 503, "storage_unavailable": 503, "durability_timeout": 503,
    "rate_limit_unavailable": 503, "internal_error": 500, "session_user_mismatch": 409,
    "session_forgotten": 409,
}  # fmt: skip


def _status_of_code(code: str, retryable: bool) -> int:
    """The HTTP status of a turn's ``error`` event (the stream had not started)."""
    if code.startswith("llm_"):
        return 502
    if code.endswith("_misconfigured"):
        return 500
    return _CODE_STATUS.get(code, 503 if retryable else 400)


@dataclass
class _TurnReply:
    """A turn's events, as OpenAI's chunks or its whole completion."""

    completion_id: str
    created: int
    model: str
    session_id: str
    turn_id: str
    max_tokens: int
    parts: list[str] = field(default_factory=list)
    after_tools: bool = False
    meta: Meta | None = None
    done: Done | None = None
    error: Error | None = None
    memories: int = 0
    skills: list[str] = field(default_factory=list)

    @property
    def ended(self) -> bool:
        return self.done is not None or self.error is not None

    @property
    def text_sent(self) -> bool:
        return bool(self.parts)

    def take(self, event: TurnEvent) -> str | None:
        """Takes one event; returns the content it adds, if any."""
        if type(event) is Token:
            text = event.text
            if not text:
                return None
            if self.after_tools and self.parts:
                text = "\n" + text  # the next step's text, as the stored turn joins them
            self.after_tools = False
            self.parts.append(text)
            return text
        if isinstance(event, Meta):
            self.meta = event
            if event.agent:
                self.model = event.agent
        elif isinstance(event, ToolResult):
            self.after_tools = True
        elif isinstance(event, Memory):
            self.memories += len(event.memories)
        elif isinstance(event, SkillUsed):
            self.skills.append(event.skill)
        elif isinstance(event, Done):
            self.done = event
        elif isinstance(event, Error):
            self.error = event
        return None

    def failure(self) -> tuple[int, str, str, bool] | None:
        """(status, code, message, retryable) when the turn did not complete."""
        if self.error is not None:
            e = self.error
            return _status_of_code(e.code, e.retryable), e.code, e.message, e.retryable
        if self.done is not None and self.done.error:
            # The LLM failed after some text: stored as interrupted.
            e2 = self.done.error
            code = str(e2.get("code") or "llm_protocol")
            return (_status_of_code(code, True), code, str(e2.get("message")),
                    bool(e2.get("retryable", True)))  # fmt: skip
        if not self.ended:
            return 500, "internal_error", "the turn ended without a result", True
        return None

    def finish_reason(self) -> str:
        usage = self.done.usage if self.done is not None else {}
        if usage.get("finish_reason") in ("stop", "length"):
            return str(usage["finish_reason"])  # the last LLM step's, where the turn says it
        one_step = int(usage.get("llm_requests") or 1) == 1
        if one_step and int(usage.get("completion_tokens") or 0) >= self.max_tokens:
            return "length"
        return "stop"

    def usage(self) -> dict[str, Any]:
        return _usage(self.done.usage if self.done is not None else {})

    def extension(self) -> dict[str, Any]:
        d = self.done
        usage = d.usage if d is not None else {}
        turn = d.turn if d is not None else (self.meta.turn if self.meta else None)
        return {
            "session_id": self.session_id, "turn_id": self.turn_id, "turn": turn,
            "status": d.status if d is not None else None,
            "replayed": bool(d is not None and d.replayed),
            "tool_calls": usage.get("tool_calls") or [], "memories": self.memories,
            "skills": self.skills,
        }  # fmt: skip

    def chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return _chunk(self.completion_id, self.created, self.model, delta, finish)

    def response(self, headers: dict[str, str]) -> Response:
        failed = self.failure()
        if failed is not None:
            status, code, message, retryable = failed
            extra = {"Retry-After": "2"} if code == "draining" else {}
            return _error_response(status, code, message, retryable=retryable,
                                   headers={**headers, **extra})  # fmt: skip
        body = {
            "id": self.completion_id, "object": "chat.completion", "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "message": {"role": "assistant",
                                                 "content": "".join(self.parts),
                                                 "refusal": None},
                         "logprobs": None, "finish_reason": self.finish_reason()}],
            "usage": self.usage(), "tiermem": self.extension(),
        }  # fmt: skip
        return Response(orjson.dumps(body), media_type="application/json", headers=headers)


async def _session_stream(
    first: list[Any],
    events: AsyncIterator[Any],
    reply: _TurnReply,
    control: TurnControl,
    task: asyncio.Task[None],
    include_usage: bool,
) -> AsyncIterator[bytes]:
    try:
        async for frame in _content(first, events, reply):
            yield frame
        failed = reply.failure()
        if failed is not None:
            status, code, message, _ = failed
            yield _sse(error_json(code, message, status))
        else:
            final = reply.chunk({}, reply.finish_reason())
            final["tiermem"] = reply.extension()
            yield _sse(final)
            if include_usage:
                yield _sse({**reply.chunk({}), "choices": [], "usage": reply.usage()})
        yield DONE
    finally:
        stop_if_running(task, control)


# --- without a session: a stateless proxy ---------------------------------------------


async def _stateless(
    services: Services,
    limiter: RateLimiter | None,
    tenant: str,
    body: ChatCompletionRequest,
    data: dict[str, Any],
    turn_id_sent: bool,
    no_cache: bool,
) -> Response:
    """The client's messages and tools to the LLM as they are; nothing stored
    but, for a deterministic request, the reply in the response cache
    (memory/response_cache.py; ``X-Tiermem-Cache`` says hit, miss or bypass). A
    turn id means nothing here: it is named as ignored."""
    limit = services.settings.max_message_chars
    for i, m in enumerate(body.messages):
        text = _text(m, i, session=False)
        if len(text) > limit:
            raise OpenAIError(
                400, "message_too_long",
                f"messages[{i}] has {len(text)} characters; the limit is {limit}",
                f"messages[{i}].content",
            )  # fmt: skip
    messages = cast("list[ChatMessage]", data["messages"])  # as the client sent them
    ignored = _ignored(data, session=False) + (["X-Turn-ID"] if turn_id_sent else [])
    # Requests of one conversation share their first messages: the same key
    # keeps them on one LLM replica, where their prefix is cached.
    head = orjson.dumps(data["messages"][:2], option=orjson.OPT_SORT_KEYS)
    key = f"{tenant}:openai:{hashlib.sha256(head).hexdigest()[:24]}"
    # A stateless request is LLM work like a turn: the tenant's limits count it.
    lease = await admit(limiter, tenant)
    tenant_var.set(tenant)
    queue: asyncio.Queue[Any] = asyncio.Queue()
    control = TurnControl(emit=lambda _event: None)
    options: dict[str, Any] = {
        "max_tokens": body.max_completion_tokens or body.max_tokens,
        "tools": body.tools or None,
        "tool_choice": cast("ToolChoice | None", body.tool_choice),
        "temperature": body.temperature,
    }
    reason = services.cache.bypassed(
        "response",
        response_cache.bypass_reason(data, services.settings.cache_max_temperature,
                                     no_cache=no_cache),
    )  # fmt: skip
    plan = None
    if reason is None:
        parts = response_cache.key_parts(data, body.model, services.llm.model_label)
        plan = _CachePlan(Scope(tenant), parts)
    task = spawn_in_flight(
        services, control, lease,
        lambda: _proxy(services, messages, key, options, control, queue, plan),
    )  # fmt: skip
    headers = {"X-Tiermem-Ignored": ", ".join(ignored)} if ignored else {}
    reply = _ProxyReply(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), body.model)
    events = queued_events(queue, services.settings.heartbeat_s)
    if not body.stream:
        try:
            async for item in events:
                reply.take(item)
        finally:
            if not task.done():
                control.stop("client_disconnected")
        return reply.response({**headers, "X-Tiermem-Cache": _outcome(plan)})
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    first = await _preface(events, reply.take)
    # Known by now: the first text came from the cache or from the model.
    headers["X-Tiermem-Cache"] = _outcome(plan)
    if reply.failed is not None and not reply.parts:
        return reply.response(headers)
    return StreamingResponse(
        _proxy_stream(first, events, reply, control, task, include_usage),
        media_type="text/event-stream", headers={**SSE_HEADERS, **headers},
    )  # fmt: skip


@dataclass
class _CachePlan:
    """A request the response cache may answer: its key, and what it did."""

    scope: Scope
    parts: dict[str, Any]
    # A miss until the cache answers (so also when it fails before anything).
    outcome: Literal["hit", "miss"] = "miss"


def _outcome(plan: _CachePlan | None) -> str:
    return "bypass" if plan is None else plan.outcome


async def _proxy(
    services: Services,
    messages: list[ChatMessage],
    key: str,
    options: dict[str, Any],
    control: TurnControl,
    queue: asyncio.Queue[Any],
    plan: _CachePlan | None = None,
) -> None:
    """The LLM's events onto ``queue`` (an exception when it fails), then None;
    stopped by ``control`` (client gone, drain deadline), which closes the
    upstream request. With a ``plan``, through the response cache: a hit is the
    stored reply replayed; a miss streams live while it is recorded, and a
    reply that ended normally is stored (one LLM call for concurrent equal
    requests: the others wait for it, then replay it)."""

    async def live() -> response_cache.RecordedReply:
        recorded = response_cache.RecordedReply()
        stream = services.llm.stream_chat(messages, session_key=key, **options)
        async with contextlib.aclosing(stream):
            async for event in stream:
                recorded.add(event)
                queue.put_nowait(event)
        return recorded

    async def consume() -> None:
        if plan is None:
            await live()
            return
        got = await services.cache.fetch(
            "response", plan.scope, plan.parts, live,
            encode=response_cache.RecordedReply.encode,
            decode=response_cache.RecordedReply.decode,
            cacheable=response_cache.RecordedReply.cacheable,
        )  # fmt: skip
        if got.outcome == "hit":
            plan.outcome = "hit"
            assert got.value is not None
            for event in got.value.events():
                queue.put_nowait(event)

    work = asyncio.ensure_future(consume())
    stop = asyncio.ensure_future(control.cancel.wait())
    try:
        await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
            if control.reason == "drain":
                queue.put_nowait(ApiError(503, "draining", "the server is shutting down; retry"))
        else:
            work.result()
    except TiermemError as exc:
        queue.put_nowait(exc)
    except ValueError as exc:  # a tool_choice the tools cannot honour
        queue.put_nowait(OpenAIError(400, "invalid_tool_choice", str(exc), "tool_choice"))
    except Exception as exc:
        log.exception("stateless completion failed")
        services.metrics.errors.labels("internal").inc()
        queue.put_nowait(exc)
    finally:
        stop.cancel()
        queue.put_nowait(None)


@dataclass
class _ProxyReply:
    completion_id: str
    created: int
    model: str
    parts: list[str] = field(default_factory=list)
    done: LLMDone | None = None
    failed: BaseException | None = None

    @property
    def ended(self) -> bool:
        return self.done is not None or self.failed is not None

    def take(self, item: Any) -> str | None:
        if type(item) is LLMToken:
            if item.text:
                self.parts.append(item.text)
                return item.text
        elif isinstance(item, LLMDone):
            self.done = item
        elif isinstance(item, BaseException):
            self.failed = item
        return None

    def tool_calls(self) -> list[dict[str, Any]]:
        calls = self.done.tool_calls if self.done is not None else ()
        return [dict(c.to_message_dict()) for c in calls]

    def finish_reason(self) -> str:
        if self.done is not None and self.done.finish_reason:
            return self.done.finish_reason
        return "tool_calls" if self.tool_calls() else "stop"

    def usage(self) -> dict[str, Any]:
        u = self.done.usage if self.done is not None else None
        if u is None:
            return _usage({})
        return _usage({"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                       "cached_tokens": u.cached_tokens})  # fmt: skip

    def chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return _chunk(self.completion_id, self.created, self.model, delta, finish)

    def error(self) -> tuple[int, str, str, bool, dict[str, str]]:
        exc = self.failed if self.failed is not None else None
        if isinstance(exc, TiermemError):
            return _status_of(exc), exc.code, exc.message, exc.retryable, dict(exc.headers)
        return 500, "internal_error", "internal error", True, {}

    def response(self, headers: dict[str, str]) -> Response:
        if self.failed is not None or self.done is None:
            status, code, text, retryable, extra = self.error()
            param = getattr(self.failed, "param", None)
            return _error_response(status, code, text, param=param, retryable=retryable,
                                   headers={**headers, **extra})  # fmt: skip
        calls = self.tool_calls()
        text = "".join(self.parts)
        message: dict[str, Any] = {"role": "assistant", "content": text if text or not calls
                                   else None, "refusal": None}  # fmt: skip
        if calls:
            message["tool_calls"] = calls
        body = {
            "id": self.completion_id, "object": "chat.completion", "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": self.finish_reason()}],
            "usage": self.usage(),
        }  # fmt: skip
        return Response(orjson.dumps(body), media_type="application/json", headers=headers)


async def _proxy_stream(
    first: list[Any],
    events: AsyncIterator[Any],
    reply: _ProxyReply,
    control: TurnControl,
    task: asyncio.Task[None],
    include_usage: bool,
) -> AsyncIterator[bytes]:
    try:
        async for frame in _content(first, events, reply):
            yield frame
        if reply.failed is not None or reply.done is None:
            status, code, message, _, _ = reply.error()
            yield _sse(error_json(code, message, status))
        else:
            calls = reply.tool_calls()
            if calls:
                deltas = [{"index": i, **c} for i, c in enumerate(calls)]
                yield _sse(reply.chunk({"tool_calls": deltas}))
            yield _sse(reply.chunk({}, reply.finish_reason()))
            if include_usage:
                yield _sse({**reply.chunk({}), "choices": [], "usage": reply.usage()})
        yield DONE
    finally:
        # A reply that ended is left to finish: what remains is its cache write.
        if reply.done is None or reply.failed is not None:
            stop_if_running(task, control)


# --- shared: framing and the event queue ----------------------------------------------


class _Relayed(Protocol):
    """What a stream relays the content of: a session turn's reply, or the proxy's."""

    @property
    def ended(self) -> bool: ...

    def take(self, item: Any) -> str | None: ...

    def chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]: ...


async def _content(
    first: list[Any], events: AsyncIterator[Any], reply: _Relayed
) -> AsyncIterator[bytes]:
    """The role chunk, then a content chunk for each text the reply takes (what
    the preface held back first), heartbeats in the silences, until it ends."""
    yield _sse(reply.chunk({"role": "assistant", "content": ""}))
    for item in first:
        if (text := reply.take(item)) is not None:
            yield _sse(reply.chunk({"content": text}))
    if not reply.ended:
        async for item in events:
            if item is HEARTBEAT_DUE:
                yield HEARTBEAT
            elif (text := reply.take(item)) is not None:
                yield _sse(reply.chunk({"content": text}))


DONE = b"data: [DONE]\n\n"


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def _chunk(
    completion_id: str, created: int, model: str, delta: dict[str, Any], finish: str | None
) -> dict[str, Any]:
    return {"id": completion_id, "object": "chat.completion.chunk", "created": created,
            "model": model, "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None,
                         "finish_reason": finish}]}  # fmt: skip


def _usage(u: dict[str, Any]) -> dict[str, Any]:
    prompt = int(u.get("prompt_tokens") or 0)
    completion = int(u.get("completion_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": u.get("cached_tokens")}}  # fmt: skip


async def _preface(events: AsyncIterator[Any], take: Callable[[Any], Any]) -> list[Any]:
    """Takes the events up to the first text, the end, or a heartbeat's time of
    silence, and returns the text not sent yet: the response waits for them, so
    a failure before any text is its HTTP status, and a stream starts with the
    first token (or while the turn's tools and memory still run)."""
    async for item in events:
        if item is HEARTBEAT_DUE:
            return []
        if type(item) is Token or type(item) is LLMToken:
            return [item]
        take(item)
        if isinstance(item, Done | Error | LLMDone | BaseException):
            return []
    return []
