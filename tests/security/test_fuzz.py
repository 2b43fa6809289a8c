"""Bad input and abuse: Hypothesis-generated bad requests and a schemathesis run
against the app's own OpenAPI schema.

The app runs for real (``ThreadedApp``: uvicorn in a thread of its own, lifespan
on, auth on, rate limits on but generous) on a redis-server of this module's own
and Milvus Lite, with a fake OpenAI-compatible LLM. For every generated bad
request: a 4xx with a JSON error body, answered in under 100 ms (measured per
request), no Redis key written, no LLM call. For every request at all: no 5xx,
and no key outside the caller's tenant namespace.

The number of generated requests is printed at the end of the module (``-s``)
and appended to ``$TIERMEM_FAULT_REPORT`` as a JSON line.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from tests.harness import make_settings, parse_sse
from tests.security import ThreadedApp, scan_keys, write_keys
from tests.servers.fake_vllm import FakeVLLM
from tests.servers.redis_server import RedisServer

MAX_CHARS = 500
MAX_BODY = 8192
LIMIT_S = 0.100

KEY = "fuzz-key-" + uuid.uuid4().hex
OTHER_KEY = "fuzz-other-" + uuid.uuid4().hex
TENANT = "fz" + uuid.uuid4().hex[:8]
OTHER_TENANT = "fo" + uuid.uuid4().hex[:8]
AUTH = {"Authorization": f"Bearer {KEY}"}
OTHER_AUTH = {"Authorization": f"Bearer {OTHER_KEY}"}

FUZZ = settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)

TRIED: Counter[str] = Counter()


class Env:
    def __init__(self, app: ThreadedApp, llm: FakeVLLM, redis_url: str) -> None:
        self.app = app
        self.llm = llm
        self.redis_url = redis_url
        # Redirects followed: an empty trailing id ("/v1/sessions/") is redirected
        # (307) to "/v1/sessions", which is then a 404; the time counts both.
        self.http = httpx.Client(base_url=app.url, timeout=10, follow_redirects=True)
        self.slowest = 0.0  # of the fastest attempt of each request
        self.hiccups = 0


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("fuzz")
    redis = RedisServer(root / "redis").start()
    llm = FakeVLLM(reply_tokens=6).start()
    keys = root / "keys.json"
    write_keys(keys, [(KEY, TENANT), (OTHER_KEY, OTHER_TENANT)])
    s = make_settings(
        root, redis.url, llm_url=llm.base_url, auth="on", api_keys_file=keys,
        max_message_chars=MAX_CHARS, max_body_bytes=MAX_BODY, archive_threshold=1000,
        rate_turns_per_minute=100_000, rate_max_streams=100,
    )  # fmt: skip
    app = ThreadedApp(s).start()
    e = Env(app, llm, redis.url)
    try:
        yield e
    finally:
        e.http.close()
        app.stop()
        llm.stop()
        redis.stop()
        total = sum(TRIED.values())
        # Schemathesis' positive cases are valid requests; everything else is bad input.
        bad = total - TRIED["schemathesis_positive"]
        line = json.dumps({"suite": "fuzz", "generated_requests": total, "bad_requests": bad,
                           "by_kind": TRIED, "slow_resends": e.hiccups,
                           "slowest_bad_request_ms": round(e.slowest * 1000, 1)})  # fmt: skip
        print("\n" + line)
        path = os.environ.get("TIERMEM_FAULT_REPORT")
        if path:
            with open(path, "a") as f:
                f.write(line + "\n")


def _invalid_utf8(body: bytes) -> bool:
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def _in_namespace(key: bytes, tenant: str) -> bool:
    """A session key, a rate-limit key, a session-index key or a cache entry of
    ``tenant``, or an embedding cache entry (shared: a vector by text hash, no
    tenant's data, memory/embedding_cache.py)."""
    return key.startswith(
        (f"tm:{{{tenant}:".encode(), f"tm:rl:{{{tenant}}}:".encode(),
         f"tm:idx:{{{tenant}}}:".encode(), f"tm:c:{{{tenant}}}:".encode(),
         b"tm:c:shared:embedding:")
    )  # fmt: skip


def assert_refused(
    env: Env, kind: str, method: str, url: str, *, content: Any = None,
    headers: dict[str, Any] | None = None, params: dict[str, Any] | None = None,
) -> httpx.Response:  # fmt: skip
    """Sends one bad request; asserts a fast JSON 4xx that wrote and called nothing.

    Fast means under 100 ms, measured per request at the client. On a busy
    2-core machine a request can now and then lose the CPU for longer than
    that, so a slow answer is sent again (twice at most): a slow *path* is slow
    every time and fails; a scheduling hiccup does not. Hiccups are counted,
    and the module fails if they exceed 1% of the bad requests.
    """
    chunks = list(content) if content is not None and not isinstance(content, bytes) else None
    before = scan_keys(env.redis_url)
    calls = len(env.llm.chat_requests())
    times = []
    for _attempt in range(3):
        body_arg = iter(chunks) if chunks is not None else content
        t0 = time.perf_counter()
        r = env.http.request(method, url, content=body_arg, headers=headers, params=params)
        times.append(time.perf_counter() - t0)
        TRIED[kind] += 1
        assert 400 <= r.status_code < 500, (kind, r.status_code, r.text[:300])
        body = r.json()
        assert set(body) == {"error"} and body["error"]["code"] and body["error"]["message"]
        assert scan_keys(env.redis_url) == before, f"{kind} wrote to Redis"
        assert len(env.llm.chat_requests()) == calls, f"{kind} reached the LLM"
        if times[-1] < LIMIT_S:
            break
        env.hiccups += 1
    env.slowest = max(env.slowest, min(times))
    assert min(times) < LIMIT_S, f"{kind}: {[round(t * 1000, 1) for t in times]} ms"
    return r


# --- strategies ------------------------------------------------------------------

ID_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-"
good_id = st.text(ID_CHARS, min_size=1, max_size=12)
poison = st.sampled_from(
    ["{", "}", "*", '"', "==", "{*}", '"}', "\x00", ":", " ", "\\", "é", "\n", "'", "/", "?",
     "%00", "tm:{x:y}", "\ud800"]
)  # fmt: skip
bad_id = st.one_of(
    st.builds(lambda a, p, b: a + p + b, st.text(ID_CHARS, max_size=4), poison,
              st.text(ID_CHARS, max_size=4)),
    st.just(""),
    st.integers(129, 400).map(lambda n: "a" * n),
)  # fmt: skip
control = st.sampled_from(["\x00", "\x01", "\x07", "\x1b", "\x7f", "\x0b", "\x0c"])
bad_message = st.one_of(
    st.builds(lambda a, c, b: a + c + b, st.text(max_size=20), control, st.text(max_size=20)),
    st.integers(MAX_CHARS + 1, MAX_CHARS * 4).map(lambda n: "m" * n),
    st.sampled_from(["", " ", "\n\t ", "\u2003"]),
    st.builds(lambda a: a + "\ud800", st.text(max_size=10)),
)
not_a_string = st.one_of(
    st.integers(), st.floats(allow_nan=False), st.booleans(), st.none(),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(),
                                                         max_size=2),
)  # fmt: skip


