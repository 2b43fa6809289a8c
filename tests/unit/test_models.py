from __future__ import annotations

import pytest

from memory.models import SessionState, Turn


def test_turn_round_trips_with_its_token_count() -> None:
    t = Turn.of_text(
        index=3,
        turn_id="abc",
        user="hi",
        assistant="hello",
        status="interrupted",
        memories="<memory>x</memory>",
        created_at=1.5,
        usage={"prompt_tokens": 9},
        n_tokens=17,
    )
    back = Turn.decode(t.encode())
    assert back == t
    assert back.n_tokens == 17


def test_unknown_schema_versions_are_refused() -> None:
    with pytest.raises(ValueError, match="schema"):
        Turn.decode(b'{"v": 99}')
    with pytest.raises(ValueError, match="schema"):
        SessionState.from_meta("t", "s", {"schema": "99"})


def test_meta_round_trip() -> None:
    s = SessionState(
        tenant="t",
        session_id="s",
        user_id="u",
        version=4,
        turn_count=7,
        archived_upto=5,
        context_start=3,
        context_summary="cs",
        summary="rs",
        summary_upto=5,
        prefix_version="p",
        log_base=3,
        checkpoint_id="c",
        created_at=1.0,
        updated_at=2.0,
    )
    back = SessionState.from_meta("t", "s", s.meta_fields())
    assert back.meta_fields() == s.meta_fields()
    assert back.unarchived == 2
