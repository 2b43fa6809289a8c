"""The web inspector at /ui/: the route, the data it reads, and the page itself in a
real headless Chromium (Debian's chromium + chromedriver, driven by Selenium)
against the real app on a real Redis and Milvus Lite, with a fake
OpenAI-compatible LLM that calls tools by rule (``CALL <tool> <json>`` lines).

The browser test needs /usr/bin/chromium and /usr/bin/chromedriver (``make test``
installs them where it can): without them it is skipped, saying so. Its screenshot
is kept in ``$TIERMEM_TEST_ARTIFACTS`` (default ``test-artifacts/`` in the checkout).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from app.auth import hash_key
from tests.harness import REPO, AppServer, TurnResult, make_settings, post_turn
from tests.servers.fake_vllm import FakeVLLM

KEY = "key-inspector"
SKILLS = Path(__file__).resolve().parent.parent / "data" / "skills"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(os.environ.get("TIERMEM_TEST_ARTIFACTS") or REPO / "test-artifacts")
# What a page action may take on a loaded 2-core machine: the API behind it
# answers in milliseconds; Chromium's first paint there has taken seconds.
UI_WAIT_S = 60.0
SKILL_MESSAGE = ("Please scale this recipe up: double the servings and adjust the "
                 "ingredient amounts for eight people.")  # fmt: skip
XSS = "<img src=x onerror=\"document.title='pwned'\"> is what I typed"

T = TypeVar("T")


@pytest.fixture(scope="module")
def fake_llm() -> Iterator[FakeVLLM]:
    llm = FakeVLLM(reply_tokens=6).start()
    yield llm
    llm.stop()


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def app_for(tmp_path: Path, redis_url: str, llm: FakeVLLM, **overrides: Any) -> AppServer:
    """The app (started by ``async with``), keyed, archiving every 2 turns."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{"sha256": hash_key(KEY), "tenant": "acme"}]}))
    skills = tmp_path / "skills"
    shutil.copytree(SKILLS / "recipe-scaling", skills / "recipe-scaling")
    settings = make_settings(
        tmp_path, redis_url, llm_url=llm.base_url, auth="on", api_keys_file=keys,
        archive_threshold=2, skills_dir=skills, **overrides,
    )  # fmt: skip
    return AppServer(settings)


async def turn(app: AppServer, sid: str, message: str, user: str = "alice") -> TurnResult:
    async with httpx.AsyncClient(timeout=120) as client:
        r = await post_turn(client, app.url, sid, message, user=user, headers=auth())
    assert r.status_code == 200 and r.done, r.body or r.events
    return r


async def get(app: AppServer, path: str, **params: Any) -> Any:
    async with httpx.AsyncClient(timeout=60) as client:
        r = await client.get(f"{app.url}{path}", params=params, headers=auth())
    assert r.status_code == 200, r.text
    return r.json()


async def until(check: Callable[[], Any], what: str, within_s: float = 60.0) -> Any:
    deadline = time.monotonic() + within_s
    while not (found := await check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)
    return found


async def a_session(app: AppServer) -> str:
    """Five turns of alice's: a plain one, one calling memory__search, one the
    skill detector answers with recipe-scaling, one with markup in it, a last
    one; both full batches (turns 1-2, 3-4) archived to L3, turn 5 not."""
    sid = f"ui-{uuid.uuid4().hex[:8]}"
    await turn(app, sid, "I sail a wooden boat called Marigold out of Brest.")
    await turn(app, sid, 'What is my boat called?\nCALL memory__search {"query": "boat"}')
    await turn(app, sid, SKILL_MESSAGE)
    await turn(app, sid, XSS)
    await turn(app, sid, "Thanks, that is all for today.")

    async def archived() -> bool:
        page = await get(app, f"/v1/sessions/{sid}/turns")
        return bool(page["archived_upto"] == 4)

    await until(archived, "turns 1-4 archived")
    return sid


async def test_the_turns_route_says_where_each_turn_lives_and_what_it_used(
    tmp_path: Path, redis_url: str, fake_llm: FakeVLLM
) -> None:
    async with app_for(tmp_path, redis_url, fake_llm) as app:
        sid = await a_session(app)
        page = await get(app, f"/v1/sessions/{sid}/turns")
        assert page["in_l1"] is True
        turns = {t["turn"]: t for t in page["turns"]}
        assert sorted(turns) == [1, 2, 3, 4, 5]
        for n, t in turns.items():
            # L1 holds the live context, L2 the log (archived turns stay until
            # trimmed), L3 the archived batches.
            assert t["tiers"] == {"l1": True, "l2": True, "l3": n <= 4}, (n, t["tiers"])
            u = t["usage"]
            assert u["prompt_tokens"] > 0 and u["cached_tokens"] is not None, u
            assert "expected_cacheable_tokens" in u and "prefix_break" in u, u
        (call,) = turns[2]["usage"]["tool_calls"]
        assert call["name"] == "memory__search" and call["ok"] is True
        assert "tool_calls" not in turns[1]["usage"]
        assert [s["name"] for s in turns[3]["skills"]] == ["recipe-scaling"]
        assert turns[3]["skills"][0]["how"] == "detected"
        assert turns[1]["skills"] == [] and turns[4]["skills"] == turns[5]["skills"] == []
        # Turn 2's prompt extends turn 1's: whole blocks of it were cacheable.
        assert turns[2]["usage"]["prefix_break"] is None
        assert turns[2]["usage"]["expected_cacheable_tokens"] > 0

        # Released from this pod's L1: the same turns, no longer in L1.
        async with httpx.AsyncClient(timeout=60) as client:
            r = await client.post(f"{app.url}/v1/sessions/{sid}/release", headers=auth())
        assert r.json()["released"] is True
        page = await get(app, f"/v1/sessions/{sid}/turns")
        assert page["in_l1"] is False
        assert not any(t["tiers"]["l1"] for t in page["turns"])