def _json(obj: Any) -> bytes:
    # ensure_ascii: lone surrogates travel as \\ud800 escapes, as a client would send them.
    return json.dumps(obj, ensure_ascii=True).encode()


def _deep(depth: int, kind: str) -> bytes:
    if kind == "list":
        return b"[" * depth + b"]" * depth
    if kind == "object":
        return b'{"a":' * depth + b"1" + b"}" * depth
    inner = b'{"a":' * depth + b"1" + b"}" * depth
    return b'{"user_id":"u1","message":' + inner + b"}"


bad_body = st.one_of(
    st.tuples(st.just("bad_user_id"), bad_id.map(lambda u: _json({"user_id": u, "message": "hi"}))),
    st.tuples(st.just("bad_turn_id"), bad_id.map(
        lambda t: _json({"user_id": "u1", "message": "hi", "turn_id": t}))),
    st.tuples(st.just("bad_message"), bad_message.map(
        lambda m: _json({"user_id": "u1", "message": m}))),
    st.tuples(st.just("wrong_type"), not_a_string.map(
        lambda m: _json({"user_id": "u1", "message": m}))),
    st.tuples(st.just("tenant_in_body"), good_id.map(
        lambda t: _json({"user_id": "u1", "message": "hi", "tenant_id": t}))),
    st.tuples(st.just("unknown_field"), st.text(ID_CHARS, min_size=1, max_size=8).filter(
        lambda f: f not in {"user_id", "message", "turn_id", "retrieve"}).map(
        lambda f: _json({"user_id": "u1", "message": "hi", f: 1}))),
    st.tuples(st.just("bad_retrieve"), st.text(max_size=8).filter(
        lambda v: v not in {"auto", "always", "never"}).map(
        lambda v: _json({"user_id": "u1", "message": "hi", "retrieve": v}))),
    st.tuples(st.just("deep_json"), st.builds(
        _deep, st.integers(200, 1200), st.sampled_from(["list", "object", "message"]))),
    st.tuples(st.just("invalid_utf8"), st.builds(
        lambda a, bad, b: b'{"user_id":"u1","message":"' + a + bad + b + b'"}',
        st.binary(max_size=20).filter(lambda x: b'"' not in x and b"\\" not in x),
        st.sampled_from([b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80",
                         b"\xe2\x82", b"\x80"]),
        st.binary(max_size=20).filter(lambda x: b'"' not in x and b"\\" not in x),
    # The random bytes around the bad sequence can complete it (b"\xe2\x82" then
    # b"\x80..." is U+2080): keep only bodies that really are invalid UTF-8.
    ).filter(_invalid_utf8)),
    st.tuples(st.just("raw_nul"), st.builds(
        lambda a: b'{"user_id":"u1","message":"' + a + b'\x00"}', st.binary(max_size=10))),
    st.tuples(st.just("garbage"), st.binary(min_size=0, max_size=200).filter(
        lambda x: not _is_valid_turn(x))),
)  # fmt: skip


