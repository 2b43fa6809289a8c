"""The PostgreSQL server the peer benchmark runs against: found, or started.

First the DSN given (by default the machine's server on 127.0.0.1:5432, trust
auth, database ``test``). If nothing answers there, a private cluster is made
with ``initdb`` in a temp dir and started with ``pg_ctl`` on a free 127.0.0.1
port (as the ``postgres`` user when we are root, since ``initdb`` refuses root),
and stopped and removed afterwards. If neither works, ``PostgresUnavailable``
says why, in words meant for the benchmark's output.

The benchmark's tables live in a schema of their own (``search_path``), created
at start and dropped at the end, so nothing else in the database is touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import psycopg

from tests.servers.redis_server import free_port


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server could be reached or started."""


@dataclass
class Postgres:
    dsn: str
    how: str  # "found at ..." or "started ..."
    _stop: list[list[str]] = field(default_factory=list)
    _dir: Path | None = None
    _runas: list[str] = field(default_factory=list)

    def schema_dsn(self, schema: str) -> str:
        sep = "&" if "?" in self.dsn else "?"
        return f"{self.dsn}{sep}options={quote(f'-c search_path={schema}')}"

    def stop(self) -> None:
        for cmd in self._stop:
            subprocess.run(cmd, capture_output=True, timeout=60, check=False)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


def _answers(dsn: str) -> str | None:
    try:
        with psycopg.connect(dsn, connect_timeout=3) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            return str(row[0]) if row else "?"
    except psycopg.Error:
        return None


def find_or_start(dsn: str) -> Postgres:
    version = _answers(dsn)
    if version is not None:
        return Postgres(dsn, f"found at {dsn} (PostgreSQL {version})")
    return _start_private(dsn)


def _start_private(tried: str) -> Postgres:
    bindir = _pg_bindir()
    if bindir is None:
        raise PostgresUnavailable(
            f"PostgreSQL did not answer at {tried}, and no initdb/pg_ctl was found to start one"
        )
    runas: list[str] = []
    if os.geteuid() == 0:
        if (
            shutil.which("runuser") is None
            or subprocess.run(["id", "postgres"], capture_output=True, check=False).returncode
        ):
            raise PostgresUnavailable(
                f"PostgreSQL did not answer at {tried}; initdb refuses to run as root and "
                "there is no 'postgres' user to run it as"
            )
        runas = ["runuser", "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="tiermem-bench-pg-"))
    data = root / "data"
    port = free_port()
    if runas:
        shutil.chown(root, "postgres")
    log = root / "pg.log"

    def run(cmd: list[str]) -> None:
        r = subprocess.run(runas + cmd, capture_output=True, text=True, timeout=120, check=False)
        if r.returncode:
            shutil.rmtree(root, ignore_errors=True)
            raise PostgresUnavailable(
                f"PostgreSQL did not answer at {tried}, and starting one failed: "
                f"{' '.join(cmd[:2])}: {(r.stderr or r.stdout).strip()[-400:]}"
            )

    run([str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8"])
    run([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o",
         f"-p {port} -c listen_addresses=127.0.0.1 -k {root} -c fsync=on", "start"])  # fmt: skip
    stop = [*runas, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]
    admin = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    try:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("CREATE DATABASE test")
    except psycopg.Error as exc:
        subprocess.run(stop, capture_output=True, timeout=60, check=False)
        shutil.rmtree(root, ignore_errors=True)
        raise PostgresUnavailable(f"started PostgreSQL but could not create 'test': {exc}") from exc
    dsn = f"postgresql://postgres@127.0.0.1:{port}/test"
    return Postgres(dsn, f"started privately at {dsn} ({tried} did not answer)", [stop], root,
                    runas)  # fmt: skip


def _pg_bindir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(os.path.realpath(found)).parent
    for base in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (base / "pg_ctl").exists():
            return base
    return None
