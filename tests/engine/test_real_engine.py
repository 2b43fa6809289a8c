"""tiermem with a real vLLM in the loop (the embedded engine, SmolLM2-135M-Instruct).

- `tiermem serve` with no TIERMEM_LLM_URL starts the engine itself, says so in the
  log and in each turn's `meta`, and takes it down when it exits;
- a twelve-turn session through the real app: memory turns (retrieved from L3 once
  a batch is archived), an archive whose summary the real model writes, a
  compaction, then a changed system prompt: cached_tokens > 0 on every turn 2+,
  tiermem's expected prefix reuse within 10% of what the engine cached, and each
  break with its reason and the engine's cached count dropping with it;
- two engines as two replicas: with rendezvous routing every session's turns 2+
  hit its replica's cache; round robin loses part of it, and the figures say how much.

Every reply is greedy (temperature 0) and short (the model decodes tens of tokens
a second on two cores). Figures are printed (`pytest -s` shows them).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from app.services import Services
from infra.engine import EmbeddedEngine
from infra.llm import (
    ChatMessage,
    LLMClient,
    LLMResult,
    OpenAICompatibleLLM,
    ToolChoice,
    collect,
)
from infra.routing import RoundRobinRouter
from infra.settings import Settings
from memory.summaries import SUMMARY_PROMPT
from tests.engine.conftest import STATUS, Engines
from tests.engine.session_script import (
    MESSAGES,
    SYSTEM_PROMPT,
    TurnFigures,
    accounting,
    run_session,
)
from tests.harness import AppServer, make_settings, post_turn

pytestmark = pytest.mark.timeout(1200)

BLOCK = 32
# Short replies: the model decodes a few tokens a second on two loaded cores, and
# the prefix figures need replies in the log, not long ones.
REPLY_TOKENS = 24


def engine_settings(tmp_path: Path, redis_url: str, llm_url: str, **overrides: Any) -> Settings:
    """The app pointed at a real vLLM, as a user of one configures it: its URL, the
    served model's tokenizer and the engine's block size."""
    base: dict[str, Any] = dict(
        llm_url=llm_url, tokenizer=str(STATUS.model_dir), kv_block_tokens=BLOCK,
        llm_max_tokens=REPLY_TOKENS, llm_temperature=0.0, system_prompt=SYSTEM_PROMPT,
        llm_first_token_timeout_s=300.0, llm_read_timeout_s=120.0,
    )  # fmt: skip
    base.update(overrides)
    return make_settings(tmp_path, redis_url, **base)


class RecordingLLM:
    """The real client, noting what the model wrote for each summary request."""

    def __init__(self, inner: OpenAICompatibleLLM) -> None:
        self.inner = inner
        self.name = inner.name
        self.is_dev = inner.is_dev
        self.summaries: list[str] = []

    @property
    def model_label(self) -> str:
        return self.inner.model_label

    def stream_chat(self, messages: Sequence[ChatMessage], **kw: Any) -> Any:
        return self.inner.stream_chat(messages, **kw)

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
        result = await self.inner.complete(
            messages, session_key=session_key, max_tokens=max_tokens, tools=tools,
            tool_choice=tool_choice, temperature=temperature,
        )  # fmt: skip
        if messages and messages[0].get("content") == SUMMARY_PROMPT:
            self.summaries.append(result.text)
        return result

    async def health(self) -> bool:
        return await self.inner.health()

    async def aclose(self) -> None:
        await self.inner.aclose()


def report(title: str, turns: list[TurnFigures]) -> None:
    print(f"\n{title}\nturn prompt expected cached break memories ttft_ms")
    for t in turns:
        print(t.turn, t.prompt_tokens, t.expected_cacheable_tokens, t.cached_tokens,
              t.prefix_break, t.memories, t.ttft_ms)  # fmt: skip


# --- tiermem serve runs the engine -------------------------------------------------


async def test_serve_runs_the_embedded_engine_and_says_so(engines: Engines) -> None:
    serve, served = engines.serve, engines.served
    assert served is not None
    print(f"\ntiermem serve: its engine was ready in {served.start_s:.1f} s; the suite's "
          f"own in {engines.own.start_s:.1f} s (started together)")  # fmt: skip
    # A child of tiermem serve (it is stopped with it: see Engines.stop).
    assert psutil.Process(served.pid).ppid() == serve.proc.pid  # type: ignore[union-attr]
    session = f"serve-{uuid.uuid4().hex[:6]}"
    async with httpx.AsyncClient(timeout=300) as client:
        first = await post_turn(client, serve.url, session, "Hello! What is two plus two?")
        second = await post_turn(client, serve.url, session, "And three plus three?")
    for r in (first, second):
        assert r.status_code == 200, r.body
        meta = r.events[0].data
        assert meta["dev_llm"] is False
        assert "SmolLM2-135M-Instruct" in meta["model"]
        assert r.text.strip()
        assert "offline development model" not in r.text
    print("replies:", repr(first.text), repr(second.text))
    assert second.done["usage"]["cached_tokens"] > 0
    # Prewarmed at start: turn 1 of the first session found the stable prefix
    # (system message and tools) cached, whole blocks of it.
    assert "warm on" in await asyncio.to_thread(serve.log_path.read_text)
    assert first.done["usage"]["cached_tokens"] >= BLOCK
    # Its accounting counts in the engine's tokens: the prompt sizes agree.
    assert first.done["usage"]["prompt_tokens"] > 0


# --- one session: memory, archive, compaction, breaks --------------------------------


async def test_a_session_with_memory_archive_and_compaction_on_the_real_engine(
    tmp_path: Path, redis_url: str, engine: EmbeddedEngine
) -> None:
    settings = engine_settings(
        tmp_path, redis_url, engine.url, archive_threshold=5,
        # Small enough that the twelve turns compact once, near the end.
        context_budget_tokens=1300, compaction_target_ratio=0.7,
    )  # fmt: skip
    llm = RecordingLLM(
        OpenAICompatibleLLM.from_settings(settings, model=engine.model_name, name="engine")
    )
    session = f"real-{uuid.uuid4().hex[:8]}"
    services = Services(settings, llm=llm)  # type: ignore[arg-type]
    async with AppServer(settings, services) as app, httpx.AsyncClient(timeout=300) as client:
        # The archive runs after `done`, off the turn's path; the real model takes
        # tens of seconds for a summary here, so the script waits for each batch
        # before the turns that lean on it (a user coming back later).
        async def archived(turn: int) -> None:
            if turn % settings.archive_threshold:
                return
            want = turn // settings.archive_threshold
            deadline = asyncio.get_running_loop().time() + 600
            # The batch is scheduled just after `done`; wait on it once it runs.
            while len(await services.l3.list_batches(settings.default_tenant, session)) < want:
                assert asyncio.get_running_loop().time() < deadline, f"batch {want} not archived"
                await services.archiver.drain(600)
                await asyncio.sleep(0.2)

        turns = await run_session(
            client, app.url, session, "priya", tag="session", after_turn=archived
        )
        await services.archiver.drain(600)
        batches = await services.l3.list_batches(settings.default_tenant, session)
        rejected = services.metrics.summaries_rejected._value.get()  # type: ignore[attr-defined]
    report("one session on the real engine", turns)
    expected, cached, err = accounting(turns)
    print(f"turns 2-12: expected {expected}, cached {cached} ({err:+.1f}%)")

    assert all(t.meta["dev_llm"] is False for t in turns)
    assert all(t.text.strip() for t in turns)
    assert all((t.cached_tokens or 0) > 0 for t in turns[1:]), "a turn 2+ missed the cache"
    assert abs(err) <= 10, f"expected {expected} vs cached {cached}: {err:+.1f}%"
    assert any(t.memories for t in turns), "no turn retrieved a memory"

    # The compaction: a break with its reason, and the engine's cache drops with it
    # to about the stable prefix.
    compacted = [t for t in turns if t.prefix_break == "compaction"]
    assert compacted, "the session never compacted"
    c = compacted[0]
    before = turns[c.turn - 2]
    assert (c.cached_tokens or 0) < (before.cached_tokens or 0)
    assert abs(c.expected_cacheable_tokens - (c.cached_tokens or 0)) <= 2 * BLOCK

    # The archive: what the real model wrote is what L3 keeps as the batch's summary
    # (or, for a summary that names what the turns do not, none is indexed).
    assert batches, "no batch archived"
    assert llm.summaries, "the model wrote no summary"
    print("model's summaries:", llm.summaries)
    print("stored summaries:", [b.summary for b in batches])
    written = {s.strip() for s in llm.summaries}
    for b in batches:
        if b.summary:
            assert b.summary.strip() in written
    trusted = sum(1 for b in batches if b.summary)
    assert trusted + rejected >= len(batches)

    # A changed system prompt: a new prefix version, a break with reason "system"
    # and the engine caches less than on the turn before.
    changed = settings.model_copy(update={"system_prompt": "Be brief. " + SYSTEM_PROMPT})
    async with AppServer(changed) as app, httpx.AsyncClient(timeout=300) as client:
        after = await run_session(client, app.url, session, "priya", ["One more thing."])
    report("after the system prompt changed", after)
    assert after[0].prefix_break == "system"
    assert (after[0].cached_tokens or 0) < (turns[-1].cached_tokens or 0)
    assert abs(after[0].expected_cacheable_tokens - (after[0].cached_tokens or 0)) <= BLOCK


# --- two replicas ---------------------------------------------------------------------


async def _replica_run(
    tmp_path: Path, redis_url: str, urls: list[str], llm: LLMClient | None, tag: str
) -> list[list[TurnFigures]]:
    settings = engine_settings(
        tmp_path / tag, redis_url, ",".join(urls), retrieve_mode="never", llm_max_tokens=16
    )
    services = Services(settings, llm=llm) if llm is not None else None
    sessions = [f"{tag}-{n}-{uuid.uuid4().hex[:6]}" for n in range(4)]
    async with AppServer(settings, services) as app, httpx.AsyncClient(timeout=300) as client:
        # One session after another, so round robin's alternation is the same on
        # every run: each session's turn 2 lands on the replica its turn 1 did not.
        return [
            await run_session(client, app.url, s, f"user-{n}", MESSAGES[:3], tag=s)
            for n, s in enumerate(sessions)
        ]


def _share(runs: list[list[TurnFigures]]) -> tuple[int, int]:
    later = [t for run in runs for t in run if t.turn >= 2]
    return sum(t.cached_tokens or 0 for t in later), sum(t.prompt_tokens for t in later)


async def test_two_replicas_rendezvous_keeps_each_session_on_its_cache(
    tmp_path: Path, redis_url: str, engines: Engines
) -> None:
    urls = engines.replica_urls
    rendezvous = await _replica_run(tmp_path, redis_url, urls, None, "hrw")
    rr_settings = engine_settings(tmp_path / "rr-llm", redis_url, ",".join(urls))
    round_robin = await _replica_run(
        tmp_path, redis_url, urls,
        OpenAICompatibleLLM.from_settings(rr_settings, router=RoundRobinRouter(urls)),
        "rr",
    )  # fmt: skip
    for name, runs in (("rendezvous", rendezvous), ("round robin", round_robin)):
        for run in runs:
            report(f"{name}: session", run)
    hrw_cached, hrw_prompt = _share(rendezvous)
    rr_cached, rr_prompt = _share(round_robin)
    print(f"\nturns 2+: rendezvous cached {hrw_cached}/{hrw_prompt} "
          f"({hrw_cached / hrw_prompt:.0%}); round robin {rr_cached}/{rr_prompt} "
          f"({rr_cached / rr_prompt:.0%})")  # fmt: skip
    # Rendezvous: every turn 2+ reuses the session's previous prompt + reply, so
    # the engine's count is tiermem's expectation (a block of slack each).
    for run in rendezvous:
        for t in run[1:]:
            assert (t.cached_tokens or 0) > 0
            assert (t.cached_tokens or 0) >= t.expected_cacheable_tokens - BLOCK, t
    # Round robin sends turn 2 of each session to the other replica, which holds
    # only the shared system prompt: less is cached in all.
    assert rr_cached < hrw_cached


# --- tools on the real engine --------------------------------------------------------

TOOL_DEFS = [
    {"function": {"description": "Search the user's long-term memory, é and 中 included.",
                  "name": "memory__search",
                  "parameters": {"properties": {"k": {"type": "integer"},
                                                "query": {"type": "string"}},
                                 "required": ["query"], "type": "object"}},
     "type": "function"},
    {"function": {"description": "Echo.", "name": "local__echo",
                  "parameters": {"properties": {"text": {"type": "string"}}, "type": "object"}},
     "type": "function"},
]  # fmt: skip
SEARCH = {"name": "memory__search", "arguments": '{"query": "boat", "k": 2}'}
CALL = {"id": "call_1", "type": "function", "function": SEARCH}
TOOL_TURN: list[ChatMessage] = [
    {"role": "system", "content": SYSTEM_PROMPT},
    {"role": "user", "content": "What is my boat called?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},  # type: ignore[list-item]
    {"role": "tool", "tool_call_id": "call_1", "name": "memory__search",
     "content": "[1] session=s1 turns=1-10\nThe boat is called Seabird."},
    {"role": "assistant", "content": "She is called Seabird.",
     "tool_calls": [{**CALL, "id": "call_2", "function": {"name": "local__echo",
                                                          "arguments": "not json"}}]},
    {"role": "tool", "tool_call_id": "call_2", "name": "local__echo", "content": "ERROR: bad"},
]  # fmt: skip


async def test_the_engine_tokenises_tools_and_tool_calls_as_tiermem_counts(
    engine: EmbeddedEngine,
) -> None:
    """The engine serves tiermem's chat template: its own /tokenize of a request
    with tools, tool calls (one with broken arguments) and tool results gives the
    very tokens tiermem's accounting counts."""
    from infra.chat_template import render_prompt
    from infra.tokenizer import build_tokenizer

    tok = build_tokenizer(str(STATUS.model_dir))
    async with httpx.AsyncClient(timeout=120) as client:
        for messages, tools in ((TOOL_TURN, TOOL_DEFS), (TOOL_TURN[:2], None)):
            body: dict[str, Any] = {"model": engine.model_name, "messages": messages,
                                    "add_generation_prompt": True}  # fmt: skip
            if tools:
                body["tools"] = tools
            r = await client.post(engine.url.removesuffix("/v1") + "/tokenize", json=body)
            assert r.status_code == 200, r.text
            ours = tok.encode(render_prompt(messages, tools))
            assert r.json()["tokens"] == ours, (len(r.json()["tokens"]), len(ours))


