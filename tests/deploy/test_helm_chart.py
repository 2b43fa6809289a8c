"""k8s/helm/tiermem: the chart's values against values.schema.json, the values
documented field by field, the templates consistent with the values and helpers,
and the chart in agreement with the kustomize base (image, ports, probes,
annotations, drain timing, routing, autoscaling).

`helm lint` and `helm template` run only where a helm binary is on PATH: no
package registry reachable from the development machine ships one (Debian
bookworm has no helm package; PyPI has bindings only), see k8s/README.md.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import tomllib
from typing import Any

import jsonschema
import pytest
import yaml

from tests.deploy.manifests import (
    BASE_DIR,
    CHART_DIR,
    COMPONENTS_DIR,
    K8S_VERSIONS,
    KEDA_DIR,
    OVERLAYS_DIR,
    REPO_ROOT,
    CrdValidator,
    find,
    k8s_validate,
    load_yaml_docs,
)

TEMPLATES = CHART_DIR / "templates"


@pytest.fixture(scope="module")
def values() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    return loaded


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((CHART_DIR / "values.schema.json").read_text())
    return loaded


@pytest.fixture(scope="module")
def chart() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    return loaded


def _base(kind: str, name: str, file: str) -> dict[str, Any]:
    return find(load_yaml_docs(BASE_DIR / file), kind, name)


def _base_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for line in (BASE_DIR / "tiermem.env").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, value = line.split("=", 1)
            env[key] = value
    return env


# --- Chart.yaml and values.schema.json ---------------------------------------------------


def test_chart_metadata(chart: dict[str, Any]) -> None:
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "tiermem"
    assert chart["type"] == "application"
    assert re.fullmatch(r"\d+\.\d+\.\d+", chart["version"])
    with (REPO_ROOT / "pyproject.toml").open("rb") as f:
        assert chart["appVersion"] == tomllib.load(f)["project"]["version"]


def test_values_match_the_schema(values: dict[str, Any], schema: dict[str, Any]) -> None:
    jsonschema.Draft7Validator.check_schema(schema)
    errors = [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(values)]
    assert errors == []


def _set(tree: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(tree)
    node = out
    *parents, leaf = path.split(".")
    for key in parents:
        node = node[key]
    node[leaf] = value
    return out


@pytest.mark.parametrize(
    ("path", "bad"),
    [
        ("replicaCount", 0),
        ("imageTag", "x"),  # an unknown top-level key
        ("securityContext.runAsNonRoot", False),
        ("securityContext.allowPrivilegeEscalation", True),
        ("config.auth", "maybe"),
        ("config.redisUrl", "http://redis:6379"),
        ("probes.readiness.path", "readyz"),
        ("httpRoute.timeouts.request", "10 minutes"),
        ("httpRoute.sessionPersistence.type", "IP"),
        ("keda.behavior.scaleDown.periodSeconds", 3600),
        ("config.extra", {"lower_case": "x"}),
        ("resources.limits.memory", "lots"),
    ],
)
def test_schema_rejects_bad_values(
    values: dict[str, Any], schema: dict[str, Any], path: str, bad: Any
) -> None:
    broken = _set(values, path, bad)
    assert list(jsonschema.Draft7Validator(schema).iter_errors(broken)), f"{path}={bad!r}"


def _schema_paths(node: dict[str, Any], prefix: str = "") -> set[str]:
    paths: set[str] = set()
    for key, sub in node.get("properties", {}).items():
        path = f"{prefix}{key}"
        paths.add(path)
        if sub.get("type") == "object" and sub.get("additionalProperties") is False:
            paths |= _schema_paths(sub, path + ".")
    return paths


def _value_paths(node: dict[str, Any], schema_node: dict[str, Any], prefix: str = "") -> set[str]:
    paths: set[str] = set()
    for key, value in node.items():
        path = f"{prefix}{key}"
        paths.add(path)
        sub = schema_node.get("properties", {}).get(key, {})
        if isinstance(value, dict) and sub.get("additionalProperties") is False:
            paths |= _value_paths(value, sub, path + ".")
    return paths


def test_schema_and_values_cover_the_same_fields(
    values: dict[str, Any], schema: dict[str, Any]
) -> None:
    """Every documented value has a type, and every typed field has a default."""
    in_schema = _schema_paths(schema)
    in_values = _value_paths(values, schema)
    assert in_schema - in_values == set(), "typed in the schema, missing from values.yaml"
    assert in_values - in_schema == set(), "in values.yaml, missing from the schema"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _inside_list_item(lines: list[str], n: int) -> bool:
    """Whether line n continues a `- ` list item (its parent line starts with a dash)."""
    for prev in range(n - 1, -1, -1):
        text = lines[prev]
        if not text.strip() or text.strip().startswith("#"):
            continue
        if _indent(text) < _indent(lines[n]):
            return text.strip().startswith("- ")
    return False


def test_values_are_documented_field_by_field() -> None:
    """Every key of values.yaml has a comment right above it or on its line
    (keys inside list items are documented by the list's own key)."""
    key_line = re.compile(r'^(\s*)("[^"]+"|[A-Za-z0-9_./-]+):(\s|$)')
    undocumented: list[str] = []
    lines = (CHART_DIR / "values.yaml").read_text().splitlines()
    for n, line in enumerate(lines):
        m = key_line.match(line)
        if not m:
            continue
        if "#" in line.split(":", 1)[1] or _inside_list_item(lines, n):
            continue
        prev = n - 1
        while prev >= 0 and not lines[prev].strip():
            prev -= 1
        if prev >= 0 and lines[prev].strip().startswith("#"):
            continue
        undocumented.append(f"line {n + 1}: {line.strip()}")
    assert undocumented == []


# --- templates, without helm -------------------------------------------------------------


def _templates() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(TEMPLATES.iterdir()) if p.is_file()}


