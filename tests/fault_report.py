"""One line of figures per fault test, for the closing-note fault table.

Printed (visible with ``pytest -s``) and, when ``TIERMEM_FAULT_REPORT`` names a
file, appended to it as one JSON line. Used by the Redis fault suite
(tests/faults) and the app's fault suite (tests/faults_app).

``recover_s``: from the moment the fault ends (a server restarted, resumed,
given memory back; for a kill without restart, from the kill) to the first turn
acknowledged after it.
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
    print("FAULT " + json.dumps(figures, default=str))
    path = os.environ.get("TIERMEM_FAULT_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(figures, default=str) + "\n")
    return figures
