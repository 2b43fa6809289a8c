"""vllm.kvOffload: a CPU (and, with LMCache, disk) KV tier under each vLLM replica,
so that prewarmed stable prefixes survive eviction from the GPU's prefix cache.

The Helm chart is rendered in-process by the `helm-python-sdk` library (Helm's
own Go engine behind a C ABI, no helm binary): off, native, LMCache with a disk
tier; every object is checked with kubernetes-validate (strict) like the
overlays; the args, env, volumes and resources are asserted; the invalid
combinations fail with their message. The kustomize components are built on
top of the prod overlay and checked the same way, and against the chart. Where
vLLM 0.32.0 is installed (`.venv-vllm`, `make engine`), the rendered `vllm serve`
arguments are parsed by vLLM's own argument parser, and its config turns them
into the connector we mean.

Nothing here runs vLLM on a GPU: what is checked is what rendering, schema
validation and vLLM's argument parser can show (k8s/README.md says so too).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from kubernetes_validate import utils as kv

from tests.deploy.manifests import (
    BASE_DIR,
    CHART_DIR,
    COMPONENTS_DIR,
    CRD_FILES,
    K8S_VERSIONS,
    OVERLAYS_DIR,
    REPO_ROOT,
    Manifest,
    container,
    find,
    k8s_validate,
    kustomize_build,
    kustomize_command,
    load_yaml_docs,
    pod_spec,
)

RELEASE = "tiermem"
NAMESPACE = "tiermem"
VLLM = f"{RELEASE}-vllm"
VLLM_PY = REPO_ROOT / ".venv-vllm" / "bin" / "python"
# The release whose `vllm serve` flags these manifests were checked against.
CHECKED_VLLM_TAG = "v0.32.0"
LMCACHE_CONFIG = {"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}

OFF: dict[str, Any] = {}
NATIVE: dict[str, Any] = {
    "vllm": {"image": {"tag": CHECKED_VLLM_TAG}, "kvOffload": {"enabled": True}}
}
LMCACHE_DISK: dict[str, Any] = {
    "vllm": {"kvOffload": {"enabled": True, "backend": "lmcache", "disk": {"enabled": True}}}
}
LMCACHE_CPU: dict[str, Any] = {"vllm": {"kvOffload": {"enabled": True, "backend": "lmcache"}}}
CASES = {"off": OFF, "native": NATIVE, "lmcache-disk": LMCACHE_DISK, "lmcache-cpu": LMCACHE_CPU}


def _merge(*trees: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for tree in trees:
        for key, value in tree.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = _merge(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
    return out


# --- rendering with helm-python-sdk -------------------------------------------------------


@pytest.fixture(scope="module")
def helm() -> Any:
    try:
        import helm_python
    except ImportError:
        pytest.skip(
            "SKIPPED LOUDLY: the `helm-python-sdk` package (import helm_python) is not "
            "installed, so the chart is not rendered and vllm.kvOffload is NOT checked; "
            "`pip install helm-python-sdk` (it bundles Helm's engine, no helm binary)"
        )
    return helm_python


def _render(helm: Any, values: dict[str, Any], chart_dir: Path = CHART_DIR) -> list[Manifest]:
    with helm.Chart.load(str(chart_dir)) as chart:
        rendered: dict[str, str] = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    objects: list[Manifest] = []
    for path, text in sorted(rendered.items()):
        if path.endswith(".yaml"):
            objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def _render_error(helm: Any, values: dict[str, Any], chart_dir: Path = CHART_DIR) -> str:
    with pytest.raises(helm.HelmError) as err:
        _render(helm, values, chart_dir)
    return str(err.value)


@pytest.fixture(scope="module")
def rendered(helm: Any) -> dict[str, list[Manifest]]:
    return {name: _render(helm, values) for name, values in CASES.items()}


def _vllm(objects: list[Manifest]) -> Manifest:
    return find(objects, "Deployment", VLLM)


def _volumes(workload: Manifest) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in pod_spec(workload)["volumes"]}


def _env(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def _lmcache_env(c: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in _env(c).items() if k.startswith("LMCACHE_")}


def _kv_args(args: list[str]) -> list[str]:
    return [a for a in args if a.startswith(("--kv-", "--kv_"))]


def _gib(quantity: str) -> int:
    assert quantity.endswith("Gi"), quantity
    return int(quantity[:-2])


@pytest.fixture(scope="module")
def values() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    return loaded


def _validate_all(objects: list[Manifest], where: str) -> int:
    """Every core object through kubernetes-validate (strict) on the oldest and
    newest Kubernetes the manifests target; custom kinds only if known."""
    failures: list[str] = []
    validated = 0
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) in CRD_FILES:
            continue  # validated against their CRDs in test_helm_chart / test_keda
        for version in K8S_VERSIONS:
            try:
                k8s_validate(obj, version)
            except kv.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                failures.append(
                    f"{obj['kind']}/{obj['metadata']['name']} @ {version}: {path}: {e.message}"
                )
        validated += 1
    assert not failures, f"{where}:\n" + "\n".join(failures)
    return validated


# --- Helm: lint and schema validation ---------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_chart_lints_strict(helm: Any, case: str) -> None:
    report = helm.lint(
        str(CHART_DIR), CASES[case], strict=True, namespace=NAMESPACE, kube_version="v1.30.0"
    )
    assert report["errors"] == [], report
    # severity 2 = warning, 3 = error; 1 (info) is "icon is recommended"
    assert [m for m in report["messages"] if m["severity"] >= 2] == [], report


@pytest.mark.parametrize("case", list(CASES))
def test_every_rendered_object_passes_strict_validation(
    rendered: dict[str, list[Manifest]], case: str
) -> None:
    objects = rendered[case]
    assert _validate_all(objects, case) >= 8
    assert {"Deployment", "Service", "ConfigMap", "PersistentVolumeClaim"} <= {
        o["kind"] for o in objects
    }


# --- off: nothing changes --------------------------------------------------------------


def test_off_is_the_default(values: dict[str, Any]) -> None:
    kvo = values["vllm"]["kvOffload"]
    assert kvo["enabled"] is False
    assert kvo["backend"] == "native"
    assert kvo["cpuGiB"] == 16
    assert kvo["disk"] == {
        "enabled": False,
        "sizeGiB": 50,
        "path": "/kv-cache",
        "existingClaim": "",
    }


def test_off_leaves_the_vllm_container_as_it_was(
    rendered: dict[str, list[Manifest]], values: dict[str, Any]
) -> None:
    dep = _vllm(rendered["off"])
    c = container(dep, "vllm")
    assert _kv_args(c["args"]) == []
    assert not [name for name in _env(c) if name.startswith("LMCACHE_")]
    assert set(_volumes(dep)) == {"models", "dshm", "tmp"}
    assert [m["mountPath"] for m in c["volumeMounts"]] == ["/models", "/dev/shm", "/tmp"]
    assert c["resources"] == values["vllm"]["resources"]
    assert _volumes(dep)["dshm"]["emptyDir"]["sizeLimit"] == values["vllm"]["shmSizeLimit"]
    # ... and agrees with the kustomize base's vLLM container field by field.
    (base,) = [d for d in load_yaml_docs(BASE_DIR / "vllm-deployment.yaml")]
    base_c = container(base, "vllm")
    for key in ("command", "args", "ports", "resources", "volumeMounts", "securityContext"):
        assert c[key] == base_c[key], key
    assert [e["name"] for e in c["env"]] == [e["name"] for e in base_c["env"]]
    base_volumes = _volumes(base)
    for name in ("dshm", "tmp"):
        assert _volumes(dep)[name] == base_volumes[name], name


def test_off_ignores_the_other_kv_values(helm: Any, rendered: dict[str, list[Manifest]]) -> None:
    """With enabled false, the other kv values (even invalid ones) render nothing."""
    objects = _render(helm, {"vllm": {"kvOffload": {"enabled": False, "disk": {"enabled": True}}}})
    assert _vllm(objects)["spec"] == _vllm(rendered["off"])["spec"]


# --- native -------------------------------------------------------------------------------


def test_native_passes_the_offloading_flags(rendered: dict[str, list[Manifest]]) -> None:
    dep = _vllm(rendered["native"])
    c = container(dep, "vllm")
    off_args = container(_vllm(rendered["off"]), "vllm")["args"]
    assert c["args"] == [*off_args, "--kv-offloading-backend=native", "--kv-offloading-size=16"]
    assert c["image"] == f"vllm/vllm-openai:{CHECKED_VLLM_TAG}"
    assert not [name for name in _env(c) if name.startswith("LMCACHE_")]
    assert "kv-cache" not in _volumes(dep)


def test_native_raises_memory_and_shm_by_cpu_gib(
    rendered: dict[str, list[Manifest]], values: dict[str, Any]
) -> None:
    dep = _vllm(rendered["native"])
    res = container(dep, "vllm")["resources"]
    base = values["vllm"]["resources"]
    assert _gib(res["requests"]["memory"]) == _gib(base["requests"]["memory"]) + 16
    assert _gib(res["limits"]["memory"]) == _gib(base["limits"]["memory"]) + 16
    # everything else as configured
    assert res["requests"]["cpu"] == base["requests"]["cpu"]
    assert res["limits"]["nvidia.com/gpu"] == base["limits"]["nvidia.com/gpu"] == 1
    # vLLM's native tier is a file in /dev/shm (vllm_offload_<engine>.mmap)
    shm = _volumes(dep)["dshm"]["emptyDir"]
    assert shm["medium"] == "Memory"
    assert _gib(shm["sizeLimit"]) == _gib(values["vllm"]["shmSizeLimit"]) + 16


def test_native_flags_come_before_extra_args(helm: Any) -> None:
    values = _merge(NATIVE, {"vllm": {"kvOffload": {"cpuGiB": 4}, "extraArgs": ["--seed=1"]}})
    args = container(_vllm(_render(helm, values)), "vllm")["args"]
    assert args[-3:] == ["--kv-offloading-backend=native", "--kv-offloading-size=4", "--seed=1"]


# --- LMCache --------------------------------------------------------------------------------


def _kv_transfer_config(args: list[str]) -> dict[str, Any]:
    (arg,) = [a for a in args if a.startswith("--kv-transfer-config=")]
    loaded: dict[str, Any] = json.loads(arg.split("=", 1)[1])
    return loaded


def test_lmcache_with_disk(rendered: dict[str, list[Manifest]], values: dict[str, Any]) -> None:
    dep = _vllm(rendered["lmcache-disk"])
    c = container(dep, "vllm")
    off_args = container(_vllm(rendered["off"]), "vllm")["args"]
    assert c["args"][: len(off_args)] == off_args
    assert _kv_args(c["args"]) == [c["args"][-1]]
    assert _kv_transfer_config(c["args"]) == LMCACHE_CONFIG
    env = _env(c)
    assert {k: v for k, v in env.items() if k.startswith("LMCACHE_")} == {
        "LMCACHE_LOCAL_CPU": "True",
        "LMCACHE_MAX_LOCAL_CPU_SIZE": "16",
        "LMCACHE_CHUNK_SIZE": "256",
        "LMCACHE_LOCAL_DISK": "file:///kv-cache/",
        "LMCACHE_MAX_LOCAL_DISK_SIZE": "50",
    }
    # the settings vLLM already had stay
    assert {"HOME", "HF_HOME", "HF_TOKEN", "VLLM_API_KEY"} <= set(env)
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts["/kv-cache"] == "kv-cache"
    # 50 GiB for LMCache, 10% headroom so that its files never get the pod evicted
    assert _volumes(dep)["kv-cache"] == {"name": "kv-cache", "emptyDir": {"sizeLimit": "55Gi"}}
    res = c["resources"]
    base = values["vllm"]["resources"]
    assert _gib(res["requests"]["memory"]) == _gib(base["requests"]["memory"]) + 16
    assert _gib(res["limits"]["memory"]) == _gib(base["limits"]["memory"]) + 16
    # LMCache's CPU tier is not in /dev/shm: that stays as it was
    assert _volumes(dep)["dshm"]["emptyDir"]["sizeLimit"] == values["vllm"]["shmSizeLimit"]
    # LMCache's connector works with the image as configured (no version pin)
    assert c["image"] == f"vllm/vllm-openai:{values['vllm']['image']['tag']}"


def test_lmcache_cpu_only(rendered: dict[str, list[Manifest]]) -> None:
    dep = _vllm(rendered["lmcache-cpu"])
    c = container(dep, "vllm")
    env = _env(c)
    assert "LMCACHE_LOCAL_DISK" not in env and "LMCACHE_MAX_LOCAL_DISK_SIZE" not in env
    assert env["LMCACHE_LOCAL_CPU"] == "True"
    assert "kv-cache" not in _volumes(dep)
    assert "/kv-cache" not in [m["mountPath"] for m in c["volumeMounts"]]


def test_lmcache_disk_on_an_existing_claim_and_path(helm: Any) -> None:
    objects = _render(
        helm,
        _merge(
            LMCACHE_DISK,
            {
                "vllm": {
                    "kvOffload": {
                        "cpuGiB": 8,
                        "lmcache": {"chunkSize": 512},
                        "disk": {
                            "sizeGiB": 200,
                            "path": "/var/cache/kv",
                            "existingClaim": "kv-nvme",
                        },
                    }
                }
            },
        ),
    )
    _validate_all(objects, "lmcache on a PVC")
    dep = _vllm(objects)
    c = container(dep, "vllm")
    env = _env(c)
    assert env["LMCACHE_LOCAL_DISK"] == "file:///var/cache/kv/"
    assert env["LMCACHE_MAX_LOCAL_DISK_SIZE"] == "200"
    assert env["LMCACHE_MAX_LOCAL_CPU_SIZE"] == "8"
    assert env["LMCACHE_CHUNK_SIZE"] == "512"
    assert _volumes(dep)["kv-cache"] == {
        "name": "kv-cache",
        "persistentVolumeClaim": {"claimName": "kv-nvme"},
    }
    assert {"mountPath": "/var/cache/kv", "name": "kv-cache"} in c["volumeMounts"]


# --- the memory rule ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_memory", "limit_memory", "cpu_gib", "want_request", "want_limit"),
    [
        ("24Gi", "32Gi", 16, "40Gi", "48Gi"),
        ("24576Mi", "32Gi", 8, "32Gi", "40Gi"),
        ("1000Mi", "1Ti", 1, "2024Mi", "1025Gi"),
        ("24Gi", None, 4, "28Gi", None),
    ],
)
def test_memory_is_raised_by_cpu_gib(
    helm: Any,
    request_memory: str,
    limit_memory: str | None,
    cpu_gib: int,
    want_request: str,
    want_limit: str | None,
) -> None:
    # null removes the chart's default (Helm's rule for user values)
    resources: dict[str, Any] = {
        "requests": {"cpu": "4", "memory": request_memory, "nvidia.com/gpu": 1},
        "limits": {"memory": limit_memory, "nvidia.com/gpu": 1},
    }
    objects = _render(
        helm,
        _merge(LMCACHE_CPU, {"vllm": {"resources": resources, "kvOffload": {"cpuGiB": cpu_gib}}}),
    )
    res = container(_vllm(objects), "vllm")["resources"]
    assert res["requests"]["memory"] == want_request
    assert res["limits"].get("memory") == want_limit
    assert res["requests"]["cpu"] == "4"


# --- invalid combinations fail, with their message -------------------------------------------

INVALID = {
    "disk-with-native": (
        _merge(NATIVE, {"vllm": {"kvOffload": {"disk": {"enabled": True}}}}),
        "vllm.kvOffload.disk.enabled needs vllm.kvOffload.backend=lmcache",
    ),
    "native-on-an-image-without-the-flags": (
        {"vllm": {"image": {"tag": "v0.11.0"}, "kvOffload": {"enabled": True}}},
        "set vllm.image.tag to v0.32.0 or later",
    ),
    "disk-path-over-tmp": (
        _merge(LMCACHE_DISK, {"vllm": {"kvOffload": {"disk": {"path": "/tmp/kv"}}}}),
        "overlaps the vLLM container's /tmp volume",
    ),
    "shared-claim-for-replicas": (
        _merge(
            LMCACHE_DISK,
            {"vllm": {"replicaCount": 2, "kvOffload": {"disk": {"existingClaim": "kv"}}}},
        ),
        "two LMCache instances must not share a disk tier",
    ),
    "memory-in-a-unit-the-chart-cannot-add-to": (
        _merge(LMCACHE_CPU, {"vllm": {"resources": {"requests": {"memory": "24G"}}}}),
        'vllm.resources.requests.memory is "24G"',
    ),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_combinations_fail_at_render(helm: Any, case: str) -> None:
    values, message = INVALID[case]
    assert message in _render_error(helm, values)


@pytest.mark.parametrize(
    ("values", "schema_says"),
    [
        ({"vllm": {"kvOffload": {"enabled": True, "cpuGiB": 0}}}, "minimum: got 0, want 1"),
        ({"vllm": {"kvOffload": {"enabled": True, "cpuGiB": 1.5}}}, "want integer"),
        (
            {"vllm": {"kvOffload": {"enabled": True, "backend": "mooncake"}}},
            "/vllm/kvOffload/backend",
        ),
        ({"vllm": {"kvOffload": {"disk": {"path": "kv-cache"}}}}, "/vllm/kvOffload/disk/path"),
        ({"vllm": {"kvOffload": {"sizeGiB": 4}}}, "sizeGiB"),
    ],
    ids=["cpu-0", "cpu-fraction", "unknown-backend", "relative-path", "misplaced-key"],
)
def test_schema_rejects_bad_kv_values(helm: Any, values: dict[str, Any], schema_says: str) -> None:
    """Helm validates values.schema.json before rendering (the SDK's render does too)."""
    message = _render_error(helm, values)
    assert "schema" in message and schema_says in message, message


@pytest.fixture(scope="module")
def chart_without_schema(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The chart minus values.schema.json: what `--skip-schema-validation` renders."""
    copy_dir = tmp_path_factory.mktemp("chart") / "tiermem"
    shutil.copytree(CHART_DIR, copy_dir)
    (copy_dir / "values.schema.json").unlink()
    return copy_dir


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"vllm": {"kvOffload": {"enabled": True, "backend": "lmcache", "cpuGiB": 0}}},
            "vllm.kvOffload.cpuGiB is 0: the CPU tier needs a whole number of GiB, at least 1",
        ),
        (
            {"vllm": {"kvOffload": {"enabled": True, "backend": "lmcache", "cpuGiB": 0.5}}},
            "vllm.kvOffload.cpuGiB is 0.5",
        ),
        (
            {"vllm": {"kvOffload": {"enabled": True, "backend": "mooncake"}}},
            'vllm.kvOffload.backend is "mooncake"',
        ),
        (
            _merge(LMCACHE_DISK, {"vllm": {"kvOffload": {"disk": {"sizeGiB": 0}}}}),
            "vllm.kvOffload.disk.sizeGiB is 0",
        ),
    ],
    ids=["cpu-0", "cpu-half", "unknown-backend", "disk-0"],
)
def test_template_checks_hold_without_the_schema(
    helm: Any, chart_without_schema: Path, values: dict[str, Any], message: str
) -> None:
    assert message in _render_error(helm, values, chart_without_schema)


def test_values_schema_types_the_kv_fields() -> None:
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    validator = jsonschema.Draft7Validator(schema)
    assert list(validator.iter_errors(values)) == []
    for path, bad in [
        ("cpuGiB", 0), ("cpuGiB", "16"), ("backend", "lmcache-mp"), ("enabled", "yes"),
        ("disk.sizeGiB", 0), ("disk.path", "/kv-cache/"), ("disk.existingClaim", "Bad_Name"),
        ("lmcache.chunkSize", 0), ("disk.medium", "Memory"),
    ]:  # fmt: skip
        broken = copy.deepcopy(values)
        node = broken["vllm"]["kvOffload"]
        *parents, leaf = path.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = bad
        assert list(validator.iter_errors(broken)), f"vllm.kvOffload.{path}={bad!r} accepted"


# --- the rendered flags, through vLLM's own parser ---------------------------------------------

_VLLM_PARSE = r"""
import json, sys
from types import SimpleNamespace
from vllm.config import CacheConfig, VllmConfig
from vllm.engine.arg_utils import EngineArgs
from vllm.entrypoints.cli.serve import ServeSubcommand
from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args
from vllm.utils.argparse_utils import FlexibleArgumentParser

root = FlexibleArgumentParser(prog="vllm")
ServeSubcommand().subparser_init(root.add_subparsers(dest="subparser"))
out = []
for argv in json.loads(sys.stdin.read()):
    try:
        ns = root.parse_args(["serve", *argv])
    except SystemExit:
        out.append({"rejected": True})
        continue
    validate_parsed_serve_args(ns)
    ns.model = ns.model_tag
    ea = EngineArgs.from_cli_args(ns)
    # what VllmConfig.__post_init__ makes of the offloading flags
    holder = SimpleNamespace(
        cache_config=CacheConfig(kv_offloading_size=ea.kv_offloading_size,
                                 kv_offloading_backend=ea.kv_offloading_backend),
        kv_transfer_config=ea.kv_transfer_config,
    )
    VllmConfig._post_init_kv_transfer_config(holder)
    ktc = holder.kv_transfer_config
    out.append({
        "rejected": False,
        "model": ea.model,
        "prefix_caching": ea.enable_prefix_caching,
        "connector": ktc.kv_connector if ktc else None,
        "role": ktc.kv_role if ktc else None,
        "extra": dict(ktc.kv_connector_extra_config) if ktc else None,
    })
print("RESULT " + json.dumps(out))
"""


def test_rendered_args_parse_with_vllm(rendered: dict[str, list[Manifest]]) -> None:
    if not VLLM_PY.is_file():
        pytest.skip(
            f"SKIPPED LOUDLY: {VLLM_PY} is absent (`make engine` installs vLLM 0.32.0 there): "
            "the rendered flags are NOT parsed by vLLM's argument parser"
        )
    argvs = [
        container(_vllm(rendered[c]), "vllm")["args"] for c in ("off", "native", "lmcache-disk")
    ]
    misspelt = [*argvs[1][:-1], "--kv-offload-size=16"]
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "ERROR", "VLLM_USE_SIMPLE_KV_OFFLOAD": "0"}
    proc = subprocess.run(
        [str(VLLM_PY), "-c", _VLLM_PARSE],
        input=json.dumps([*argvs, misspelt]),
        capture_output=True, text=True, timeout=110, check=False, env=env, cwd=REPO_ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    off, native, lmcache, bad = json.loads(line[len("RESULT ") :])
    for parsed in (off, native, lmcache):
        assert parsed["rejected"] is False
        assert parsed["model"] == "Qwen/Qwen2.5-7B-Instruct"
        assert parsed["prefix_caching"] is True
    assert off["connector"] is None
    assert native["connector"] == "OffloadingConnector"
    assert native["role"] == "kv_both"
    assert native["extra"] == {"cpu_bytes_to_use": 16 * (1 << 30)}
    assert lmcache["connector"] == "LMCacheConnectorV1"
    assert lmcache["role"] == "kv_both"
    assert bad == {"rejected": True}, "a misspelt flag must not pass vLLM's parser"


# --- kustomize components -----------------------------------------------------------------

COMPONENTS = ("vllm-kv-offload", "vllm-kv-offload-lmcache")


def _kustomize_or_skip() -> None:
    if kustomize_command() is None:
        pytest.skip(
            "SKIPPED LOUDLY: neither `kubectl` nor `kustomize` is on PATH: the "
            "vllm-kv-offload components are NOT built or validated"
        )


def _overlay_with(tmp: Path, component: str, on: str = "prod") -> list[Manifest]:
    """A throwaway overlay: `on` (an overlay of the repo) plus the component."""
    root = tmp / f"{on}-{component}"
    root.mkdir()
    (root / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(OVERLAYS_DIR / on, root)],
                "components": [os.path.relpath(COMPONENTS_DIR / component, root)],
            }
        )
    )
    return kustomize_build(root)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Manifest]]:
    _kustomize_or_skip()
    tmp = tmp_path_factory.mktemp("kv-overlays")
    return {
        "prod": kustomize_build(OVERLAYS_DIR / "prod"),
        **{c: _overlay_with(tmp, c) for c in COMPONENTS},
    }


def test_components_are_kustomize_components() -> None:
    for name in COMPONENTS:
        (doc,) = load_yaml_docs(COMPONENTS_DIR / name / "kustomization.yaml")
        assert doc["apiVersion"] == "kustomize.config.k8s.io/v1alpha1"
        assert doc["kind"] == "Component"


@pytest.mark.parametrize("component", COMPONENTS)
def test_component_objects_pass_strict_validation(
    built: dict[str, list[Manifest]], component: str
) -> None:
    assert _validate_all(built[component], f"prod + {component}") >= 10

    # the component changes the vLLM Deployment only
    def others(objs: list[Manifest]) -> list[Manifest]:
        return [
            o for o in objs if not (o["kind"] == "Deployment" and o["metadata"]["name"] == "vllm")
        ]

    assert others(built[component]) == others(built["prod"])


def _base_memory() -> tuple[int, int, int]:
    (base,) = load_yaml_docs(BASE_DIR / "vllm-deployment.yaml")
    res = container(base, "vllm")["resources"]
    shm = _volumes(base)["dshm"]["emptyDir"]["sizeLimit"]
    return _gib(res["requests"]["memory"]), _gib(res["limits"]["memory"]), _gib(shm)


def test_native_component(built: dict[str, list[Manifest]], helm: Any) -> None:
    prod_c = container(find(built["prod"], "Deployment", "vllm"), "vllm")
    dep = find(built["vllm-kv-offload"], "Deployment", "vllm")
    c = container(dep, "vllm")
    assert c["args"] == [
        *prod_c["args"],
        "--kv-offloading-backend=native",
        "--kv-offloading-size=16",
    ]
    assert c["image"] == f"vllm/vllm-openai:{CHECKED_VLLM_TAG}"
    assert c["env"] == prod_c["env"]
    request, limit, shm = _base_memory()
    assert c["resources"]["requests"]["memory"] == f"{request + 16}Gi"
    assert c["resources"]["limits"]["memory"] == f"{limit + 16}Gi"
    assert c["resources"]["requests"]["cpu"] == prod_c["resources"]["requests"]["cpu"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert _volumes(dep)["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": f"{shm + 16}Gi"}
    # the same as the chart renders for backend native
    chart_c = container(_vllm(_render(helm, NATIVE)), "vllm")
    assert _kv_args(c["args"]) == _kv_args(chart_c["args"])
    assert c["resources"] == chart_c["resources"]


def test_lmcache_component(built: dict[str, list[Manifest]], helm: Any) -> None:
    prod_dep = find(built["prod"], "Deployment", "vllm")
    prod_c = container(prod_dep, "vllm")
    dep = find(built["vllm-kv-offload-lmcache"], "Deployment", "vllm")
    c = container(dep, "vllm")
    assert c["args"][:-1] == prod_c["args"]
    assert _kv_transfer_config(c["args"]) == LMCACHE_CONFIG
    assert c["image"] == prod_c["image"], "the lmcache component leaves the image to the overlay"
    request, limit, _shm = _base_memory()
    assert c["resources"]["requests"]["memory"] == f"{request + 16}Gi"
    assert c["resources"]["limits"]["memory"] == f"{limit + 16}Gi"
    assert _volumes(dep)["dshm"] == _volumes(prod_dep)["dshm"]
    assert _volumes(dep)["kv-cache"] == {"name": "kv-cache", "emptyDir": {"sizeLimit": "55Gi"}}
    assert {"name": "kv-cache", "mountPath": "/kv-cache"} in c["volumeMounts"]
    # the vLLM settings of the base are all still there
    assert {e["name"] for e in prod_c["env"]} < {e["name"] for e in c["env"]}
    # the same as the chart renders for lmcache with its disk tier
    chart_dep = _vllm(_render(helm, LMCACHE_DISK))
    chart_c = container(chart_dep, "vllm")
    assert _lmcache_env(c) == _lmcache_env(chart_c)
    assert _kv_args(c["args"]) == _kv_args(chart_c["args"])
    assert c["resources"] == chart_c["resources"]
    assert _volumes(dep)["kv-cache"] == _volumes(chart_dep)["kv-cache"]


# --- the documentation --------------------------------------------------------------------


def test_readme_section() -> None:
    readme = (REPO_ROOT / "k8s" / "README.md").read_text()
    assert "## KV cache tiers for prewarmed prefixes" in readme
    section = readme.split("## KV cache tiers for prewarmed prefixes", 1)[1].split("\n## ", 1)[0]
    for needle in (
        "vllm.kvOffload.enabled", "--kv-offloading-size", "LMCacheConnectorV1",
        "LMCACHE_MAX_LOCAL_DISK_SIZE", "components/vllm-kv-offload", "not run on a GPU",
    ):  # fmt: skip
        assert needle in section, needle