def _values_has(values: dict[str, Any], path: list[str]) -> bool:
    node: Any = values
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def test_templates_only_read_values_that_exist(values: dict[str, Any]) -> None:
    missing = []
    for name, text in _templates().items():
        for path in re.findall(r"\$?\.Values\.([A-Za-z0-9_.]+)", text):
            if not _values_has(values, path.rstrip(".").split(".")):
                missing.append(f"{name}: .Values.{path}")
    assert missing == []


def test_templates_include_only_defined_helpers() -> None:
    templates = _templates()
    defined = set(re.findall(r'define\s+"([^"]+)"', templates["_helpers.tpl"]))
    used: set[str] = set()
    for text in templates.values():
        used |= set(re.findall(r'(?:include|template)\s+"([^"]+)"', text))
    assert used - defined == set()
    assert {"tiermem.fullname", "tiermem.labels", "tiermem.selectorLabels"} <= used


def test_template_actions_and_blocks_are_balanced() -> None:
    for name, text in _templates().items():
        assert text.count("{{") == text.count("}}"), name
        actions = re.findall(r"\{\{-?\s*(\w+)", text)
        opened = sum(a in ("if", "range", "with", "define", "block") for a in actions)
        assert opened == actions.count("end"), name


def test_every_object_template_uses_the_shared_labels() -> None:
    for name, text in _templates().items():
        if not name.endswith(".yaml"):
            continue
        for obj in re.split(r"^---$", text, flags=re.M):
            if "\nkind:" not in "\n" + obj:
                continue
            assert re.search(r'include "tiermem\.(vllm\.)?(common)?[lL]abels"', obj), name


def test_deployment_template_checks_the_drain_budget() -> None:
    helpers = _templates()["_helpers.tpl"]
    assert "terminationGracePeriodSeconds" in helpers and "fail" in helpers
    assert _templates()["deployment.yaml"].lstrip().startswith('{{- include "tiermem.validate"')


