"""The client's tests import ``tiermem_client`` from client/ when it is not
installed (``make install`` installs it, editable, into .venv)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("tiermem_client") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "client"))