async def test_a_tool_step_reuses_the_previous_request_on_the_real_engine(
    engine: EmbeddedEngine,
) -> None:
    """The request after a tool step is the one before plus the call and its
    result: the engine serves it from its cache, whole blocks of the first."""
    session = f"tools-{uuid.uuid4().hex[:8]}"
    llm = OpenAICompatibleLLM(
        [engine.url], model=engine.model_name, max_tokens=8, temperature=0.0,
        first_token_timeout_s=300, read_timeout_s=120,
    )  # fmt: skip
    try:
        first = await llm.complete(TOOL_TURN[:2], session_key=session, tools=TOOL_DEFS)
        second = await llm.complete(TOOL_TURN[:4], session_key=session, tools=TOOL_DEFS)
    finally:
        await llm.aclose()
    assert first.usage is not None and second.usage is not None
    least = first.usage.prompt_tokens // BLOCK * BLOCK
    print(f"\ntool step on the real engine: 2nd request cached {second.usage.cached_tokens} "
          f"of {second.usage.prompt_tokens} prompt tokens (1st request: "
          f"{first.usage.prompt_tokens}, whole blocks {least})")  # fmt: skip
    assert (second.usage.cached_tokens or 0) >= least


async def test_prewarm_makes_turn_one_a_cache_hit_on_the_real_engine(
    engine: EmbeddedEngine,
) -> None:
    """Turn 1 of a session whose stable prefix was prewarmed, against one whose
    prefix the engine has never seen: what was cached, and the time to first token."""
    llm = OpenAICompatibleLLM(
        [engine.url], model=engine.model_name, max_tokens=4, temperature=0.0,
        first_token_timeout_s=300, read_timeout_s=120,
    )  # fmt: skip
    figures = {}
    try:
        for warm in (False, True):
            # A prefix of its own each time (never sent before), as long as a real one.
            system = f"[{uuid.uuid4().hex}] " + SYSTEM_PROMPT
            prefix: list[ChatMessage] = [{"role": "system", "content": system}]
            if warm:
                await llm.warm(engine.url, prefix, tools=TOOL_DEFS)
            messages: list[ChatMessage] = [*prefix, {"role": "user", "content": "Hello!"}]
            events = llm.stream_chat(messages, session_key=f"pw-{warm}", tools=TOOL_DEFS)
            _, done = await collect(events)
            assert done is not None and done.usage is not None
            figures[warm] = (done.usage.cached_tokens or 0, done.usage.prompt_tokens, done.ttft_ms)
    finally:
        await llm.aclose()
    (cold_cached, prompt, cold_ttft), (warm_cached, warm_prompt, warm_ttft) = (
        figures[False], figures[True],
    )  # fmt: skip
    print(f"\nturn 1 on the real engine: without prewarm cached {cold_cached}/{prompt} "
          f"tokens, TTFT {cold_ttft:.0f} ms; with prewarm cached {warm_cached}/{warm_prompt}, "
          f"TTFT {warm_ttft:.0f} ms")  # fmt: skip
    assert cold_cached < BLOCK * 2  # only what other requests share (the chat markup)
    assert warm_cached >= (warm_prompt - 40) // BLOCK * BLOCK - BLOCK
