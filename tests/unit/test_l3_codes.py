"""Turn codes (memory/l3_codes.py, two bits a dimension) and the turn-level ranking they drive
(memory/l3_focus.py)."""

from __future__ import annotations

import numpy as np

from memory import l3_codes
from memory.l3_focus import Candidate, rank


def _unit(v: np.ndarray) -> list[float]:
    return [float(x) for x in v / np.linalg.norm(v)]


def test_codes_keep_each_vectors_direction_in_two_bits_a_dimension() -> None:
    rng = np.random.default_rng(7)
    vectors = [_unit(rng.standard_normal(384)) for _ in range(3)]
    codes = l3_codes.encode(vectors)
    # 96 bytes a vector, base64.
    assert len(codes) == 4 * ((3 * 96 + 2) // 3)
    got = l3_codes.scores(vectors[1], codes, 384)
    # Each dimension as one of four levels of the vector's mean absolute value.
    m = np.asarray(vectors)
    levels = np.clip(np.floor(m / np.abs(m).mean(axis=1, keepdims=True)), -2, 1) + 0.5
    expected = (levels @ m[1]) / np.linalg.norm(levels, axis=1)
    assert np.allclose(got, expected, atol=1e-5)
    # A cosine close to the float one: a vector against its own code, and the
    # order of the others.
    floats = m @ m[1]
    assert got[1] > 0.9 and int(np.argmax(got)) == 1
    assert list(np.argsort(got)) == list(np.argsort(floats))
    # A dimension that is not a multiple of four is padded, not lost.
    odd = [[0.5, -0.2, 0.1, -0.9, 0.3]]
    assert len(l3_codes.scores(odd[0], l3_codes.encode(odd), 5)) == 1


def test_a_malformed_code_scores_nothing() -> None:
    codes = l3_codes.encode([[1.0] * 384])
    assert len(l3_codes.scores([0.1] * 384, codes, 384)) == 1
    assert l3_codes.scores([0.1] * 384, "", 384) == []
    assert l3_codes.scores([0.1] * 384, "not base64!", 384) == []
    assert l3_codes.scores([0.1] * 384, codes[:-8], 384) == []  # not whole codes
    assert l3_codes.scores([0.1] * 383, codes, 384) == []  # a query of another size
    assert l3_codes.encode([]) == ""


def test_a_turn_matched_by_meaning_beats_a_near_miss_and_comes_alone() -> None:
    # b1's chunk ranks first (a near miss on the same subject); b2's turn 7 shares
    # no word with the question either, but its code is the nearest to the query.
    near = ((1, "[turn 1] user: my colleague's daughter plays the violin\n"),)
    chunk = (
        (6, "[turn 6] user: the weather is grey\n"),
        (7, "[turn 7] user: I started cello lessons on Tuesdays\n"),
        (8, "[turn 8] user: what goes with lentils?\n"),
    )
    cands = [
        Candidate("b1", 0, False, near, "", dense=(0.20,)),
        Candidate("b2", 1, False, chunk, "", dense=(0.05, 0.60, 0.10)),
    ]
    [best, second] = rank("Which stringed instrument am I learning?", cands, 2)
    assert best.batch_id == "b2"
    assert best.turns == [chunk[1]]  # the turn that matched, not its chunk
    assert second.batch_id == "b1"
    # Without codes the same pieces rank by chunk: the near miss comes first and
    # the batch matched by meaning brings its whole chunk.
    plain = [Candidate(c.batch_id, c.rank, False, c.turns, "") for c in cands]
    [first, other] = rank("Which stringed instrument am I learning?", plain, 2)
    assert first.batch_id == "b1"
    assert other.turns == list(chunk)


def test_a_rare_word_still_lifts_its_turn_over_a_nearer_vector() -> None:
    # The codes put turn 4 first, but only turn 5 holds the code asked about.
    chunk = (
        (4, "[turn 4] user: my parcel comes by train\n"),
        (5, "[turn 5] user: the tracking code is QX7731ZB\n"),
    )
    other = ((2, "[turn 2] user: a parcel for my neighbour\n"),)
    cands = [
        Candidate("b1", 0, False, other, "", dense=(0.50,)),
        Candidate("b2", 1, False, chunk, "", dense=(0.45, 0.30)),
    ]
    [best] = rank("which parcel has code QX7731ZB?", cands, 1)
    assert (best.batch_id, best.turns) == ("b2", [chunk[1]])


def test_a_summary_ranks_by_its_own_code() -> None:
    cands = [
        Candidate("b1", 0, False, ((1, "[turn 1] user: hello\n"),), "", dense=(0.1,)),
        Candidate("b2", 1, True, (), "They keep a sailboat in Brest.", dense=(0.7,)),
        Candidate("b2", 2, False, ((3, "[turn 3] user: hi\n"),), "", dense=(0.0,)),
    ]
    [best, _] = rank("where is the boat moored?", cands, 2)
    assert best.batch_id == "b2" and best.summary == "They keep a sailboat in Brest."