def _is_valid_turn(raw: bytes) -> bool:
    try:
        obj = json.loads(raw)
    except ValueError:
        return False
    return isinstance(obj, dict) and "user_id" in obj and "message" in obj


# --- bad requests ------------------------------------------------------------------


@FUZZ
@given(case=bad_body)
def test_bad_turn_bodies(env: Env, case: tuple[str, bytes]) -> None:
    kind, raw = case
    assert_refused(env, kind, "POST", f"/v1/sessions/s-{uuid.uuid4().hex[:8]}/turns",
                   content=raw, headers={**AUTH, "content-type": "application/json"})  # fmt: skip


def _oversized(env: Env, size: int, chunked: bool) -> httpx.Response:
    raw = _json({"user_id": "u1", "message": "x" * size})
    # An iterator makes httpx send the body chunked, with no Content-Length.
    content: Any = iter([raw[i : i + 1024] for i in range(0, len(raw), 1024)]) if chunked else raw
    return assert_refused(env, "oversized_chunked" if chunked else "oversized", "POST",
                          f"/v1/sessions/s-{uuid.uuid4().hex[:8]}/turns", content=content,
                          headers={**AUTH, "content-type": "application/json"})  # fmt: skip


@settings(parent=FUZZ, max_examples=30)
@given(size=st.integers(MAX_BODY + 1, MAX_BODY * 8), chunked=st.booleans())
def test_oversized_bodies(env: Env, size: int, chunked: bool) -> None:
    r = _oversized(env, size, chunked)
    if not chunked:
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_oversized_chunked_body_is_413(env: Env) -> None:
    r = _oversized(env, MAX_BODY * 2, chunked=True)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


@settings(parent=FUZZ, max_examples=150)
@given(bad=bad_id, route=st.sampled_from(["turns", "get", "release", "memories"]))
def test_bad_ids_in_paths(env: Env, bad: str, route: str) -> None:
    seg = quote(bad.encode("utf-8", "surrogatepass"), safe="")
    if route == "turns":
        assert_refused(env, "bad_path_id", "POST", f"/v1/sessions/{seg}/turns",
                       content=_json({"user_id": "u1", "message": "hi"}),
                       headers={**AUTH, "content-type": "application/json"})  # fmt: skip
    elif route == "get":
        assert_refused(env, "bad_path_id", "GET", f"/v1/sessions/{seg}", headers=AUTH)
    elif route == "release":
        assert_refused(env, "bad_path_id", "POST", f"/v1/sessions/{seg}/release", headers=AUTH)
    else:
        assert_refused(env, "bad_path_id", "GET", f"/v1/users/{seg}/memories",
                       params={"query": "hello"}, headers=AUTH)  # fmt: skip


