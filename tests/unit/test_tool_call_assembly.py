"""ToolCallAssembler and ToolCall, on fragment sequences written as OpenAI and vLLM stream them."""

from __future__ import annotations

from typing import Any

import pytest

from infra.llm import (
    InvalidToolArguments,
    LLMResult,
    ToolCall,
    ToolCallAssembler,
    assistant_message,
    named_tool_choice,
    tool_name,
)


def assemble(*chunks: list[dict[str, Any]]) -> tuple[ToolCall, ...]:
    assembler = ToolCallAssembler()
    for fragments in chunks:
        assembler.add(fragments)
    return assembler.calls()


def args(index: int, text: str) -> list[dict[str, Any]]:
    return [{"index": index, "function": {"arguments": text}}]


def test_fragmented_arguments_join_into_one_call() -> None:
    calls = assemble(
        [{"index": 0, "id": "call_abc", "type": "function",
          "function": {"name": "get_weather", "arguments": ""}}],
        args(0, '{"ci'),
        args(0, 'ty": "Ly'),
        args(0, 'on", "days'),
        args(0, '": 3}'),
    )  # fmt: skip
    assert calls == (ToolCall("call_abc", "get_weather", '{"city": "Lyon", "days": 3}'),)
    assert calls[0].parsed_arguments() == {"city": "Lyon", "days": 3}


def test_two_interleaved_calls_come_out_in_index_order() -> None:
    calls = assemble(
        [{"index": 1, "id": "call_b", "type": "function", "function": {"name": "lookup"}}],
        [{"index": 0, "id": "call_a", "type": "function", "function": {"name": "search"}}],
        args(0, '{"q": '),
        args(1, '{"key"'),
        args(0, '"tea"}'),
        args(1, ': "k1"}'),
    )
    assert [c.id for c in calls] == ["call_a", "call_b"]
    assert calls[0] == ToolCall("call_a", "search", '{"q": "tea"}')
    assert calls[1] == ToolCall("call_b", "lookup", '{"key": "k1"}')


def test_several_fragments_in_one_chunk() -> None:
    calls = assemble(
        [
            {"index": 0, "id": "a", "function": {"name": "f", "arguments": "{}"}},
            {"index": 1, "id": "b", "function": {"name": "g", "arguments": '{"x"'}},
        ],
        args(1, ": 1}"),
    )
    assert calls == (ToolCall("a", "f", "{}"), ToolCall("b", "g", '{"x": 1}'))


def test_missing_id_gets_a_stable_one_per_index() -> None:
    chunks = (
        [{"index": 0, "function": {"name": "f", "arguments": "{}"}}],
        [{"index": 1, "function": {"name": "g", "arguments": "{}"}}],
    )
    calls = assemble(*chunks)
    assert [c.id for c in calls] == ["call_0", "call_1"]
    assert assemble(*chunks) == calls  # the same reply, retried, gets the same ids


def test_only_the_first_id_of_an_index_counts() -> None:
    calls = assemble(
        [{"index": 0, "id": "first", "function": {"name": "f"}}],
        [{"index": 0, "id": "", "function": {"arguments": "{}"}}],
        [{"index": 0, "id": "other", "function": {"arguments": ""}}],
    )
    assert calls[0].id == "first"


def test_name_split_across_fragments() -> None:
    calls = assemble(
        [{"index": 0, "id": "c", "function": {"name": "get_"}}],
        [{"index": 0, "function": {"name": "weather", "arguments": "{}"}}],
    )
    assert calls[0].name == "get_weather"


def test_fragments_without_index_continue_the_previous_call() -> None:
    calls = assemble(
        [{"id": "c", "function": {"name": "f", "arguments": '{"a"'}}],
        [{"function": {"arguments": ": 1}"}}],
    )
    assert calls == (ToolCall("c", "f", '{"a": 1}'),)