# --- the chart agrees with the kustomize base ---------------------------------------------


def test_image_and_ports_agree(values: dict[str, Any], chart: dict[str, Any]) -> None:
    dep = _base("Deployment", "tiermem", "deployment.yaml")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    repo, tag = c["image"].rsplit(":", 1)
    assert values["image"]["repository"] == repo
    assert (values["image"]["tag"] or chart["appVersion"]) == tag
    assert [p["containerPort"] for p in c["ports"]] == [values["containerPort"]]
    svc = _base("Service", "tiermem", "service.yaml")
    assert [p["port"] for p in svc["spec"]["ports"]] == [values["service"]["port"]]
    assert c["args"][c["args"].index("--port") + 1] == str(values["containerPort"])


def test_probes_and_drain_agree(values: dict[str, Any]) -> None:
    dep = _base("Deployment", "tiermem", "deployment.yaml")
    spec = dep["spec"]["template"]["spec"]
    c = spec["containers"][0]
    for probe in ("startup", "readiness", "liveness"):
        base = c[f"{probe}Probe"]
        mine = values["probes"][probe]
        assert base["httpGet"]["path"] == mine["path"], probe
        for key in ("periodSeconds", "timeoutSeconds", "failureThreshold"):
            assert base[key] == mine[key], f"{probe}.{key}"
    assert c["lifecycle"]["preStop"]["sleep"]["seconds"] == values["preStopSleepSeconds"]
    assert spec["terminationGracePeriodSeconds"] == values["terminationGracePeriodSeconds"]
    assert float(_base_env()["TIERMEM_DRAIN_TIMEOUT_S"]) == values["config"]["drainTimeoutS"]
    assert (
        values["terminationGracePeriodSeconds"]
        > values["preStopSleepSeconds"] + values["config"]["drainTimeoutS"]
    )


def test_pod_settings_agree(values: dict[str, Any]) -> None:
    dep = _base("Deployment", "tiermem", "deployment.yaml")
    template = dep["spec"]["template"]
    c = template["spec"]["containers"][0]
    assert template["metadata"]["annotations"] == values["podAnnotations"]
    assert c["resources"] == values["resources"]
    assert c["securityContext"] == values["securityContext"]
    assert template["spec"]["securityContext"] == values["podSecurityContext"]
    keys = {t["topologyKey"] for t in template["spec"]["topologySpreadConstraints"]}
    assert keys == set(values["topologySpread"]["topologyKeys"])
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    assert volumes["data"]["emptyDir"]["sizeLimit"] == values["dataDirSizeLimit"]
    assert volumes["tmp"]["emptyDir"]["sizeLimit"] == values["tmpDirSizeLimit"]
    pdb = _base("PodDisruptionBudget", "tiermem", "pdb.yaml")
    assert pdb["spec"]["maxUnavailable"] == values["pdb"]["maxUnavailable"]


def test_settings_agree(values: dict[str, Any]) -> None:
    env = _base_env()
    config = values["config"]
    assert env["TIERMEM_LOG_FORMAT"] == config["logFormat"]
    assert env["TIERMEM_LOG_LEVEL"] == config["logLevel"]
    assert env["TIERMEM_AUTH"] == config["auth"]
    assert float(env["TIERMEM_HEARTBEAT_S"]) == config["heartbeatS"]
    assert env["TIERMEM_LLM_MODEL"] == config["llmModel"]
    assert env["TIERMEM_EMBEDDINGS"] == config["embeddings"]
    assert env["OMP_NUM_THREADS"] == config["extra"]["OMP_NUM_THREADS"]
    # The chart's defaults are the prod overlay's stores.
    (prod,) = load_yaml_docs(OVERLAYS_DIR / "prod" / "kustomization.yaml")
    literals = dict(
        item.split("=", 1) for gen in prod["configMapGenerator"] for item in gen["literals"]
    )
    assert literals["TIERMEM_MILVUS_URI"] == config["milvusUri"]
    (patch,) = load_yaml_docs(OVERLAYS_DIR / "prod" / "tiermem-prod.yaml")
    (redis,) = [
        e
        for e in patch["spec"]["template"]["spec"]["containers"][0]["env"]
        if e["name"] == "TIERMEM_REDIS_URL"
    ]
    assert redis["valueFrom"]["secretKeyRef"]["key"] == values["secrets"]["redisUrlKey"]
    assert redis["valueFrom"]["secretKeyRef"]["name"] == values["secrets"]["name"]