bad_query = st.one_of(
    st.builds(lambda a, c, b: a + c + b, st.text(ID_CHARS, max_size=20), control,
              st.text(ID_CHARS, max_size=20)),
    st.integers(MAX_CHARS + 1, 5000).map(lambda n: "q" * n),
    st.sampled_from(["", " ", "\n\t ", "\u2003"]),
)  # fmt: skip
bad_k = st.one_of(st.integers(-10, 0), st.integers(51, 10**6),
                  st.sampled_from(["x", "1.5", "", "1e3", "0x10"]))  # fmt: skip


@settings(parent=FUZZ, max_examples=100)
@given(case=st.one_of(st.tuples(bad_query, st.just(5)), st.tuples(st.just("hello"), bad_k)))
def test_bad_memory_searches(env: Env, case: tuple[str, object]) -> None:
    query, k = case
    assert_refused(env, "bad_search", "GET", "/v1/users/u1/memories",
                   params={"query": query, "k": k}, headers=AUTH)  # fmt: skip


def _header_value(text: str) -> bytes:
    """What of ``text`` can reach the app in a header: its UTF-8 bytes as Latin-1
    (what the server decodes), without control characters or surrounding
    whitespace, which the HTTP parser refuses before the app sees them."""
    value = text.encode("utf-8", "surrogatepass").decode("latin-1")
    value = "".join(c for c in value if c >= " " and c != "\x7f")
    return value.strip().encode("latin-1")


garbage_event_id = st.one_of(
    st.text(max_size=40).filter(lambda s: ":" not in s or not s.rpartition(":")[2].isdigit()),
    st.builds(lambda b, n: f"{b}:{n}", bad_id, st.integers(0, 99)),
    st.builds(lambda t: f"{t}:-1", good_id),
    st.builds(lambda t: f"{t}:x", good_id),
)


@settings(parent=FUZZ, max_examples=100)
@given(last_event_id=garbage_event_id)
def test_garbage_last_event_id(env: Env, last_event_id: str) -> None:
    # Header values travel as Latin-1 bytes; anything else cannot be sent.
    value = _header_value(last_event_id) + b"!"  # "!": never a valid "<id>:<seq>"
    r = assert_refused(env, "garbage_last_event_id", "POST",
                       f"/v1/sessions/s-{uuid.uuid4().hex[:8]}/turns",
                       content=_json({"user_id": "u1", "message": "hi"}),
                       headers={**AUTH, "content-type": "application/json",
                                "Last-Event-ID": value})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_last_event_id"


@settings(parent=FUZZ, max_examples=60)
@given(
    auth=st.one_of(st.just(None), st.text(max_size=30), st.builds(lambda t: "Bearer " + t,
                   st.text(ID_CHARS, max_size=40)), st.just("Bearer " + KEY[:-1]),
                   st.just(KEY), st.just("Basic " + KEY)),
    route=st.sampled_from(["turns", "get", "release", "memories"]),
)  # fmt: skip
def test_bad_keys_are_401(env: Env, auth: str | None, route: str) -> None:
    headers: dict[str, Any] = {}
    if auth is not None:
        headers["Authorization"] = _header_value(auth)
    path, method = {
        "turns": ("/v1/sessions/s1/turns", "POST"), "get": ("/v1/sessions/s1", "GET"),
        "release": ("/v1/sessions/s1/release", "POST"), "memories": ("/v1/users/u1/memories",
                                                                     "GET"),
    }[route]  # fmt: skip
    body = _json({"user_id": "u1", "message": "hi"}) if method == "POST" else None
    params = {"query": "hi"} if route == "memories" else None
    r = assert_refused(env, "bad_key", method, path, headers=headers, content=body, params=params)
    assert r.status_code == 401


