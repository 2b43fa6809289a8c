"""The prefix-cache simulator of the fake vLLM server, against hand-computed cases.

Most cases use 4-token blocks so the arithmetic is easy to follow; the
comments give it.
"""

from __future__ import annotations

import pytest

from tests.servers.fake_vllm import PrefixCacheSimulator, PromptTooLong


def seq(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def test_cold_prompt_hits_nothing() -> None:
    sim = PrefixCacheSimulator(block_size=4, num_blocks=64)
    result = sim.process(seq(0, 10))
    assert (result.prompt_tokens, result.cached_tokens) == (10, 0)


def test_hit_stops_at_exact_block_boundary() -> None:
    sim = PrefixCacheSimulator(block_size=4, num_blocks=64)
    a = seq(0, 12)  # 3 full blocks
    sim.process(a)
    # a + 5 new tokens = 17 tokens: blocks [0-3][4-7][8-11][100-103] + 1 token.
    # The first three are cached, the fourth is new: 12 tokens hit.
    assert sim.process(a + seq(100, 5)).cached_tokens == 12


def test_partial_last_block_is_never_cached() -> None:
    sim = PrefixCacheSimulator(block_size=4, num_blocks=64)
    sim.process(seq(0, 10))  # blocks [0-3][4-7] full, [8,9] partial
    # Same 10 tokens + 10 more: only the two full blocks can hit.
    assert sim.process(seq(0, 20)).cached_tokens == 8


def test_identical_prompt_recomputes_last_block() -> None:
    """vLLM caps the hit at prompt_len - 1 tokens, rounded down to whole blocks."""
    sim = PrefixCacheSimulator(block_size=4, num_blocks=64)
    a = seq(0, 12)
    sim.process(a)
    # All 3 blocks are cached, but at most 11 tokens may hit -> 2 blocks.
    assert sim.process(a).cached_tokens == 8
    # One more token: at most 12 may hit -> all 3 blocks.
    assert sim.process([*a, 99]).cached_tokens == 12


def test_changed_token_in_block_k_hits_only_blocks_before_k() -> None:
    sim = PrefixCacheSimulator(block_size=4, num_blocks=64)
    a = seq(0, 16)
    sim.process(a)
    changed = list(a)
    changed[9] = 999  # inside block 2 (tokens 8-11)
    assert sim.process([*changed, 50]).cached_tokens == 8
    changed_first = list(a)
    changed_first[0] = 999
    assert sim.process([*changed_first, 50]).cached_tokens == 0


def test_hashes_chain_so_a_block_elsewhere_does_not_hit() -> None:
    sim = PrefixCacheSimulator(block_size=4, num_blocks=64)
    sim.process([9, 9, 9, 9, 1, 2, 3, 4, 5])
    # [1,2,3,4] is cached, but as the second block of another prefix.
    assert sim.process([1, 2, 3, 4, 5, 6]).cached_tokens == 0


def test_output_blocks_are_reused_next_turn() -> None:
    sim = PrefixCacheSimulator(block_size=4, num_blocks=64)
    prompt = seq(0, 6)
    output = seq(50, 7)
    # Computed: 6 prompt + 6 output tokens (not the last sampled one) = 12 -> 3 blocks.
    sim.process(prompt, output)
    # Next prompt = prompt + output + 3 new = 16 tokens; at most 15 may hit -> 3 blocks.
    assert sim.process(prompt + output + seq(70, 3)).cached_tokens == 12


def test_last_sampled_token_is_not_cached() -> None:
    sim = PrefixCacheSimulator(block_size=4, num_blocks=64)
    prompt = seq(0, 6)
    output = seq(50, 6)
    # Computed: 6 + 5 = 11 tokens -> 2 full blocks; the block holding the
    # last output token (position 11) was never computed.
    sim.process(prompt, output)
    assert sim.process(prompt + output + seq(70, 5)).cached_tokens == 8


def test_least_recently_used_prefix_is_evicted() -> None:
    sim = PrefixCacheSimulator(block_size=4, num_blocks=4)
    a, b, c = seq(0, 8), seq(100, 8), seq(200, 8)
    sim.process(a)  # pool: a's 2 blocks + 2 never used
    sim.process(b)  # pool full: a, b
    sim.process(a)  # a used again (hits 1 block, reuses its cached second block)
    result = sim.process(c)  # needs 2 blocks: b is the least recently used
    assert result.evicted_blocks == 2
    assert sim.process([*a, 1]).cached_tokens == 8
    assert sim.process([*b, 1]).cached_tokens == 0


def test_tail_blocks_of_a_request_are_evicted_first() -> None:
    """Freed blocks return to the free queue in reverse, as vLLM frees them."""
    sim = PrefixCacheSimulator(block_size=4, num_blocks=4)
    x, y = seq(0, 8), seq(100, 8)
    sim.process(x)
    sim.process(y)  # free queue (next evicted first): x1, x0, y1, y0
    # x + 1 token: hits x0, x1 and needs one more block -> evicts y1, y's tail.
    assert sim.process([*x, 7]).cached_tokens == 8
    # y's head block survived.
    assert sim.process([*y, 7]).cached_tokens == 4


def test_counters_count_tokens_like_vllm() -> None:
    sim = PrefixCacheSimulator(block_size=4, num_blocks=64)
    sim.process(seq(0, 10))
    sim.process(seq(0, 13))
    assert sim.queries == 23
    assert sim.hits == 8


def test_peek_changes_nothing() -> None:
    sim = PrefixCacheSimulator(block_size=4, num_blocks=64)
    sim.process(seq(0, 8))
    assert sim.peek(seq(0, 9)) == 8
    assert sim.queries == 8
    assert sim.cached_blocks == 2


def test_request_larger_than_pool_is_refused() -> None:
    sim = PrefixCacheSimulator(block_size=4, num_blocks=2)
    with pytest.raises(PromptTooLong):
        sim.process(seq(0, 9))


def test_default_block_size_of_16() -> None:
    sim = PrefixCacheSimulator()
    prompt = seq(0, 40)  # 2 full blocks + 8
    output = seq(1000, 30)
    sim.process(prompt, output)  # computed 69 tokens -> 4 full blocks
    assert sim.process(prompt + output + seq(2000, 10)).cached_tokens == 64
    sim.reset()
    assert sim.peek(prompt) == 0