def test_vllm_agrees(values: dict[str, Any]) -> None:
    dep = _base("Deployment", "vllm", "vllm-deployment.yaml")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    vllm = values["vllm"]
    assert c["image"] == f"{vllm['image']['repository']}:{vllm['image']['tag']}"
    args = c["args"]
    assert args[0] == vllm["model"]
    assert f"--max-model-len={vllm['maxModelLen']}" in args
    (gpu,) = [a.split("=", 1)[1] for a in args if a.startswith("--gpu-memory-utilization=")]
    assert float(gpu) == vllm["gpuMemoryUtilization"]
    assert f"--served-model-name={values['config']['llmModel']}" in args
    assert c["resources"] == vllm["resources"]
    pvc = _base("PersistentVolumeClaim", "vllm-models", "vllm-pvc.yaml")
    assert pvc["spec"]["resources"]["requests"]["storage"] == vllm["persistence"]["size"]
    assert pvc["spec"]["accessModes"] == vllm["persistence"]["accessModes"]
    deployment_template = _templates()["vllm-deployment.yaml"]
    for flag in ("--enable-prefix-caching", "--enable-prompt-tokens-details"):
        assert flag in args and flag in deployment_template


def test_routing_agrees(values: dict[str, Any]) -> None:
    (ingress,) = load_yaml_docs(COMPONENTS_DIR / "ingress-nginx" / "ingress.yaml")
    assert ingress["metadata"]["annotations"] == values["ingress"]["annotations"]
    assert ingress["spec"]["ingressClassName"] == values["ingress"]["className"]
    (route,) = load_yaml_docs(COMPONENTS_DIR / "gateway-api" / "httproute.yaml")
    (rule,) = route["spec"]["rules"]
    assert rule["sessionPersistence"] == values["httpRoute"]["sessionPersistence"]
    assert rule["timeouts"] == values["httpRoute"]["timeouts"]
    assert route["spec"]["hostnames"] == values["httpRoute"]["hostnames"]
    refs = [{k: r[k] for k in ("name", "namespace")} for r in route["spec"]["parentRefs"]]
    assert refs == values["httpRoute"]["parentRefs"]


def test_autoscaling_agrees(values: dict[str, Any]) -> None:
    (scaled,) = load_yaml_docs(KEDA_DIR / "scaledobject.yaml")
    (auth,) = load_yaml_docs(KEDA_DIR / "triggerauthentication.yaml")
    spec = scaled["spec"]
    keda = values["keda"]
    for key in ("minReplicaCount", "maxReplicaCount", "pollingInterval", "cooldownPeriod"):
        assert spec[key] == keda[key], key
    assert spec["fallback"]["replicas"] == keda["fallback"]["replicas"]
    assert spec["fallback"]["failureThreshold"] == keda["fallback"]["failureThreshold"]
    thresholds = {t["name"]: float(t["metadata"]["threshold"]) for t in spec["triggers"]}
    assert thresholds == {
        "turns-per-pod": keda["turnsPerPod"],
        "sessions-per-pod": keda["sessionsPerPod"],
    }
    assert {t["metadata"]["serverAddress"] for t in spec["triggers"]} == {
        keda["prometheus"]["serverAddress"]
    }
    (ref,) = auth["spec"]["secretTargetRef"]
    assert {"name": ref["name"], "key": ref["key"]} == keda["prometheus"]["authSecret"]
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    down, up = behavior["scaleDown"], behavior["scaleUp"]
    assert (
        down["stabilizationWindowSeconds"]
        == keda["behavior"]["scaleDown"]["stabilizationWindowSeconds"]
    )
    assert down["policies"] == [
        {
            "type": "Pods",
            "value": keda["behavior"]["scaleDown"]["podsPerPeriod"],
            "periodSeconds": keda["behavior"]["scaleDown"]["periodSeconds"],
        }
    ]
    mine_up = keda["behavior"]["scaleUp"]
    assert up["stabilizationWindowSeconds"] == mine_up["stabilizationWindowSeconds"]
    assert sorted((p["type"], p["value"], p["periodSeconds"]) for p in up["policies"]) == sorted(
        [
            ("Percent", mine_up["percentPerPeriod"], mine_up["periodSeconds"]),
            ("Pods", mine_up["podsPerPeriod"], mine_up["periodSeconds"]),
        ]
    )