# --- foreign Last-Event-ID ---------------------------------------------------------


def _turn(env: Env, session: str, message: str, headers: dict[str, str]) -> list[Any]:
    body = {"user_id": "u1", "message": message}
    with env.http.stream("POST", f"/v1/sessions/{session}/turns", json=body, headers=headers) as r:
        assert r.status_code == 200, r.read()
        lines = list(r.iter_lines())
    events, _ = parse_sse(lines)
    return events


def test_foreign_last_event_id_is_refused(env: Env) -> None:
    """Another tenant's real ``<turn_id>:<seq>`` (or one from another session of
    the same tenant) names no turn of the caller's session: server-issued turn
    ids are bound to their tenant and session, so it is refused with a 4xx,
    quickly, and nothing is written or replayed."""
    secret = "the other tenant's secret is " + uuid.uuid4().hex
    other_session = "shared-" + uuid.uuid4().hex[:6]
    other = _turn(env, other_session, secret, OTHER_AUTH)
    other_turn_id = other[0].data["turn_id"]
    own_session = "own-" + uuid.uuid4().hex[:6]
    for session in (other_session, own_session):  # same session id, other tenant; or other
        for seq in (0, 3, len(other) - 1):
            headers = {**AUTH, "Last-Event-ID": f"{other_turn_id}:{seq}"}
            started = time.monotonic()
            body = {"user_id": "u1", "message": "hello"}
            r = env.http.post(f"/v1/sessions/{session}/turns", json=body, headers=headers)
            elapsed = time.monotonic() - started
            TRIED["foreign_last_event_id"] += 1
            assert r.status_code == 409, r.text
            assert r.json()["error"]["code"] == "foreign_last_event_id"
            assert secret not in r.text
            assert elapsed < 0.1 * 3  # generous on a loaded 2-core box
        assert env.http.get(f"/v1/sessions/{session}", headers=AUTH).status_code == 404
    theirs = env.http.get(f"/v1/sessions/{other_session}", headers=OTHER_AUTH).json()
    assert theirs["turn_count"] == 1 and theirs["unarchived_turns"][0]["user"] == secret
    # Their own client resumes with it by Last-Event-ID alone: a replay.
    again = _turn(env, other_session, secret, {**OTHER_AUTH, "Last-Event-ID": f"{other_turn_id}:1"})
    assert [e for e in again if e.event == "done"][-1].data["replayed"] is True


# --- schemathesis --------------------------------------------------------------------


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_schemathesis_no_server_errors(env: Env, mode: GenerationMode) -> None:
    schema = schemathesis.openapi.from_url(f"{env.app.url}/openapi.json")
    statuses: Counter[int] = Counter()

    @settings(parent=FUZZ, max_examples=100 if mode == GenerationMode.NEGATIVE else 60)
    @given(case=schema.as_strategy(generation_mode=mode))
    def run(case: schemathesis.Case) -> None:
        response = case.call(base_url=env.app.url, headers=AUTH, timeout=10)
        TRIED[f"schemathesis_{mode.value}"] += 1
        statuses[response.status_code] += 1
        assert response.status_code < 500, (case.method, case.path, response.text[:300])
        case.validate_response(response, checks=[not_a_server_error])

    run()
    assert sum(statuses.values()) > 0
    if mode == GenerationMode.POSITIVE:
        assert any(200 <= s < 300 for s in statuses), statuses
    # Whatever was generated, every key written belongs to the caller's tenant
    # (or to the other tenant of this module's own turns).
    keys = scan_keys(env.redis_url)
    assert keys and all(_in_namespace(k, TENANT) or _in_namespace(k, OTHER_TENANT) for k in keys)
    stray = [k for k in keys if not _in_namespace(k, TENANT) and not _in_namespace(k, OTHER_TENANT)]
    assert stray == []


def test_slow_answers_were_rare(env: Env) -> None:
    """Runs last in this module: the re-sends of slow answers stayed hiccups."""
    bad = sum(TRIED.values()) - TRIED["schemathesis_positive"]
    assert bad > 500
    assert env.hiccups <= max(3, bad // 100), (env.hiccups, bad)
