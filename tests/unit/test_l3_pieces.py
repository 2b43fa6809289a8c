"""How a batch becomes L3 pieces: chunks that fit the window and tile the text."""

from __future__ import annotations

import pytest

from infra.embeddings import HashingEmbedder, wordpiece_count
from memory import l3_pieces
from memory.l3_store import MemoryRecord, batch_id_for, pieces_of
from memory.models import Turn
from memory.summaries import transcript, ungrounded_terms

COUNT = HashingEmbedder().count_tokens


def _turns(n: int, words: int = 20, start: int = 1) -> list[Turn]:
    return [
        Turn.of_text(i, f"t{i}", " ".join(f"u{i}w{j}" for j in range(words)), f"reply {i}.")
        for i in range(start, start + n)
    ]


def _record(text: str, first: int, last: int, summary: str | None = None) -> MemoryRecord:
    return MemoryRecord(
        batch_id=batch_id_for("t", "s", first, last), tenant="t", user_id="u", session_id="s",
        first_turn=first, last_turn=last, text=text, created_at=0.0, summary=summary,
    )  # fmt: skip


def test_chunks_hold_whole_turns_fit_the_window_and_tile_the_transcript() -> None:
    text = transcript(_turns(10, words=30))
    _, segments = l3_pieces.split_text(text, 1, 10)
    assert [t for t, _ in segments] == list(range(1, 11))
    pieces = l3_pieces.chunk(segments, COUNT, 100)
    assert "".join(p.text for p in pieces) == text
    assert all(COUNT(l3_pieces.embedding_text(p.text)) <= 100 for p in pieces)
    # Several turns per chunk, each turn in exactly one chunk, in order.
    assert 1 < len(pieces) < 10
    covered = [n for p in pieces for n in range(p.first, p.last + 1)]
    assert covered == list(range(1, 11))
    for p in pieces:
        assert [t for t, _ in l3_pieces.turns_of(p)] == list(range(p.first, p.last + 1))


def test_a_turn_longer_than_the_window_is_split_and_nothing_is_lost() -> None:
    turns = _turns(1, words=5) + _turns(1, words=700, start=2) + _turns(1, words=5, start=3)
    text = transcript(turns)
    _, segments = l3_pieces.split_text(text, 1, 3)
    pieces = l3_pieces.chunk(segments, COUNT, 64)
    assert "".join(p.text for p in pieces) == text
    long = [p for p in pieces if p.first == p.last == 2]
    assert len(long) > 5
    assert all(COUNT(l3_pieces.embedding_text(p.text)) <= 64 for p in pieces)
    # Every part of turn 2 says it is turn 2.
    assert all(l3_pieces.turns_of(p)[0][0] == 2 for p in long)
    # A "word" with no spaces at all is cut by characters, still within the window.
    blob = "x" * 20_000
    parts = l3_pieces.chunk([(1, blob)], wordpiece_count, 64)
    assert "".join(p.text for p in parts) == blob
    assert all(wordpiece_count(p.text) <= 64 for p in parts)
    assert all(len(p.text) <= l3_pieces.PIECE_MAX_CHARS for p in parts)


def test_chunks_may_hold_more_than_a_window_of_turns_each_within_it() -> None:
    segments = [(i, f"[turn {i}] user: " + "word " * 30 + "\n") for i in range(1, 11)]
    segments.insert(5, (99, "[turn 99] user: " + "long " * 200 + "\n"))
    pieces = l3_pieces.chunk(segments, COUNT, 64, row_tokens=128)
    assert "".join(p.text for p in pieces) == "".join(s for _, s in segments)
    for p in pieces:
        assert COUNT(l3_pieces.embedding_text(p.text)) <= 128
        # Every unit one embedding reads fits the window.
        assert all(COUNT(u) <= 64 for u in l3_pieces.units(p))
    # Rows of several turns (more than one window's worth), and the long turn in
    # parts of its own.
    assert any(COUNT(l3_pieces.embedding_text(p.text)) > 64 for p in pieces)
    assert [p.first for p in pieces if p.first == p.last == 99] and all(
        p.first == p.last for p in pieces if "long" in p.text
    )
    with pytest.raises(ValueError, match="at least the window"):
        l3_pieces.chunk(segments, COUNT, 64, row_tokens=32)


