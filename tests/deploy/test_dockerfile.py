"""The Dockerfile and .dockerignore.

Without a Docker engine (this machine has only the client) the structure is
checked: stages, base image, user, entrypoint, healthcheck, what the final stage
copies, what the build context holds. With an engine the image is also built
and run.
"""

from __future__ import annotations

import fnmatch
import http.server
import json
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import yaml

from tests.deploy.manifests import BASE_DIR, REPO_ROOT

DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
VENV = "/opt/venv"
APP_PORT = 8000


# --- a small Dockerfile reader ---------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form instruction, else None."""
        text = self.args
        if self.keyword == "HEALTHCHECK":
            text = re.sub(r"^(--\S+\s+)*CMD\s+", "", text)
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return None
        return value if isinstance(value, list) else None


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def _logical_lines(text: str) -> Iterator[str]:
    """Lines with continuations joined and comments dropped, as BuildKit reads them."""
    buf = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#"):
            continue
        if raw.rstrip().endswith("\\"):
            buf += raw.rstrip()[:-1] + " "
            continue
        buf += raw
        if buf.strip():
            yield buf.strip()
        buf = ""
    if buf.strip():
        yield buf.strip()


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, with ${ARG} in FROM resolved."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in _logical_lines(text):
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        args = args.strip()
        if keyword == "FROM":
            parts = args.split()
            parts = [p for p in parts if not p.startswith("--platform")]
            base = re.sub(
                r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1), m.group(0)), parts[0]
            )
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(base, name))
        elif not stages:
            if keyword == "ARG" and "=" in args:
                key, value = args.split("=", 1)
                global_args[key] = value
        else:
            stages[-1].instructions.append(Instruction(keyword, args))
    return global_args, stages


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())[1]


@pytest.fixture(scope="module")
def final(stages: list[Stage]) -> Stage:
    return stages[-1]


def _packages() -> list[str]:
    with (REPO_ROOT / "pyproject.toml").open("rb") as f:
        include = tomllib.load(f)["tool"]["setuptools"]["packages"]["find"]["include"]
    return sorted(p.rstrip("*") for p in include)


# --- structure ---------------------------------------------------------------------------


def test_parser_reads_continuations_and_stages() -> None:
    text = "ARG B=python:3.11-slim\nFROM ${B} AS one\n# c\nRUN a \\\n  && b\nFROM ${B}\nUSER 1:1\n"
    args, parsed = parse_dockerfile(text)
    assert args == {"B": "python:3.11-slim"}
    assert [(s.base, s.name) for s in parsed] == [
        ("python:3.11-slim", "one"),
        ("python:3.11-slim", None),
    ]
    assert parsed[0].instructions[0].args == "a    && b"


def test_multi_stage_on_a_slim_python_311_base(stages: list[Stage]) -> None:
    assert len(stages) >= 2
    for stage in stages:
        assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?", stage.base), stage.base
    # The final stage starts from the base again, not from the builder.
    assert stages[-1].base == stages[0].base
    assert stages[-1].base not in {s.name for s in stages[:-1]}


def test_final_stage_runs_as_a_numeric_non_root_user(final: Stage) -> None:
    users = final.all("USER")
    assert users, "the final stage sets no USER: the container would run as root"
    user = users[-1].args
    assert re.fullmatch(r"\d+(:\d+)?", user), f"USER {user} is not numeric (runAsNonRoot needs it)"
    assert all(int(part) != 0 for part in user.split(":"))
    # The Kubernetes Deployment runs as the same user.
    (deployment,) = yaml.safe_load_all((BASE_DIR / "deployment.yaml").read_text())
    pod_sc = deployment["spec"]["template"]["spec"]["securityContext"]
    assert f"{pod_sc['runAsUser']}:{pod_sc['runAsGroup']}" == user


def test_final_stage_copies_only_the_venv(stages: list[Stage], final: Stage) -> None:
    assert not final.all("ADD")
    copies = final.all("COPY")
    assert copies, "the final stage copies nothing"
    builder_names = {s.name for s in stages[:-1]}
    for copy in copies:
        words = shlex.split(copy.args)
        sources = [w for w in words if w.startswith("--from=")]
        assert sources and sources[0].split("=", 1)[1] in builder_names, copy.args
        assert [w for w in words if not w.startswith("--")] == [VENV, VENV], copy.args