# --- with helm: lint and render ------------------------------------------------------------

ALL_ON = [
    "--set", "ingress.enabled=true",
    "--set", "httpRoute.enabled=true",
    "--set", "keda.enabled=true",
]  # fmt: skip


def _helm() -> str:
    helm = shutil.which("helm")
    if helm is None:
        pytest.skip(
            "no `helm` binary on PATH (none can be installed from apt or PyPI on the "
            "development machine; see k8s/README.md): lint and render not run"
        )
    return helm


def _helm_template(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [helm, "template", "tiermem", str(CHART_DIR), "--namespace", "tiermem", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_helm_lint_strict() -> None:
    helm = _helm()
    for extra in ([], ALL_ON):
        proc = subprocess.run(
            [helm, "lint", "--strict", str(CHART_DIR), *extra],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_helm_template_renders_valid_objects(keda_validators: dict[str, CrdValidator]) -> None:
    helm = _helm()
    proc = _helm_template(helm, *ALL_ON)
    assert proc.returncode == 0, proc.stderr
    objects = [d for d in yaml.safe_load_all(proc.stdout) if d]
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "Service", "PodDisruptionBudget", "ConfigMap", "Ingress"} <= kinds
    assert {"HTTPRoute", "ScaledObject", "TriggerAuthentication"} <= kinds
    for obj in objects:
        if obj["kind"] in keda_validators:
            assert keda_validators[obj["kind"]].errors(obj) == []
        elif obj["kind"] != "HTTPRoute":
            for version in K8S_VERSIONS:
                k8s_validate(obj, version)
    dep = find(objects, "Deployment", "tiermem")
    assert "replicas" not in dep["spec"], "KEDA owns the count"
    base = _base("Deployment", "tiermem", "deployment.yaml")
    rendered_c = dep["spec"]["template"]["spec"]["containers"][0]
    base_c = base["spec"]["template"]["spec"]["containers"][0]
    for key in ("args", "ports", "startupProbe", "readinessProbe", "livenessProbe", "lifecycle"):
        assert rendered_c[key] == base_c[key], key


@pytest.mark.parametrize(
    "args",
    [
        ["--set", "terminationGracePeriodSeconds=100"],
        ["--set", "secrets.redisUrlKey="],
        ["--set", "config.milvusUri=", "--set", "replicaCount=3"],
    ],
    ids=["grace-too-short", "no-redis", "milvus-lite-with-replicas"],
)
def test_helm_template_refuses_unsafe_values(args: list[str]) -> None:
    proc = _helm_template(_helm(), *args)
    assert proc.returncode != 0


def test_readme_explains_missing_helm() -> None:
    readme = (REPO_ROOT / "k8s" / "README.md").read_text()
    assert "helm" in readme.lower() and "PyPI" in readme and "apt" in readme