def test_arguments_sent_as_an_object_become_json_text() -> None:
    calls = assemble([{"index": 0, "id": "c", "function": {"name": "f", "arguments": {"a": 1}}}])
    assert calls[0].parsed_arguments() == {"a": 1}


def test_content_and_tool_calls_in_the_same_stream() -> None:
    # The deltas of one reply: text first, then a delta with both, then calls.
    deltas: list[dict[str, Any]] = [
        {"role": "assistant", "content": ""},
        {"content": "Let me "},
        {"content": "check.", "tool_calls": [{"index": 0, "id": "c0", "type": "function",
                                             "function": {"name": "search", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"q": "tea"}'}}]},
        {"content": None, "tool_calls": None},
    ]  # fmt: skip
    assembler = ToolCallAssembler()
    text = ""
    for delta in deltas:
        text += delta.get("content") or ""
        if delta.get("tool_calls"):
            assembler.add(delta["tool_calls"])
    assert text == "Let me check."
    assert assembler.calls() == (ToolCall("c0", "search", '{"q": "tea"}'),)


def test_no_fragments_no_calls() -> None:
    assert ToolCallAssembler().calls() == ()
    assert assemble([], []) == ()


@pytest.mark.parametrize(
    ("fragments", "message"),
    [
        ("not a list", "not a list"),
        (["a string"], "not an object"),
        ([{"index": -1}], "non-negative"),
        ([{"index": "0"}], "non-negative"),
        ([{"index": 0, "function": "f"}], "not an object"),
    ],
)
def test_malformed_fragments_are_value_errors(fragments: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ToolCallAssembler().add(fragments)


def test_a_call_without_a_name_is_a_value_error() -> None:
    assembler = ToolCallAssembler()
    assembler.add(args(0, "{}"))
    with pytest.raises(ValueError, match="tool call 0 has no function name"):
        assembler.calls()


# --- ToolCall and messages ------------------------------------------------------------


def test_tool_call_message_dict_is_openai_format() -> None:
    call = ToolCall("call_1", "search", '{"q": "x"}')
    assert call.to_message_dict() == {
        "id": "call_1",
        "type": "function",
        "function": {"name": "search", "arguments": '{"q": "x"}'},
    }


def test_parsed_arguments_empty_is_an_empty_object() -> None:
    assert ToolCall("c", "f", "").parsed_arguments() == {}
    assert ToolCall("c", "f", "  ").parsed_arguments() == {}


def test_invalid_json_arguments_raise_a_clear_error() -> None:
    call = ToolCall("call_7", "search", '{"q": "unterminated')
    with pytest.raises(InvalidToolArguments) as info:
        call.parsed_arguments()
    text = str(info.value)
    assert "call_7" in text and "search" in text and "not valid JSON" in text
    assert '{"q": "unterminated' in text
    assert info.value.call is call
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("arguments", "kind"), [("[1, 2]", "an array"), ('"x"', "a string"), ("3", "a number")]
)
def test_arguments_that_are_not_an_object_raise(arguments: str, kind: str) -> None:
    with pytest.raises(InvalidToolArguments, match=f"are {kind}, not an object"):
        ToolCall("c", "f", arguments).parsed_arguments()


def test_assistant_message_with_and_without_calls() -> None:
    call = ToolCall("c", "f", "{}")
    assert assistant_message("hi") == {"role": "assistant", "content": "hi"}
    assert assistant_message("", [call]) == {
        "role": "assistant",
        "content": None,
        "tool_calls": [call.to_message_dict()],
    }
    result = LLMResult("Checking.", (call,), None, "tool_calls")
    assert result.to_message() == {
        "role": "assistant",
        "content": "Checking.",
        "tool_calls": [call.to_message_dict()],
    }


def test_named_tool_choice_and_tool_name() -> None:
    assert named_tool_choice("search") == {"type": "function", "function": {"name": "search"}}
    assert tool_name({"type": "function", "function": {"name": "search"}}) == "search"
    assert tool_name({"type": "function"}) is None
