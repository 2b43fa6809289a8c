"""API keys beyond the basics (tests/e2e/test_turn_paths.py has the key -> tenant map).

Keys never appear in logs (a real `tiermem serve` at DEBUG, and the in-process
logs) or URLs; the key file is re-read without a restart (add and revoke take
effect within the reload interval); every API route, SSE included, answers 401
without a valid key; a ``tenant_id`` in the body is rejected and in the query
ignored; with no key file, a development key is created under the data dir,
only its hash kept, and printed once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import stat
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import redis.asyncio as aioredis
from fastapi import FastAPI

from app.auth import RELOAD_CHECK_S, hash_key
from tests.harness import AppServer, ServeProcess, make_settings, post_turn
from tests.security import write_keys
from tests.servers.fake_vllm import FakeVLLM

DEV_KEY_RE = re.compile(r"tm_dev_[A-Za-z0-9_-]{20,}")


def sid() -> str:
    return "au-" + uuid.uuid4().hex[:12]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def fake_llm() -> Iterator[FakeVLLM]:
    llm = FakeVLLM(reply_tokens=6).start()
    yield llm
    llm.stop()


class Keys:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.good = "good-" + uuid.uuid4().hex
        self.other = "other-" + uuid.uuid4().hex
        self.revoked = "revoked-" + uuid.uuid4().hex
        self.tenant = "ta" + uuid.uuid4().hex[:8]
        self.other_tenant = "tb" + uuid.uuid4().hex[:8]
        write_keys(path, [(self.good, self.tenant), (self.other, self.other_tenant),
                          (self.revoked, self.tenant, True)])  # fmt: skip


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path / "keys.json")


@pytest.fixture
async def app(
    tmp_path: Path, redis_url: str, fake_llm: FakeVLLM, keys: Keys
) -> AsyncIterator[AppServer]:
    settings = make_settings(tmp_path, redis_url, llm_url=fake_llm.base_url, auth="on",
                             api_keys_file=keys.path)  # fmt: skip
    async with AppServer(settings) as srv:
        yield srv


# --- 401 everywhere ------------------------------------------------------------------


def _routes(routes: list[Any]) -> Iterator[tuple[str, set[str]]]:
    for route in routes:
        inner = getattr(route, "original_router", None)  # an included router
        if inner is not None:
            yield from _routes(inner.routes)
        elif hasattr(route, "path"):
            yield route.path, set(getattr(route, "methods", None) or ())


def _api_requests(srv: AppServer) -> list[tuple[str, str, dict[str, Any]]]:
    """One request per API route of the app, read from its route table and its
    OpenAPI schema, so a route added later is covered without editing this test."""
    app = cast(FastAPI, srv.server.config.app)
    table: dict[str, set[str]] = {}
    for path, methods in _routes(app.routes):
        table.setdefault(path, set()).update(methods)
    for path, ops in app.openapi()["paths"].items():
        table.setdefault(path, set()).update(m.upper() for m in ops)
    out = []
    for path, methods in sorted(table.items()):
        if not path.startswith("/v1/"):
            continue
        url = re.sub(r"\{[^}]+\}", "x1", path)
        for method in sorted(methods - {"HEAD", "OPTIONS"}):
            kwargs: dict[str, Any] = {}
            if method == "POST" and url.endswith("/turns"):
                kwargs["json"] = {"user_id": "u1", "message": "hi"}
            if url.endswith("/memories"):
                kwargs["params"] = {"query": "hi"}
            out.append((method, url, kwargs))
    return out


async def test_every_api_route_needs_a_valid_key(
    app: AppServer, keys: Keys, fake_llm: FakeVLLM, redis_url: str
) -> None:
    requests = _api_requests(app)
    assert {u for _, u, _ in requests} >= {
        "/v1/sessions/x1/turns", "/v1/sessions/x1", "/v1/sessions/x1/release",
        "/v1/users/x1/memories",
    }  # fmt: skip
    bad_headers: list[dict[str, str]] = [
        {},
        {"Authorization": ""},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer  x"},
        bearer("nope"),
        bearer(keys.revoked),
        bearer(keys.good.upper()),
        bearer(keys.good + "x"),
        {"Authorization": keys.good},  # no scheme
        {"Authorization": f"Basic {keys.good}"},
        {"Authorization": f"Token {keys.good}"},
        {"X-API-Key": keys.good},
        {"Cookie": f"api_key={keys.good}"},
    ]
    calls = len(fake_llm.chat_requests())
    async with httpx.AsyncClient(base_url=app.url, timeout=10) as c:
        for method, url, kwargs in requests:
            for headers in bad_headers:
                r = await c.request(method, url, headers=headers, **kwargs)
                assert r.status_code == 401, (method, url, headers, r.status_code)
                assert r.json()["error"]["code"] == "unauthorized"
                assert r.headers["www-authenticate"] == "Bearer"
                assert not r.headers["content-type"].startswith("text/event-stream")
            # A key in the URL is never accepted: clients have no reason to put one there.
            for name in ("api_key", "key", "access_token", "token"):
                params = {**kwargs.get("params", {}), name: keys.good}
                rest = {k: v for k, v in kwargs.items() if k != "params"}
                r = await c.request(method, url, params=params, **rest)
                assert r.status_code == 401, (method, url, name)
        # The SSE route with resume headers, too.
        sse = {"Last-Event-ID": "t1:3", "Accept": "text/event-stream"}
        body = {"user_id": "u1", "message": "hi"}
        r = await c.post("/v1/sessions/x1/turns", json=body, headers=sse)
        assert r.status_code == 401
        # The same requests with the good key get through (the check can fail).
        ok = await post_turn(c, app.url, sid(), "hello", headers=bearer(keys.good))
        assert ok.status_code == 200 and ok.done["status"] == "complete"
        # Probes and metrics need no key (kubelet and Prometheus call them).
        for path in ("/healthz", "/readyz", "/metrics"):
            assert (await c.get(path)).status_code == 200
    assert len(fake_llm.chat_requests()) == calls + 1


# --- the tenant comes only from the key -------------------------------------------------


async def test_tenant_in_body_is_rejected_and_in_query_or_headers_ignored(
    app: AppServer, keys: Keys, redis_url: str
) -> None:
    session = sid()
    r = aioredis.from_url(redis_url)
    async with httpx.AsyncClient(base_url=app.url, timeout=10) as c:
        for field_name in ("tenant_id", "tenant"):
            refused = await c.post(
                f"/v1/sessions/{session}/turns", headers=bearer(keys.good),
                json={"user_id": "u1", "message": "hi", field_name: keys.other_tenant},
            )  # fmt: skip
            assert refused.status_code == 422, refused.text
            assert refused.json()["error"]["code"] == "invalid_request"
            assert field_name in refused.json()["error"]["message"]
        assert [k async for k in r.scan_iter(match=f"tm:{{*:{session}}}*")] == []

        # In the query string (and in headers a proxy might add): ignored.
        sneaky = {"tenant_id": keys.other_tenant, "tenant": keys.other_tenant}
        spoof = {**bearer(keys.good), "X-Tenant-ID": keys.other_tenant,
                 "X-Tenant": keys.other_tenant}  # fmt: skip
        turn = {"user_id": "u1", "message": "mine"}
        url = f"/v1/sessions/{session}/turns"
        async with c.stream("POST", url, params=sneaky, headers=spoof, json=turn) as resp:
            assert resp.status_code == 200
            body = (await resp.aread()).decode()
        assert "event: done" in body
        mine = [k async for k in r.scan_iter(match=f"tm:{{{keys.tenant}:{session}}}*")]
        theirs = [k async for k in r.scan_iter(match=f"tm:{{{keys.other_tenant}:*")]
        assert mine and theirs == []
        got = await c.get(f"/v1/sessions/{session}", params=sneaky, headers=spoof)
        assert got.status_code == 200 and got.json()["turn_count"] == 1
        # The other tenant's key sees no such session, whatever the query says.
        other = await c.get(f"/v1/sessions/{session}", params={"tenant_id": keys.tenant},
                            headers=bearer(keys.other))  # fmt: skip
        assert other.status_code == 404
        search = await c.get("/v1/users/u1/memories", headers=bearer(keys.other),
                             params={"query": "mine", "tenant_id": keys.tenant})  # fmt: skip
        assert search.status_code == 200 and search.json()["memories"] == []
    await r.aclose()


# --- reload without restart ------------------------------------------------------------


async def _until(check: Any, limit_s: float) -> float:
    """Seconds until ``await check()`` is true (polled), or fails past ``limit_s``."""
    t0 = time.monotonic()
    while True:
        if await check():
            return time.monotonic() - t0
        if time.monotonic() - t0 > limit_s:
            raise AssertionError(f"not in effect after {limit_s:.1f} s")
        await asyncio.sleep(0.05)


async def test_key_file_reload_adds_and_revokes_without_restart(app: AppServer, keys: Keys) -> None:
    new_key = "new-" + uuid.uuid4().hex
    limit = RELOAD_CHECK_S + 1.0
    async with httpx.AsyncClient(base_url=app.url, timeout=10) as c:

        async def status(key: str) -> int:
            return (await c.get("/v1/sessions/x1", headers=bearer(key))).status_code

        assert await status(new_key) == 401
        assert await status(keys.good) == 404  # authenticated: no such session
        write_keys(keys.path, [(keys.good, keys.tenant), (new_key, keys.tenant)])

        async def new_works() -> bool:
            return await status(new_key) == 404

        added_s = await _until(new_works, limit)
        # Revoke (flag) one key and drop another from the file.
        write_keys(keys.path, [(keys.good, keys.tenant, True), (new_key, keys.tenant)])

        async def good_refused() -> bool:
            return await status(keys.good) == 401

        revoked_s = await _until(good_refused, limit)
        write_keys(keys.path, [(keys.good, keys.tenant)])

        async def new_refused() -> bool:
            return await status(new_key) == 401

        removed_s = await _until(new_refused, limit)
        assert await status(keys.good) == 404  # un-revoked by the same rewrite
        # The file vanishing for a moment (a Secret being swapped) keeps the last set.
        keys.path.unlink()
        await asyncio.sleep(RELOAD_CHECK_S + 0.2)
        assert await status(keys.good) == 404
        assert await status(new_key) == 401
    print(json.dumps({"suite": "auth", "reload_interval_s": RELOAD_CHECK_S,
                      "add_s": round(added_s, 2), "revoke_s": round(revoked_s, 2),
                      "remove_s": round(removed_s, 2)}))  # fmt: skip


async def test_half_written_key_file_keeps_the_last_good_keys(app: AppServer, keys: Keys) -> None:
    keys.path.write_text('{"keys": [{"sha256": "')
    await asyncio.sleep(RELOAD_CHECK_S + 0.2)
    async with httpx.AsyncClient(base_url=app.url, timeout=10) as c:
        r = await c.get("/v1/sessions/x1", headers=bearer(keys.good))
    assert r.status_code == 404, r.text


# --- keys never in logs; the development key -------------------------------------------


async def test_keys_never_logged_in_process(
    app: AppServer, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-" + uuid.uuid4().hex
    async with httpx.AsyncClient(base_url=app.url, timeout=10) as c:
        session = sid()
        for key in (keys.good, keys.other):
            ok = await post_turn(c, app.url, session, "hello there", headers=bearer(key))
            assert ok.status_code == 200
            await c.get(f"/v1/sessions/{session}", headers=bearer(key))
            await c.get("/v1/users/u1/memories", params={"query": "hi"}, headers=bearer(key))
            await c.post(f"/v1/sessions/{session}/release", headers=bearer(key))
        for key in (wrong, keys.revoked):
            assert (await c.get("/v1/sessions/x1", headers=bearer(key))).status_code == 401
            assert (await c.get("/v1/sessions/x1", headers={"Authorization": key})).status_code \
                == 401  # fmt: skip
        r = await c.get("/v1/sessions/x1", headers=bearer(wrong))
        # Not echoed back either.
        assert wrong not in r.text and wrong not in json.dumps(dict(r.headers))
    text = "\n".join(
        f"{rec.getMessage()} {json.dumps(rec.__dict__, default=str)}" for rec in caplog.records
    )
    assert caplog.records  # the logs were captured at all
    for key in (keys.good, keys.other, keys.revoked, wrong):
        assert key not in text


async def test_serve_dev_key_printed_once_hash_only_never_logged(
    tmp_path: Path, redis_url: str, fake_llm: FakeVLLM
) -> None:
    data = tmp_path / "data"
    env = {
        "TIERMEM_REDIS_URL": redis_url, "TIERMEM_DATA_DIR": str(data),
        "TIERMEM_EMBEDDINGS": "hash", "TIERMEM_LLM_URL": fake_llm.base_url,
        "TIERMEM_LOG_FORMAT": "json", "TIERMEM_LOG_LEVEL": "DEBUG",
        "TIERMEM_DEFAULT_TENANT": "dev" + uuid.uuid4().hex[:6],
    }  # fmt: skip
    log_path = tmp_path / "serve.log"
    wrong = "tm_dev_" + uuid.uuid4().hex + "wrongwrong"
    proc = ServeProcess(env, log_path).start()
    try:
        found = DEV_KEY_RE.findall(log_path.read_text())
        assert len(found) == 1, found
        key = found[0]
        async with httpx.AsyncClient(base_url=proc.url, timeout=30) as c:
            session = sid()
            ok = await post_turn(c, proc.url, session, "hi", headers=bearer(key))
            assert ok.status_code == 200 and ok.done["status"] == "complete"
            assert (await c.get(f"/v1/sessions/{session}", headers=bearer(key))).status_code \
                == 200  # fmt: skip
            assert (await c.get("/v1/sessions/x1", headers=bearer(wrong))).status_code == 401
            assert (await c.get("/v1/sessions/x1", params={"api_key": key})).status_code == 401
    finally:
        assert proc.terminate() == 0, proc.log_tail()
    # Only the hash is kept, readable by the owner alone.
    key_file = data / "api_keys.json"
    stored = json.loads(key_file.read_text())
    assert stored["keys"][0]["sha256"] == hash_key(key)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    for path in data.rglob("*"):
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path
    # A second start prints no key: the first one still works.
    second = ServeProcess(env, log_path).start()
    try:
        async with httpx.AsyncClient(base_url=second.url, timeout=30) as c:
            assert (await c.get(f"/v1/sessions/{session}", headers=bearer(key))).status_code \
                == 200  # fmt: skip
    finally:
        assert second.terminate() == 0, second.log_tail()
    log = log_path.read_text()
    # Printed exactly once over both starts (DEBUG logs included); no other key ever.
    assert log.count(key) == 1
    assert wrong not in log
    assert "development API key file" in log


async def test_services_creates_dev_key_under_data_dir(
    tmp_path: Path, redis_url: str, capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    settings = make_settings(tmp_path, redis_url, auth="on", api_keys_file=None)
    async with AppServer(settings) as srv, httpx.AsyncClient(timeout=10) as c:
        printed = capsys.readouterr().out
        keys = DEV_KEY_RE.findall(printed)
        assert len(keys) == 1 and srv.services.dev_key == keys[0]
        key = keys[0]
        assert (await c.get(f"{srv.url}/v1/sessions/x1", headers=bearer(key))).status_code == 404
        assert (await c.get(f"{srv.url}/v1/sessions/x1")).status_code == 401
    raw = (tmp_path / "api_keys.json").read_text()
    assert key not in raw and hash_key(key) in raw
    assert json.loads(raw)["keys"][0]["tenant"] == settings.default_tenant
    # Again on the same data dir: nothing printed, the same file and key.
    async with AppServer(settings) as srv2, httpx.AsyncClient(timeout=10) as c:
        assert DEV_KEY_RE.findall(capsys.readouterr().out) == []
        assert srv2.services.dev_key is None
        assert (await c.get(f"{srv2.url}/v1/sessions/x1", headers=bearer(key))).status_code \
            == 404  # fmt: skip
    assert (tmp_path / "api_keys.json").read_text() == raw
    assert key not in caplog.text


async def test_auth_off_is_explicit_and_loud(
    tmp_path: Path, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    settings = make_settings(tmp_path, redis_url, auth="off")
    async with AppServer(settings) as srv, httpx.AsyncClient(timeout=10) as c:
        r = await c.get(f"{srv.url}/v1/sessions/x1")
        assert r.status_code == 404  # no key needed: the default tenant
    loud = [rec for rec in caplog.records if "AUTHENTICATION IS OFF" in rec.getMessage()]
    assert loud and loud[0].levelno == logging.WARNING
    assert not (tmp_path / "api_keys.json").exists()  # no dev key when auth is off
