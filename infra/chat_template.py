"""The one chat template tiermem renders prompts with, for token accounting.

The service (prefix reuse, budgets) and the fake vLLM server (prefix-cache
simulation) both tokenise a prompt as ``render_chat(messages,
add_generation_prompt=True)``, so they count the same tokens. The format is
ChatML, the template of most open chat models served by vLLM.

Each message renders on its own, independent of what follows it: with an
append-only message log, ``render_chat(log, True) + reply`` is an exact text
prefix of ``render_chat(log + [assistant reply, next user message], True)``.
That is the property vLLM's prefix cache rewards.

The embedded engine serves with this very template (``chat_template.jinja`` beside
this module, passed as ``--chat-template``), so what tiermem counts is what vLLM
tokenises, tools and tool calls included (tests/engine checks it with vLLM's own
``/tokenize``). Another vLLM serves its model's template: set
``TIERMEM_TOKENIZER`` to its tokenizer and expect the tool rendering to differ.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
GENERATION_PROMPT = f"{IM_START}assistant\n"


def render_message(role: str, content: str) -> str:
    """One message: ``<|im_start|>{role}\\n{content}<|im_end|>\\n``."""
    return f"{IM_START}{role}\n{content}{IM_END}\n"


def call_arguments(arguments: Any) -> dict[str, Any]:
    """A call's arguments as a chat template gets them: vLLM parses the JSON text
    into an object, and anything else (broken JSON, an array, nothing) becomes
    ``{}`` (vllm/renderers/chat_utils.py, ``_postprocess_messages``)."""
    if isinstance(arguments, dict):
        return arguments
    if not isinstance(arguments, str) or not arguments:
        return {}
    try:
        parsed = json.loads(arguments)
    except json.JSONDecodeError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _content(m: Mapping[str, Any]) -> str:
    """A message's text, with an assistant's tool calls as Hermes-style
    ``<tool_call>`` blocks (the form Qwen and SmolLM templates give them)."""
    text = str(m.get("content") or "")
    for call in m.get("tool_calls") or ():
        fn = call.get("function") or {}
        body = json.dumps(
            {"name": fn.get("name"), "arguments": call_arguments(fn.get("arguments"))},
            ensure_ascii=False,
            separators=(",", ":"),
        )
        text += f"\n<tool_call>\n{body}\n</tool_call>"
    return text


def render_chat(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False) -> str:
    """The prompt text of ``messages`` (OpenAI-format mappings: ``role``,
    ``content``, and an assistant's ``tool_calls``).

    With ``add_generation_prompt`` the text ends with the opening of the
    assistant's reply, which is what a model continues from.
    """
    parts = [render_message(m["role"], _content(m)) for m in messages]
    if add_generation_prompt:
        parts.append(GENERATION_PROMPT)
    return "".join(parts)


def render_prompt(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
) -> str:
    """The prompt text of a chat request with tools: ``render_chat`` plus the tool definitions.

    ``render_chat`` renders messages, tool calls included; the definitions
    join the first system message here (a ``# Tools`` block, one JSON object
    a line, where Hermes-style templates put them), as a model's template
    would render the request's ``tools``. Without tools the text is exactly
    ``render_chat``'s. The fake vLLM counts prompts the same way.
    """
    if not tools:
        return render_chat(messages, add_generation_prompt=add_generation_prompt)
    block = "# Tools\n<tools>\n"
    block += "".join(_tool_line(tool) for tool in tools)
    block += "</tools>"
    rendered: list[Mapping[str, Any]] = list(messages)
    if rendered and rendered[0]["role"] == "system":
        system = rendered[0]
        rendered[0] = {**system, "content": f"{system.get('content') or ''}\n\n{block}"}
    else:
        rendered.insert(0, {"role": "system", "content": block})
    return render_chat(rendered, add_generation_prompt=add_generation_prompt)


def _tool_line(tool: Mapping[str, Any]) -> str:
    """One tool definition as the template writes it: its function's description,
    name and parameters, in that order (vLLM hands a template its own model of
    the tool, so only these fields and the parameters' own key order survive)."""
    fn = tool.get("function") or {}

    def js(value: Any) -> str:
        return json.dumps(value, ensure_ascii=False)

    return (
        f'{{"function": {{"description": {js(fn.get("description") or "")}, '
        f'"name": {js(fn.get("name"))}, "parameters": {js(fn.get("parameters") or {})}}}, '
        '"type": "function"}\n'
    )
