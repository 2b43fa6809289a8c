"""Input rules of a turn, and whether it needs long-term memory.

The app applies ``check_message`` before a turn starts, so bad input is refused
with a 4xx before anything touches Redis, Milvus or the LLM; the graph's
``prepare`` node applies the same rules again (defence in depth).
"""

from __future__ import annotations

import re

from infra.errors import InvalidInput

# C0 and C1 control characters other than tab, newline and carriage return.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


class InputRejected(InvalidInput):
    """The turn's input breaks a rule. ``code`` is a stable machine-readable name."""

    def __init__(self, code: str, message: str, status: int = 422) -> None:
        super().__init__(message, code=code, http_status=status)


def check_message(message: object, max_chars: int) -> str:
    if not isinstance(message, str):
        raise InputRejected("invalid_message", "message must be a string")
    if not message.strip():
        raise InputRejected("empty_message", "message must not be empty")
    if len(message) > max_chars:
        raise InputRejected(
            "message_too_long",
            f"message has {len(message)} characters; the limit is {max_chars}",
            status=413,
        )
    if "\x00" in message:
        raise InputRejected("invalid_message", "message must not contain NUL characters")
    # Lone surrogates cannot be encoded as UTF-8 and would break JSON and Redis.
    try:
        message.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputRejected("invalid_encoding", "message is not valid UTF-8 text") from exc
    if _CONTROL.search(message):
        raise InputRejected("invalid_message", "message contains control characters")
    return message


# Cues that a message leans on the past: recall verbs, references to earlier
# conversations, personal facts the user may have told before.
_RECALL = re.compile(
    r"\b(remember|recall|remind|forgot|forget|earlier|before|previous(ly)?|last time|"
    r"again|we (talked|discussed|spoke)|you (said|told|mentioned)|i (said|told|mentioned)|"
    r"my (name|favou?rite|wife|husband|partner|job|birthday|address|plan|project|preference)|"
    r"what (is|was|were|did) (my|i|we)|do you know (my|what i))\b",
    re.IGNORECASE,
)


def needs_memory(message: str, mode: str) -> bool:
    """``auto`` retrieves when the message looks like it needs the past (memories
    are per user, so other sessions may hold it); ``always`` and ``never`` do
    what they say."""
    if mode == "always":
        return True
    if mode == "never":
        return False
    return bool(_RECALL.search(message))