def test_builder_copies_the_packages_pyproject_installs(stages: list[Stage]) -> None:
    copied: list[str] = []
    for stage in stages[:-1]:
        for copy in stage.all("COPY"):
            words = [w for w in shlex.split(copy.args) if not w.startswith("--")]
            copied += [w.rstrip("/") for w in words[:-1]]
    with (REPO_ROOT / "pyproject.toml").open("rb") as f:
        readme = tomllib.load(f)["project"]["readme"]
    assert sorted(copied) == sorted(["pyproject.toml", readme, *_packages()])


def test_no_build_tools_or_installers_run_in_the_final_stage(final: Stage) -> None:
    for run in final.all("RUN"):
        assert not re.search(
            r"apt-get\s+install|apk\s+add|pip\s+install|gcc|make|build-essential", run.args
        ), run.args


def test_builder_installs_torch_from_the_cpu_index(stages: list[Stage]) -> None:
    runs = " ".join(r.args for s in stages[:-1] for r in s.all("RUN"))
    args = " ".join(a.args for s in stages[:-1] for a in s.all("ARG"))
    assert "torch==${TORCH_VERSION}" in runs
    assert "--index-url" in runs
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in args
    # The pin the Makefile uses.
    makefile = (REPO_ROOT / "Makefile").read_text()
    (pin,) = set(re.findall(r"torch==([\d.]+)", makefile))
    assert f"TORCH_VERSION={pin}" in args


def test_entrypoint_is_one_tiermem_serve_process(final: Stage) -> None:
    (entrypoint,) = final.all("ENTRYPOINT")
    (cmd,) = final.all("CMD")
    # Exec form: the server is PID 1 and receives SIGTERM itself.
    assert entrypoint.exec_form() == ["tiermem"]
    argv = cmd.exec_form()
    assert argv is not None and argv[0] == "serve"
    assert argv[argv.index("--port") + 1] == str(APP_PORT)
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    assert [e.args for e in final.all("EXPOSE")] == [str(APP_PORT)]
    # Kubernetes passes the same arguments.
    (deployment,) = yaml.safe_load_all((BASE_DIR / "deployment.yaml").read_text())
    assert deployment["spec"]["template"]["spec"]["containers"][0]["args"] == argv


def test_data_dir_is_a_volume_owned_by_the_user(final: Stage) -> None:
    env = " ".join(e.args for e in final.all("ENV"))
    m = re.search(r"TIERMEM_DATA_DIR=(\S+)", env)
    assert m
    data_dir = m.group(1)
    volumes = [json.loads(v.args) for v in final.all("VOLUME")]
    assert [data_dir] in volumes
    assert any("chown" in r.args and data_dir in r.args for r in final.all("RUN"))


def test_graceful_shutdown_is_documented() -> None:
    text = DOCKERFILE.read_text()
    assert "--timeout-graceful-shutdown" in text
    assert "TIERMEM_DRAIN_TIMEOUT_S" in text


# --- the healthcheck, run for real -------------------------------------------------------


def test_healthcheck_is_python_against_healthz(final: Stage) -> None:
    (check,) = final.all("HEALTHCHECK")
    argv = check.exec_form()
    assert argv is not None and argv[0] == "python" and argv[1] == "-c"
    assert f"127.0.0.1:{APP_PORT}/healthz" in argv[2]


class _Handler(http.server.BaseHTTPRequestHandler):
    status: ClassVar[int] = 200
    paths: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        type(self).paths.append(self.path)
        self.send_response(type(self).status)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False)])
def test_healthcheck_command_reports_the_endpoint_status(
    final: Stage, status: int, healthy: bool
) -> None:
    (check,) = final.all("HEALTHCHECK")
    argv = check.exec_form()
    assert argv is not None

    class handler(_Handler):
        pass

    handler.status = status
    handler.paths = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        code = argv[2].replace(f":{APP_PORT}/", f":{server.server_port}/")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30)
    finally:
        server.shutdown()
        server.server_close()
    assert (proc.returncode == 0) is healthy
    assert handler.paths == ["/healthz"]


def test_healthcheck_fails_when_nothing_listens(final: Stage) -> None:
    (check,) = final.all("HEALTHCHECK")
    argv = check.exec_form()
    assert argv is not None
    # Port 9 (discard) on loopback: nothing listens there in a test sandbox.
    code = argv[2].replace(f":{APP_PORT}/", ":9/")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30)
    assert proc.returncode != 0


# --- the build context -------------------------------------------------------------------


def _dockerignore_patterns() -> list[tuple[bool, str]]:
    patterns = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line[1:] if negated else line
        patterns.append((negated, pattern.strip("/")))
    return patterns


