"""How a LangGraph checkpoint is stored in L2.

The LangGraph checkpointer (``graph.checkpointer.RedisCheckpointSaver``) encodes
and decodes records here, with its own ``serde``; the turn commit gets its record
from the same saver (``encode_checkpoint``), so memory/ only ever sees bytes. A
record is one msgpack map:

    {"v": 1, "id": str, "parent": str | None,
     "ct": str, "cb": bytes,     # checkpoint, typed by the serde
     "mt": str, "mb": bytes}     # metadata, typed by the serde

The serde is LangGraph's own ``JsonPlusSerializer`` so anything LangGraph can
checkpoint round-trips. A pending write is ``{"v": 1, "task": str, "path": str,
"channel": str, "t": str, "b": bytes}`` under field ``<task_id>|<idx>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack
from langgraph.checkpoint.serde.base import SerializerProtocol
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer

RECORD_VERSION = 1

_default_serde = JsonPlusSerializer()


def default_serde() -> SerializerProtocol:
    return _default_serde


@dataclass(frozen=True, slots=True)
class CheckpointRecord:
    checkpoint_id: str
    parent_id: str | None
    checkpoint: dict[str, Any]
    metadata: dict[str, Any]


def encode_record(record: CheckpointRecord, serde: SerializerProtocol | None = None) -> bytes:
    s = serde or _default_serde
    ct, cb = s.dumps_typed(record.checkpoint)
    mt, mb = s.dumps_typed(record.metadata)
    return msgpack.packb(
        {
            "v": RECORD_VERSION,
            "id": record.checkpoint_id,
            "parent": record.parent_id,
            "ct": ct,
            "cb": cb,
            "mt": mt,
            "mb": mb,
        },
        use_bin_type=True,
    )


def decode_record(raw: bytes, serde: SerializerProtocol | None = None) -> CheckpointRecord:
    s = serde or _default_serde
    m = msgpack.unpackb(raw, raw=False)
    if m.get("v") != RECORD_VERSION:
        raise ValueError(f"unknown checkpoint record version {m.get('v')!r}")
    return CheckpointRecord(
        checkpoint_id=m["id"],
        parent_id=m["parent"],
        checkpoint=s.loads_typed((m["ct"], m["cb"])),
        metadata=s.loads_typed((m["mt"], m["mb"])),
    )


def encode_write(
    task_id: str, task_path: str, channel: str, value: Any, serde: SerializerProtocol | None = None
) -> bytes:
    s = serde or _default_serde
    t, b = s.dumps_typed(value)
    return msgpack.packb(
        {
            "v": RECORD_VERSION,
            "task": task_id,
            "path": task_path,
            "channel": channel,
            "t": t,
            "b": b,
        },
        use_bin_type=True,
    )


def decode_write(raw: bytes, serde: SerializerProtocol | None = None) -> tuple[str, str, str, Any]:
    """Returns (task_id, task_path, channel, value)."""
    s = serde or _default_serde
    m = msgpack.unpackb(raw, raw=False)
    return m["task"], m["path"], m["channel"], s.loads_typed((m["t"], m["b"]))
