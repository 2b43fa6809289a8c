"""Fault tests on the app's side of tiermem: Milvus unavailable, the app process
killed mid-stream, hundreds of clients leaving mid-stream. Each test starts and
kills real processes on 127.0.0.1 and reports one line of figures.

``report_fault`` is how every test here hands its figures to the closing-note
table: printed (visible with ``pytest -s``) and, when ``TIERMEM_FAULT_REPORT``
names a file, appended to it as one JSON line.
"""

from __future__ import annotations

import json
import os
from typing import Any


def report_fault(
    fault: str,
    *,
    injected: int,
    acknowledged: int,
    lost: int,
    duplicated: int,
    recover_s: float | None,
    **details: Any,
) -> dict[str, Any]:
    """Prints the figures of one fault test and appends them to the report file."""
    figures: dict[str, Any] = {
        "fault": fault,
        "injected": injected,
        "acknowledged": acknowledged,
        "lost": lost,
        "duplicated": duplicated,
        "recover_s": None if recover_s is None else round(recover_s, 3),
        **details,
    }
    print("FAULT " + json.dumps(figures, sort_keys=False))
    path = os.environ.get("TIERMEM_FAULT_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(figures) + "\n")
    return figures
