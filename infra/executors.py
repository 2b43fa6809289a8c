"""The thread pools blocking work runs in, one per kind of work.

``Executors`` owns two bounded pools:

- ``cpu``: work that holds a core (embedding inference, feature hashing,
  tokenising a large prompt). Sized from the cores this process may use, and
  small: a CPU-bound job gains nothing from more threads than cores, and torch
  already spreads one inference over several.
- ``milvus``: Milvus I/O (pymilvus is synchronous). A thread here mostly waits
  on the network, so a slow or unreachable Milvus fills this pool, and only this
  pool: embedding never queues behind a Milvus call that is timing out.

Nothing is created at import: the app builds one ``Executors`` at start and
shuts it down at stop.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

# Above this, more CPU threads mostly contend for the same cores (and the GIL
# between the parts of each job that hold it).
MAX_DEFAULT_CPU_WORKERS = 4
DEFAULT_MILVUS_WORKERS = 4


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def default_cpu_workers() -> int:
    # At least two, so one long tokenisation cannot hold up every embedding
    # even on a one-core pod.
    return max(2, min(MAX_DEFAULT_CPU_WORKERS, usable_cores()))


class Executors:
    """The ``cpu`` and ``milvus`` pools of one app instance; see the module docstring."""

    def __init__(
        self,
        cpu_workers: int | None = None,
        milvus_workers: int = DEFAULT_MILVUS_WORKERS,
    ) -> None:
        cpu_workers = default_cpu_workers() if cpu_workers is None else cpu_workers
        if cpu_workers < 1 or milvus_workers < 1:
            raise ValueError("executor sizes must be at least 1")
        self.cpu_workers = cpu_workers
        self.milvus_workers = milvus_workers
        self.cpu = ThreadPoolExecutor(max_workers=cpu_workers, thread_name_prefix="tiermem-cpu")
        self.milvus = ThreadPoolExecutor(
            max_workers=milvus_workers, thread_name_prefix="tiermem-milvus"
        )

    async def run_cpu(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args, **kwargs)`` on the cpu pool, awaited from the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.cpu, functools.partial(fn, *args, **kwargs))

    def shutdown(self, wait: bool = False) -> None:
        """Stop both pools; queued work is dropped. Idempotent.

        Not waiting by default: a Milvus call stuck on a dead server holds its
        thread until its own deadline, and stopping the app should not wait for it.
        """
        self.cpu.shutdown(wait=wait, cancel_futures=True)
        self.milvus.shutdown(wait=wait, cancel_futures=True)

    def __enter__(self) -> Executors:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown(wait=True)


__all__ = ["Executors", "default_cpu_workers", "usable_cores"]
