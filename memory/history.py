"""A session's whole history, a page at a time: from L2 while its log still holds the
turns, then from the transcripts of the archived batches in L3.

Turns ``log_base..turn_count`` are in the L2 log (exactly as committed); older ones
were trimmed after archiving (``l2_scripts.ADVANCE``) and survive only as the
transcript of their batch in L3 (its chunks, reassembled by ``L3Store``), read
back by ``summaries.parse_transcript``. Such a turn is a reconstruction: roles,
texts and tool calls as the transcript wrote them (tool results cut to 300
characters, no tool-call ids). Batches of the L3 schema before chunks had their
text cut at 30,000 characters: a turn that cut reached is ``complete: false``.
A turn no stored batch holds (forgotten, or its batch missing) is listed as
``source: "missing"`` with no messages, so a page always has every index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from infra.errors import InvalidInput
from memory.context import MEMORY_BLOCK_START
from memory.l2_store import L2Error, L2Store
from memory.l3_store import L3Store, MemoryRecord
from memory.models import Message, SessionState, Turn
from memory.skills import LOAD_TOOL, framed_skills
from memory.summaries import parse_transcript

MAX_PAGE = 100
DEFAULT_PAGE = 20
# ADVANCE may trim the log between the meta read and the log read: read again.
_READ_ATTEMPTS = 3


@dataclass(frozen=True)
class HistoryPage:
    """Turns ``first..last`` of the session, newest first; ``next_before`` is the
    ``before`` of the next (older) page, None at turn 1."""

    turns: list[dict[str, Any]]
    next_before: int | None
    turn_count: int
    archived_upto: int


async def read_history(
    l2: L2Store,
    l3: L3Store,
    tenant: str,
    session_id: str,
    *,
    before: int | None = None,
    limit: int = DEFAULT_PAGE,
) -> HistoryPage | None:
    """The ``limit`` turns before turn ``before`` (all the newest when None), newest
    first; None if the session does not exist. A ``before`` past the last turn
    reads from the last turn."""
    if isinstance(limit, bool) or not 1 <= limit <= MAX_PAGE:
        raise InvalidInput(f"limit must be in 1..{MAX_PAGE}")
    if before is not None and before < 1:
        raise InvalidInput("before must be at least 1")
    for _ in range(_READ_ATTEMPTS):
        meta = await l2.read_meta(tenant, session_id)
        if meta is None:
            return None
        top = meta.turn_count if before is None else min(before - 1, meta.turn_count)
        if top < 1:
            return HistoryPage([], None, meta.turn_count, meta.archived_upto)
        low = max(1, top - limit + 1)
        from_l2 = await _from_l2(l2, meta, max(low, meta.log_base), top)
        if from_l2 is None:
            continue
        page = from_l2
        if low < meta.log_base:
            page += await _from_l3(l3, tenant, session_id, low, min(top, meta.log_base - 1))
        page.sort(key=lambda t: t["turn"], reverse=True)
        return HistoryPage(page, low if low > 1 else None, meta.turn_count, meta.archived_upto)
    raise L2Error("the session's log kept moving while it was read; retry")


async def _from_l2(
    l2: L2Store, meta: SessionState, first: int, last: int
) -> list[dict[str, Any]] | None:
    """Turns ``first..last`` from the log; None if it was trimmed meanwhile."""
    if first > last:
        return []
    turns = await l2.read_turns(meta.tenant, meta.session_id, first, last, meta.log_base)
    if [t.index for t in turns] != list(range(first, last + 1)):
        return None
    return [_l2_turn(t, meta.archived_upto) for t in turns]


def _l2_turn(t: Turn, archived_upto: int) -> dict[str, Any]:
    return {
        "turn": t.index,
        "source": "l2",
        "turn_id": t.turn_id,
        # As stored: user message, assistant messages (with any tool_calls) and
        # tool results, in OpenAI format.
        "messages": t.messages,
        "status": t.status,
        "created_at": t.created_at,
        "archived": t.index <= archived_upto,
        "complete": True,
        # As committed: prompt / cached / expected-cacheable tokens, the prefix
        # break and its reason, the tool calls (id, name, ok), finish reason.
        "usage": t.usage,
        "skills": skills_used(t),
        "memory_hits": t.memory_hits or [],
    }


def skills_used(t: Turn) -> list[dict[str, str]]:
    """The skills whose bodies the turn added to the log: ``detected`` (joined to
    its user message) or loaded by a ``tool`` call (a skills__load result)."""
    # The detected bodies come before the retrieved memories (whose text, the
    # users' own, is not read for frames).
    detected = (t.memories or "").split(MEMORY_BLOCK_START, 1)[0]
    used = [{"name": n, "version": v, "how": "detected"} for n, v in framed_skills(detected)]
    loads = {
        c.get("id")
        for m in t.messages if m.get("role") == "assistant"
        for c in m.get("tool_calls") or [] if (c.get("function") or {}).get("name") == LOAD_TOOL
    }  # fmt: skip
    for m in t.messages:
        if m.get("role") == "tool" and m.get("tool_call_id") in loads:
            content = str(m.get("content") or "")
            used += [{"name": n, "version": v, "how": "tool"}
                     for n, v in framed_skills(content[: content.find(">") + 1])]  # fmt: skip
    return used


async def _from_l3(
    l3: L3Store, tenant: str, session_id: str, first: int, last: int
) -> list[dict[str, Any]]:
    """Turns ``first..last`` rebuilt from the batches that hold them. Where two
    batches hold one turn (a batch archived again with another range), a complete
    copy wins, then the newer batch."""
    records = await l3.batches_overlapping(tenant, session_id, first, last)
    found: dict[int, tuple[bool, float, MemoryRecord, list[Message]]] = {}
    for rec in records:
        parsed = parse_transcript(rec.text, rec.first_turn, rec.last_turn)
        newest = max(parsed, default=0)
        cut = rec.cut
        for n in range(max(first, rec.first_turn), min(last, rec.last_turn) + 1):
            # A turn is whole if a later turn's lines follow it, or if it ends an
            # uncut text; one the cut left out has no messages.
            messages = parsed.get(n, [])
            complete = n in parsed and (n < newest or not cut)
            prior = found.get(n)
            if prior is None or (complete, rec.created_at) > (prior[0], prior[1]):
                found[n] = (complete, rec.created_at, rec, messages)
    out: list[dict[str, Any]] = []
    for n in range(first, last + 1):
        if n not in found:
            out.append(
                {"turn": n, "source": "missing", "batch_id": None, "messages": [],
                 "archived": True, "complete": False}
            )  # fmt: skip
            continue
        complete, _, rec, messages = found[n]
        out.append(
            {"turn": n, "source": "l3", "batch_id": rec.batch_id, "messages": messages,
             "archived": True, "complete": complete}
        )  # fmt: skip
    return out