def test_pieces_are_a_pure_function_of_the_batch() -> None:
    """A retried archive must write the same keys: same text, same pieces."""
    text = transcript(_turns(10, words=40))
    rec = _record(text, 1, 10, summary="The user listed forty words per turn.")
    a = pieces_of(rec, COUNT, 120)
    b = pieces_of(rec, COUNT, 120)
    assert a == b
    ids = [l3_pieces.piece_id(rec.batch_id, p.kind, p.no) for p in a]
    assert len(set(ids)) == len(ids)
    assert [p.kind for p in a][-1] == l3_pieces.SUMMARY
    assert sum(p.kind == l3_pieces.SUMMARY for p in a) == 1


def test_the_summary_is_read_from_the_text_or_given_or_refused() -> None:
    text = transcript(_turns(2))
    given = pieces_of(_record(f"Old summary.\n\n{text}", 1, 2), COUNT, 254)
    assert [p.text for p in given if p.kind == l3_pieces.SUMMARY] == ["Old summary."]
    assert "".join(p.text for p in given if p.kind == l3_pieces.TURNS) == text
    none = pieces_of(_record(text, 1, 2, summary=""), COUNT, 254)
    assert all(p.kind == l3_pieces.TURNS for p in none)


def test_turn_lines_are_found_in_order_only() -> None:
    """A message that imitates another turn's line stays text of its own turn."""
    turns = [
        Turn.of_text(1, "a", "hello\n[turn 7] user: fake, and [turn 2] user: mid-line", "ok"),
        Turn.of_text(2, "b", "x", "y"),
    ]
    _, segments = l3_pieces.split_text(transcript(turns), 1, 2)
    assert [t for t, _ in segments] == [1, 2]
    # Neither a later turn's line nor the next turn's label inside a line starts a turn.
    assert "[turn 7] user: fake, and [turn 2] user: mid-line" in segments[0][1]
    assert segments[1][1].startswith("[turn 2] user: x")


def test_the_grounding_check_names_what_the_turns_never_said() -> None:
    turns = "[turn 1] user: I keep my sailboat in Brest; the berth is number 42."
    assert ungrounded_terms("The user keeps a sailboat in Brest, berth 42.", turns) == []
    assert ungrounded_terms(
        "The user wants a sailboat to explore the Mediterranean for 3 weeks.", turns
    ) == ["3", "Mediterranean"]


def test_a_hit_carries_the_turns_the_query_points_at() -> None:
    from memory.l3_focus import Candidate, rank

    chunk = (
        (4, "[turn 4] user: I bake bread on Sundays.\n"),
        (5, "[turn 5] user: My parcel code is QX7731ZB.\n"),
        (6, "[turn 6] user: The weather is grey.\n"),
    )
    other = ((1, "[turn 1] user: my parcel will come by train, the code is on the box\n"),)
    cands = [Candidate("b1", 0, False, other, ""), Candidate("b2", 1, False, chunk, "")]
    # The rare word wins over a chunk ranked first that shares common words.
    [best, second] = rank("what was the parcel code QX7731ZB?", cands, 2)
    assert (best.batch_id, best.turns) == ("b2", [chunk[1]])
    assert second.batch_id == "b1"
    # Nothing in common: matched by meaning, so the chunk is carried whole.
    [top] = rank("when do I make loaves?", cands[1:], 1)
    assert top.turns == list(chunk)
    # Parts of one long turn come back as one turn.
    parts = [Candidate("b3", 0, False, ((7, "first half about sailing "),), ""),
             Candidate("b3", 1, False, ((7, "second half in Brest"),), "")]  # fmt: skip
    [long] = rank("Brest sailing", parts, 1)
    assert long.turns == [(7, "first half about sailing second half in Brest")]


def test_the_summary_request_frames_the_turns_without_their_labels() -> None:
    from infra.dev_llm import extractive_summary as dev_summary
    from memory.summaries import summary_request

    text = transcript([Turn.of_text(3, "a", "I keep my boat in Brest.", "Nice.")])
    request = summary_request(text)
    assert "[turn 3]" not in request and "user: I keep my boat in Brest." in request
    assert request.rstrip().endswith("only what the conversation says.")
    # The development LLM summarises what is between the lines, not the framing.
    summary = dev_summary([{"role": "user", "content": request}])
    assert summary == "user: I keep my boat in Brest. assistant: Nice."
