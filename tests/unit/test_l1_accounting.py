"""What L1 holds of a session, and what it counts against ``TIERMEM_L1_MAX_BYTES``.

- No second copy of the prompt: the session keeps a mark (length, digest) of the
  previous prompt + reply, never its text.
- ``SessionState.approx_bytes`` is what the session's objects really take, as
  ``tracemalloc`` measures it, for short and long sessions, text turns and tool
  turns, built in this process or decoded from L2.
"""

from __future__ import annotations

import gc
import sys
import time
import tracemalloc
import uuid
from typing import Any

import pytest

from infra.tokenizer import default_tokenizer
from memory.context import ContextBuilder, StablePrefix, extends, rendered_mark
from memory.l1_pool import ENTRY_BYTES, TURN_SIZE_BYTES, L1Pool
from memory.models import SessionState, Turn
from tests.unit.test_context import EXCHANGES, RULES, SKILLS, SYSTEM, TOOLS, new_state, play


def _strings(root: object) -> list[str]:
    """Every string reachable from ``root`` through containers and objects."""
    seen: set[int] = set()
    out: list[str] = []
    todo = [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, str):
            out.append(obj)
        elif not isinstance(obj, bytes | int | float | type):
            todo.extend(gc.get_referents(obj))
    return out


def test_the_session_holds_no_copy_of_the_prompt() -> None:
    prefix = StablePrefix(SYSTEM, tuple(TOOLS), SKILLS, RULES)
    builder = ContextBuilder(prefix, default_tokenizer(), budget_tokens=100_000)
    state = new_state()
    plans = play(builder, state, EXCHANGES)
    sent = plans[-1].prompt_text + EXCHANGES[-1][1]
    assert state.last_rendered == rendered_mark(sent)
    strings = _strings(state)
    assert any(EXCHANGES[-1][1] in s for s in strings)  # the walk does reach the turns
    # Neither the stable prefix nor anything the chat template wrote around the
    # messages is held: the session keeps its turns' own texts and a mark.
    for s in strings:
        assert SYSTEM not in s
        assert "<|im_start|>" not in s and "<|im_end|>" not in s
        assert len(s) < len(sent) // 4
    assert sum(sys.getsizeof(x) for x in state.last_rendered) < 200
    # And the mark still proves the next prompt extends what was sent.
    nxt = builder.plan(state, "One more thing.", None)
    assert extends(nxt.prompt_text, state.last_rendered)
    assert nxt.account.reason is None and nxt.account.first_diff_token is None


def _tool_messages(i: int, t: int) -> list[dict[str, Any]]:
    fn = {"name": "lookup_order", "arguments": f'{{"order_id": "B-{i}{t}"}}'}
    call = {"id": f"call_{i}_{t}", "type": "function", "function": fn}
    return [
        {"role": "user", "content": f"Where is my order B-{i}{t}? It was due on Monday."},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": f"call_{i}_{t}", "content": f'{{"status": "late {i}"}}'},
        {"role": "assistant", "content": f"Order B-{i}{t} is late; it should come Thursday."},
    ]


def _session(i: int, turns: int, words: int, tools: bool, memories: bool) -> SessionState:
    now = time.time()
    s = SessionState(
        tenant="acme", session_id=f"s-{uuid.uuid4().hex}", user_id=f"user-{i}",
        version=turns, turn_count=turns, prefix_version=f"{i:016x}",
        checkpoint_id=uuid.uuid4().hex, created_at=now, updated_at=now,
        context_summary=f"Earlier: the user {i} asked about orders. " * 5,
    )  # fmt: skip
    for t in range(1, turns + 1):
        reply = " ".join(f"word{(i * t + k) % 97}" for k in range(words))
        msgs = _tool_messages(i, t) if tools else [
            {"role": "user", "content": f"Turn {t}: please help me plan trip {i}."},
            {"role": "assistant", "content": reply},
        ]  # fmt: skip
        usage = {"prompt_tokens": 1000 + 100 * t + i, "completion_tokens": words + i,
                 "cached_tokens": 900 + 100 * t, "ttft_ms": 12.5 + i, "prefix_break": None,
                 "expected_cacheable_tokens": 896 + 16 * t, "archived_batch": None}  # fmt: skip
        hit = {"batch_id": uuid.uuid4().hex, "session_id": "old", "first_turn": 1,
               "last_turn": 10, "text": f"note {i} " * 20, "score": 0.5}  # fmt: skip
        block = f"<memory>note {i} {t}</memory>" * 3 if memories else None
        turn = Turn(index=t, turn_id=uuid.uuid4().hex, messages=msgs, memories=block,
                    created_at=now, usage=usage, n_tokens=1200 + t,
                    memory_hits=[hit] if memories else None)  # fmt: skip
        s.turns.append(turn)
    s.last_rendered = rendered_mark(f"prompt {i} " * 300)
    return s


def _decoded(s: SessionState) -> SessionState:
    """The session as an L1 miss loads it from L2."""
    fresh = SessionState.from_meta(s.tenant, s.session_id, s.meta_fields())
    fresh.turns = [Turn.decode(t.encode()) for t in s.turns]
    fresh.last_rendered = s.last_rendered
    return fresh


@pytest.mark.parametrize(
    ("turns", "words", "tools", "memories", "from_l2"),
    [
        (4, 40, False, False, False),  # bench/turn_overhead.py's sessions
        (4, 40, False, False, True),
        (30, 150, False, True, False),
        (30, 150, False, True, True),
        (12, 20, True, False, False),
        (12, 20, True, False, True),
    ],
)
def test_l1_counts_what_its_sessions_really_take(
    turns: int, words: int, tools: bool, memories: bool, from_l2: bool
) -> None:
    n = 100
    pool = L1Pool(max_sessions=10 * n, max_bytes=10**12, idle_evict_s=1e9)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(n):
            s = _session(i, turns, words, tools, memories)
            pool.put(_decoded(s) if from_l2 else s)
            del s
        gc.collect()
        measured = (tracemalloc.get_traced_memory()[0] - before) / n
    finally:
        tracemalloc.stop()
    estimate = pool.bytes / n
    # tracemalloc sees the sizes asked for; the estimate rounds each object up to
    # the allocator's 16-byte blocks, as RSS does.
    assert 0.85 <= estimate / measured <= 1.3, (estimate, measured)


def test_an_entry_counts_its_own_overhead_too() -> None:
    pool = L1Pool(max_sessions=10, max_bytes=10**9, idle_evict_s=1e9)
    s = _session(1, 2, 10, False, False)
    pool.put(s)
    assert pool.bytes == s.approx_bytes() + ENTRY_BYTES + 2 * TURN_SIZE_BYTES
    # A commit sizes only its new turn; the others keep their size.
    s.turns.append(_session(2, 1, 10, False, False).turns[0])
    s.turns[0].memories = "changed after it was sized " * 10  # (turns never change)
    pool.put(s)
    assert pool.bytes < s.approx_bytes() + ENTRY_BYTES + 3 * TURN_SIZE_BYTES
    pool.drop(s.tenant, s.session_id)
    assert pool.bytes == 0


def test_the_byte_bound_evicts_by_real_size() -> None:
    one = _session(0, 30, 150, False, True).approx_bytes() + ENTRY_BYTES + 30 * TURN_SIZE_BYTES
    pool = L1Pool(max_sessions=1000, max_bytes=10 * one, idle_evict_s=1e9)
    for i in range(25):
        pool.put(_session(i, 30, 150, False, True))
    assert pool.bytes <= 10 * one
    assert 8 <= len(pool) <= 10
