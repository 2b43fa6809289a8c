"""How the attempts of one turn become one coherent stream (no I/O here).

A turn may take several HTTP requests: a dropped stream is resumed with
``Last-Event-ID``, a retryable error is retried with the same ``turn_id``. The
server then either *replays* the stored turn whole (``meta`` with ``replayed``,
``memory``, the tool events, ONE ``token`` with the full reply, ``done`` with
``replayed: true``) or *runs it again* (a failed turn, one cut by a drain, or
one not stored yet) with a fresh stream. ``TurnMerger`` keeps what the caller
was given and turns each attempt's events into what the caller has not seen:

- ``meta``, ``memory`` and ``skill`` are given once; ``tool_call`` and
  ``tool_result`` once per call id.
- text: the reply so far is kept per step (the text between tool events). A
  replay's full reply that starts with it gives only the rest. A stream run
  again is matched as it comes: text the caller has seen already is held back,
  text beyond it is given. A reply that does not continue what was given (the
  LLM wrote another one) gives a ``ResetEvent`` whose ``text`` is the reply as
  it now stands.
- ids are the client's own ``<turn_id>:<n>``, n counting the events given, so
  they equal the server's on a stream that never broke and never repeat.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from .errors import Conflict, TiermemError, error_class
from .events import DoneEvent, Event, MetaEvent, ResetEvent, TokenEvent


@dataclass
class _Step:
    """The reply's text after one tool event (``key``; None: the first step)."""

    key: str | None
    text: str = ""


def stream_error(ev: Event) -> TiermemError:
    """The exception for an ``error`` event (``retryable`` as the server says)."""
    err = ev.data.get("error")
    err = err if isinstance(err, dict) else {}
    code = str(err.get("code") or "unknown_error")
    message = str(err.get("message") or "")
    cls = error_class(None, code)
    return cls(code, message, None, retryable=bool(ev.data.get("retryable")), data=ev.data)


