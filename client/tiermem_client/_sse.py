"""A line-by-line parser of ``text/event-stream`` (the WHATWG rules tiermem
needs: ``id``, ``event``, multi-line ``data``, comments)."""

from __future__ import annotations

import json
from typing import Any

from .errors import ProtocolError
from .events import Event, make_event


class SSEParser:
    """Feed it the stream's lines (without their line ends); it returns an event
    at each blank line that ends one, else None. Comments (``: heartbeat``)
    count in ``comments``."""

    def __init__(self) -> None:
        self.last_id: str | None = None
        self.comments = 0
        self._event = ""
        self._data: list[str] = []
        self._has_fields = False

    def line(self, line: str) -> Event | None:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            self.comments += 1
            return None
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        self._has_fields = True
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self.last_id = value
        # "retry" and unknown fields: ignored (this client has its own backoff).
        return None

    def _dispatch(self) -> Event | None:
        if not self._has_fields:
            return None
        event, lines = self._event or "message", self._data
        self._event, self._data, self._has_fields = "", [], False
        if not lines:
            return None
        raw = "\n".join(lines)
        try:
            data: Any = json.loads(raw)
        except ValueError as exc:
            raise ProtocolError(
                "protocol_error", f"event {event!r} has data that is not JSON: {raw[:200]!r}"
            ) from exc
        if not isinstance(data, dict):
            data = {"value": data}
        return make_event(event, data, self.last_id)