def _pattern_matches(pattern: str, path: str) -> bool:
    """Docker's rule: a pattern matches a path or any of its parent directories;
    `*` stays within one path segment, `**` spans any number."""
    regex = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            regex += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            regex += ".*"
            i += 2
        elif pattern[i] == "*":
            regex += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            regex += "[^/]"
            i += 1
        elif pattern[i] == "[":
            j = pattern.index("]", i)
            regex += pattern[i : j + 1]
            i = j + 1
        else:
            regex += re.escape(pattern[i])
            i += 1
    parts = path.split("/")
    return any(re.fullmatch(regex, "/".join(parts[:n])) for n in range(1, len(parts) + 1))


def dockerignored(path: str) -> bool:
    excluded = False
    for negated, pattern in _dockerignore_patterns():
        if _pattern_matches(pattern, path):
            excluded = not negated
    return excluded


def test_dockerignore_matcher_follows_docker_rules() -> None:
    assert _pattern_matches("*", "a/b.py")  # via the parent "a"
    assert _pattern_matches("**/__pycache__", "app/x/__pycache__/m.pyc")
    assert not _pattern_matches("app", "apps/x.py")
    assert fnmatch.fnmatch("x.pyc", "*.py[cod]")
    assert _pattern_matches("**/*.py[cod]", "app/m.pyc")


@pytest.mark.parametrize(
    "path",
    [".venv/bin/python", ".git/HEAD", ".tiermem/redis/appendonly.aof", "tests/conftest.py",
     "bench/turn_overhead.py", "k8s/base/deployment.yaml", "app/__pycache__/cli.cpython-311.pyc",
     ".env", "Makefile"],
)  # fmt: skip
def test_dockerignore_keeps_out(path: str) -> None:
    assert dockerignored(path)


def test_dockerignore_lets_in_what_the_image_installs() -> None:
    with (REPO_ROOT / "pyproject.toml").open("rb") as f:
        readme = tomllib.load(f)["project"]["readme"]
    needed = ["pyproject.toml", readme] + [f"{p}/__init__.py" for p in _packages()]
    needed += ["memory/keys.py", "infra/settings.py"]
    assert [p for p in needed if dockerignored(p)] == []


# --- with a Docker engine: build and run ---------------------------------------------------


def _docker_engine() -> str | None:
    docker = shutil.which("docker")
    if docker is None:
        return None
    try:
        proc = subprocess.run(
            [docker, "version", "--format", "{{.Server.Version}}"],
            capture_output=True, text=True, timeout=20, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return None
    return docker if proc.returncode == 0 and proc.stdout.strip() else None


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_image_builds_and_runs_as_designed(record_property: Callable[[str, object], None]) -> None:
    docker = _docker_engine()
    if docker is None:
        pytest.skip("no Docker engine answers (`docker version` has no server): image not built")
    tag = f"tiermem-test:{uuid.uuid4().hex[:12]}"

    def run(
        *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [docker, *args], capture_output=True, text=True, timeout=timeout, check=check
        )

    run("build", "-t", tag, str(REPO_ROOT), timeout=3000)
    try:
        (info,) = json.loads(run("image", "inspect", tag).stdout)
        record_property("image_size_bytes", info["Size"])
        config = info["Config"]
        assert config["User"] == "10001:10001"
        assert f"{APP_PORT}/tcp" in config["ExposedPorts"]
        assert config["Entrypoint"] == ["tiermem"]
        assert "/healthz" in " ".join(config["Healthcheck"]["Test"])
        assert run("run", "--rm", "--entrypoint", "id", tag, "-u").stdout.strip() == "10001"
        tools = run(
            "run", "--rm", "--entrypoint", "sh", tag, "-c",
            "command -v gcc cc make g++ apt-get >/dev/null 2>&1 && command -v gcc",
            check=False,
        )  # fmt: skip
        assert "gcc" not in tools.stdout, "a compiler reached the final image"
        # The app starts on a read-only root filesystem with only the data volume writable.
        name = f"tiermem-test-{uuid.uuid4().hex[:8]}"
        run(
            "run",
            "-d",
            "--name",
            name,
            "--read-only",
            "--tmpfs",
            "/tmp",
            "-e",
            "TIERMEM_AUTH=off",
            tag,
        )
        try:
            for _ in range(120):
                state = run("inspect", "--format", "{{.State.Health.Status}}", name).stdout.strip()
                if state in ("healthy", "unhealthy"):
                    break
                time.sleep(2)
            assert state == "healthy", run("logs", name, check=False).stdout[-4000:]
            run("stop", "-t", "40", name)
            exit_code = run("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
            assert exit_code == "0", "SIGTERM must end in a clean exit"
        finally:
            run("rm", "-f", name, check=False)
    finally:
        run("rmi", "-f", tag, check=False)
