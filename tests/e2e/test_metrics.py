"""/metrics carries what KEDA scales on and the prefix-cache accounting."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import AppServer, make_settings, post_turn
from tests.servers.fake_vllm import FakeVLLM


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_metrics_after_turns(tmp_path: Path, redis_url: str) -> None:
    # A first token that takes a while, as a real LLM's does: the agent phase
    # (which waits for the reply) must be the LLM's time, the plan only ours.
    llm = FakeVLLM(reply_tokens=10, first_token_delay_s=0.05).start()
    try:
        settings = make_settings(tmp_path, redis_url, llm_url=llm.base_url)
        sid = "m-" + uuid.uuid4().hex[:8]
        async with AppServer(settings) as srv, httpx.AsyncClient(timeout=30) as c:
            for i in range(3):
                await post_turn(c, srv.url, sid, f"a question number {i} for the cache")
            text = (await c.get(f"{srv.url}/metrics")).text
    finally:
        llm.stop()
    m = samples(text)
    assert m[("tiermem_turns_in_flight", ())] == 0
    assert m[("tiermem_turns_queued", ())] == 0
    assert m[("tiermem_active_sessions", ())] == 1
    assert m[("tiermem_turns_total", (("outcome", "complete"),))] == 3
    assert m[("tiermem_prompt_tokens_total", ())] > 0
    assert 0 < m[("tiermem_cached_tokens_total", ())] <= m[("tiermem_prompt_tokens_total", ())]
    assert m[("tiermem_expected_cacheable_tokens_total", ())] > 0
    assert m[("tiermem_ttft_seconds_count", ())] == 3
    assert m[("tiermem_l1_lookups_total", (("result", "hit"),))] == 2
    assert m[("tiermem_l1_lookups_total", (("result", "miss"),))] == 1
    assert m[("tiermem_phase_seconds_count", (("phase", "commit"),))] == 3
    # Every node of the graph is timed, and building the prompt on its own
    # (in prepare on a turn that retrieves nothing, else in agent).
    for phase in ("prepare", "agent", "commit", "plan"):
        assert m[("tiermem_phase_seconds_count", (("phase", phase),))] == 3
    plan_s = m[("tiermem_phase_seconds_sum", (("phase", "plan"),))]
    # Less than the LLM's three first tokens: the wait for the reply is not in it.
    assert 0 < plan_s < m[("tiermem_phase_seconds_sum", (("phase", "agent"),))]
    # Round trips to Redis: the first turn loads (a miss), commits; the others
    # only commit.
    assert m[("tiermem_l2_round_trips_total", ())] >= 4