async def test_skills_loaded_by_a_tool_call_are_listed(
    tmp_path: Path, redis_url: str, fake_llm: FakeVLLM
) -> None:
    async with app_for(tmp_path, redis_url, fake_llm, skills_max_active=0) as app:
        sid = f"ui-{uuid.uuid4().hex[:8]}"
        await turn(app, sid, 'Load it.\nCALL skills__load {"name": "recipe-scaling"}')
        (t,) = (await get(app, f"/v1/sessions/{sid}/turns"))["turns"]
        assert t["skills"] == [
            {"name": "recipe-scaling", "version": t["skills"][0]["version"], "how": "tool"}
        ]
        assert len(t["skills"][0]["version"]) == 12


async def test_the_page_is_served_with_a_strict_policy_and_can_be_turned_off(
    tmp_path: Path, redis_url: str, fake_llm: FakeVLLM
) -> None:
    async with (
        app_for(tmp_path, redis_url, fake_llm) as app,
        httpx.AsyncClient(timeout=60) as client,
    ):
        r = await client.get(f"{app.url}/ui")
        assert r.status_code == 307 and r.headers["location"] == "/ui/"
        page = await client.get(f"{app.url}/ui/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert '<script src="inspector.js" defer></script>' in page.text
        policy = page.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "default-src 'none'" in policy
        assert page.headers["x-content-type-options"] == "nosniff"
        js = await client.get(f"{app.url}/ui/inspector.js")
        assert js.status_code == 200 and "javascript" in js.headers["content-type"]
        assert "sessionStorage" in js.text
        css = await client.get(f"{app.url}/ui/inspector.css")
        assert css.status_code == 200 and "text/css" in css.headers["content-type"]
        # The static files are the page's only: nothing outside app/ui/.
        outside = await client.get(f"{app.url}/ui/%2e%2e/main.py")
        assert outside.status_code == 404
        # The page is public; its data is not.
        denied = await client.get(f"{app.url}/v1/sessions")
        assert denied.status_code == 401
    off = app_for(tmp_path / "off", redis_url, fake_llm, ui=False)
    async with off as app, httpx.AsyncClient(timeout=60) as client:
        assert (await client.get(f"{app.url}/ui/")).status_code == 404
        assert (await client.get(f"{app.url}/ui")).status_code == 404


# --- in a real browser ----------------------------------------------------------------


def _browser() -> Any:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip(
            f"NO CHROMIUM: {CHROMIUM} and {CHROMEDRIVER} are needed for the inspector's "
            "browser test (Debian's chromium and chromium-driver; `make test` installs "
            "them as root)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    # Selenium Manager would look for drivers online: the paths are given.
    os.environ.setdefault("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--disable-gpu", "--window-size=1500,1900"):  # fmt: skip
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


class Page:
    """The inspector in a browser, one blocking Selenium call at a time (run in a
    worker thread, so the app under test keeps serving on the event loop)."""

    def __init__(self, driver: Any) -> None:
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver = driver
        self.wait = WebDriverWait(driver, UI_WAIT_S, poll_frequency=0.1)

    def css(self, selector: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return list(self.driver.find_elements(By.CSS_SELECTOR, selector))

    def one(self, selector: str) -> Any:
        return self.until(lambda: (found := self.css(selector)) and found[0], selector)

    def until(self, check: Callable[[], T], what: str) -> T:
        try:
            return self.wait.until(lambda _d: check())
        except Exception as exc:
            raise AssertionError(f"the page never showed {what}: {self.text()[:2000]}") from exc

    def text(self) -> str:
        return str(self.driver.find_element("tag name", "body").text)

    def type(self, selector: str, text: str) -> None:
        box = self.one(selector)
        box.clear()
        box.send_keys(text)

    def click(self, selector: str) -> None:
        self.one(selector).click()

    def notice(self) -> str:
        return self.until(
            lambda: (n := self.one("#notice")).is_displayed() and str(n.text), "a notice"
        )


async def test_the_inspector_in_headless_chromium(
    tmp_path: Path, redis_url: str, fake_llm: FakeVLLM
) -> None:
    driver = await asyncio.to_thread(_browser)
    page = Page(driver)
    try:
        async with app_for(tmp_path, redis_url, fake_llm) as app:
            sid = await a_session(app)
            # Turns of ~4,000 tokens each: past the 6,000-token context budget the
            # context compacts, a prefix break the page must show with its reason.
            long = f"ui-long-{uuid.uuid4().hex[:6]}"
            words = " ".join(f"harbour{i} tide{i}" for i in range(700))
            for n in range(3):
                await turn(app, long, f"Log {n}: {words}", user="carol")
            other = f"ui-bob-{uuid.uuid4().hex[:6]}"
            await turn(app, other, "Bob here: I keep bees.", user="bob")
            await asyncio.to_thread(_browse, page, app.url, sid, long, other)
            # What the page deleted is gone from the API too.
            async with httpx.AsyncClient(timeout=60) as client:
                r = await client.get(f"{app.url}/v1/sessions/{other}", headers=auth())
            assert r.status_code == 404, r.text
    finally:
        await asyncio.to_thread(driver.quit)


def _browse(page: Page, base: str, sid: str, long: str, other: str) -> None:
    d = page.driver
    d.get(f"{base}/ui")
    assert d.current_url == f"{base}/ui/"
    page.one("#key-form")

    # A wrong key: refused, said plainly, nothing listed.
    page.type("#key", "not-a-key")
    page.click("#connect")
    assert "check the API key" in page.notice()
    assert not page.css("#sessions .session")

    page.type("#key", KEY)
    page.click("#connect")
    page.until(lambda: len(page.css("#sessions .session")) >= 3, "the sessions")
    listed = [b.get_attribute("data-session-id") for b in page.css("#sessions .session")]
    assert listed[:3] == [other, long, sid], listed  # newest first

    # A session: its turns, where each lives, the tokens chart, tools and skills.
    page.click(f'#sessions .session[data-session-id="{sid}"]')
    page.until(lambda: len(page.css("#turns tbody tr.turn")) == 5, "the session's 5 turns")
    assert sid in page.one("#session-title").text
    rows = {r.get_attribute("data-turn"): r for r in page.css("#turns tbody tr.turn")}

    def tiers(n: str) -> list[str]:
        return [s.text for s in rows[n].find_elements("css selector", ".tier.on")]

    assert tiers("1") == ["L1", "L2", "L3"] and tiers("5") == ["L1", "L2"]
    assert "memory__search" in rows["2"].find_element("css selector", "td.tools").text
    assert "recipe-scaling (detected)" in rows["3"].find_element("css selector", "td.skills").text
    # Stored markup is text, never HTML: shown as typed, nothing ran.
    assert rows["4"].find_element("css selector", "td.user").text.startswith("<img src=x")
    assert not page.css("#turns img") and d.title == "tiermem inspector"
    bars = page.css("#token-chart g.turn-bar")
    assert len(bars) == 5
    assert page.css("#token-chart rect.bar-cached"), "no cached tokens drawn"
    assert len(page.css("#token-chart line.expected")) == 5
    assert not page.css("#breaks li.break") and "None" in page.one("#breaks").text

    # The compacted session: its breaks, with reasons, in the list and the chart.
    page.click(f'#sessions .session[data-session-id="{long}"]')
    page.until(lambda: page.css("#breaks li.break"), "the prefix breaks")
    breaks = page.css("#breaks li.break")
    assert all("compaction" in b.text for b in breaks), [b.text for b in breaks]
    assert len(page.css("#token-chart path.break-mark")) == len(breaks)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert d.save_screenshot(str(ARTIFACTS / "inspector-breaks.png"))
    page.click(f'#sessions .session[data-session-id="{sid}"]')
    page.until(lambda: sid in page.one("#session-title").text, "alice's session again")

    # The memory search box: alice's first batch is found, and opens its session.
    page.type("#search-query", "wooden boat Marigold")
    assert page.one("#search-user").get_attribute("value") == "alice"
    page.click("#search-go")
    hit = page.until(lambda: page.css("#search-results li.hit"), "a memory hit")[0]
    assert sid in hit.text

    shot = ARTIFACTS / "inspector.png"
    assert d.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    print(f"inspector screenshot: {shot}")

    # The key stays in the tab: a reload connects again by itself.
    d.refresh()
    page.until(lambda: len(page.css("#sessions .session")) >= 2, "the sessions after a reload")
    assert page.one("#key").get_attribute("value") == KEY

    # Forget, with a confirmation first; cancel forgets nothing.
    page.click(f'#sessions .session[data-session-id="{other}"]')
    page.until(lambda: other in page.one("#session-title").text, "bob's session")
    page.click("#forget-session")
    page.until(lambda: page.one("#confirm").is_displayed(), "the confirmation")
    assert other in page.one("#confirm-text").text
    page.click("#confirm-no")
    page.until(lambda: not page.one("#confirm").is_displayed(), "the confirmation closed")
    assert len(page.css(f'#sessions .session[data-session-id="{other}"]')) == 1
    page.click("#forget-session")
    page.click("#confirm-yes")
    assert f"Forgot session {other}" in page.notice()
    page.until(
        lambda: not page.css(f'#sessions .session[data-session-id="{other}"]'),
        "bob's session gone from the list",
    )
    assert page.css(f'#sessions .session[data-session-id="{sid}"]')