class TurnMerger:
    def __init__(self, turn_id: str) -> None:
        self.turn_id = turn_id
        self.steps: list[_Step] = [_Step(None)]
        self.seen: set[tuple[str, ...]] = set()
        # The last id the server sent: what Last-Event-ID says on the next attempt.
        self.last_event_id: str | None = None
        self.done: DoneEvent | None = None
        self.attempts = 0
        self.given = 0
        # Per attempt.
        self.progress = False
        self._replay = False
        self._pos = 0
        self._text = ""
        self._replayed_text: list[TokenEvent] = []

    @property
    def finished(self) -> bool:
        return self.done is not None

    @property
    def text(self) -> str:
        """The reply as the caller holds it (resets applied)."""
        return "".join(s.text for s in self.steps)

    def begin_attempt(self) -> None:
        self.attempts += 1
        self.progress = False
        self._replay = False
        self._pos = 0
        self._text = ""
        self._replayed_text = []

    def resume_headers(self) -> dict[str, str]:
        return {"Last-Event-ID": self.last_event_id} if self.last_event_id else {}

    def feed(self, ev: Event) -> list[Event]:
        """The events to give the caller for one event of the current attempt.
        Raises the ``TiermemError`` of an ``error`` event (retryable or not)."""
        if ev.id is not None:
            self.last_event_id = ev.id
        out = [self._numbered(e) for e in self._feed(ev)]
        if out:
            self.progress = True
        return out

    # --- internals --------------------------------------------------------------------
    def _numbered(self, ev: Event) -> Event:
        if isinstance(ev, ResetEvent):
            return ev
        ev = dataclasses.replace(ev, id=f"{self.turn_id}:{self.given}")
        self.given += 1
        return ev

    def _feed(self, ev: Event) -> list[Event]:
        name = ev.event
        if name == "error":
            raise stream_error(ev)
        if name == "meta":
            self._replay = isinstance(ev, MetaEvent) and ev.replayed
            return self._once(("meta",), ev)
        if name == "memory":
            return self._once(("memory",), ev)
        if name == "skill":
            return self._once(("skill", str(ev.data.get("name")), str(ev.data.get("how"))), ev)
        if name in ("tool_call", "tool_result"):
            return self._tool(f"{name}:{ev.data.get('id')}", ev)
        if name == "token":
            if self._replay:
                if isinstance(ev, TokenEvent):
                    self._replayed_text.append(ev)
                return []
            return self._token(ev)
        if name == "done":
            if ev.data.get("status") == "duplicate":
                # This attempt raced an earlier one of the same turn_id (still
                # running when we reconnected); the earlier one is stored: ask
                # again, and that answer is a replay.
                raise Conflict(
                    "duplicate_attempt",
                    "the turn was stored by an earlier attempt",
                    None,
                    retryable=True,
                    data=ev.data,
                )
            out = self._end_of_replay() if self._replay else self._end_of_stream()
            assert isinstance(ev, DoneEvent)
            self.done = ev
            return [*out, ev]
        canonical = json.dumps(ev.data, sort_keys=True)
        return self._once(("event", name, canonical), ev)

    def _once(self, key: tuple[str, ...], ev: Event) -> list[Event]:
        # The first attempt gives everything as it comes (a turn may, say, load
        # a skill twice); later ones only what the caller has not had.
        if key in self.seen and self.attempts > 1:
            return []
        self.seen.add(key)
        return [ev]

    def _reset(self, reason: str) -> ResetEvent:
        return ResetEvent("reset", {"text": self.text, "reason": reason}, None)

    def _token(self, ev: Event) -> list[Event]:
        piece = str(ev.data.get("text", ""))
        if not piece:
            return []
        self._text += piece
        step = self.steps[self._pos]
        if len(self._text) <= len(step.text) and step.text.startswith(self._text):
            return []  # given already, by an earlier attempt
        later = self._pos + 1 < len(self.steps)
        if self._text.startswith(step.text) and not later:
            new = self._text[len(step.text) :]
            step.text = self._text
            return [ev if new == piece else TokenEvent("token", {**ev.data, "text": new}, ev.id)]
        # Another reply than the one given: it replaces it from this step on.
        step.text = self._text
        del self.steps[self._pos + 1 :]
        return [self._reset("regenerated")]

    def _tool(self, key: str, ev: Event) -> list[Event]:
        if self._replay:
            # A replay sends the stored tool events before its text.
            return self._once(("tool", key), ev)
        reset = False
        step = self.steps[self._pos]
        nxt = self._pos + 1
        aligned = nxt < len(self.steps) and self.steps[nxt].key == key
        if self._text != step.text and not (aligned and self._text == ""):
            # The step ended short of the text given. (An empty step before a
            # tool event the caller saw is a step the server resumed from its
            # record: its text is not sent again, and stands.)
            step.text = self._text
            reset = True
        if not aligned:
            if nxt < len(self.steps):
                del self.steps[nxt:]
                reset = True
            self.steps.append(_Step(key))
        self._pos = nxt
        self._text = ""
        out: list[Event] = [self._reset("regenerated")] if reset else []
        return out + self._once(("tool", key), ev)

    def _end_of_stream(self) -> list[Event]:
        step = self.steps[self._pos]
        reset = False
        if self._text != step.text:
            step.text = self._text
            reset = True
        if self._pos + 1 < len(self.steps):
            del self.steps[self._pos + 1 :]
            reset = True
        return [self._reset("regenerated")] if reset else []

    def _end_of_replay(self) -> list[Event]:
        if not self._replayed_text:
            return []
        full = "".join(t.text for t in self._replayed_text)
        last_id = self._replayed_text[-1].id
        # The stored reply joins its steps' texts with "\n"; the live stream did not.
        given = "\n".join(s.text for s in self.steps if s.text)
        if full.startswith(given):
            rest = full[len(given) :]
            if rest.startswith("\n") and given and not self.steps[-1].text:
                rest = rest[1:]  # the step boundary, which the live stream has no text for
            self.steps[-1].text += rest
            return [TokenEvent("token", {"text": rest}, last_id)] if rest else []
        self.steps = [_Step(None, full)]
        return [self._reset("replayed")]


def turn_body(
    user_id: str, message: str, turn_id: str, retrieve: str, agent: str | None
) -> dict[str, Any]:
    body: dict[str, Any] = {"user_id": user_id, "message": message, "turn_id": turn_id}
    if retrieve != "auto":
        body["retrieve"] = retrieve
    if agent is not None:
        body["agent"] = agent
    return body
