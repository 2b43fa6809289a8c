"""What the deployment tests share: where the artifacts live, building kustomize
overlays, reading workloads out of the built objects, and the two validators
(kubernetes-validate for core kinds, CRD openAPIV3Schemas for KEDA and Gateway API).
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from jsonschema.protocols import Validator
from kubernetes_validate import utils as kv

Manifest = dict[str, Any]

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = REPO_ROOT / "k8s"
BASE_DIR = K8S_DIR / "base"
COMPONENTS_DIR = K8S_DIR / "components"
OVERLAYS_DIR = K8S_DIR / "overlays"
KEDA_DIR = REPO_ROOT / "keda"
CHART_DIR = K8S_DIR / "helm" / "tiermem"
# CI runs in a fresh clone with the steering repo's shared/ beside it.
SHARED_SCHEMAS_DIR = REPO_ROOT.parent / "shared" / "schemas"
KEDA_CRD_DIR = SHARED_SCHEMAS_DIR / "keda"
# Gateway API's experimental-channel CRDs (sessionPersistence is experimental):
# in shared/ when the steering repo carries them, or wherever this variable says.
GATEWAY_API_CRD_DIR = Path(
    os.environ.get("TIERMEM_GATEWAY_API_CRD_DIR", str(SHARED_SCHEMAS_DIR / "gateway-api"))
)

OVERLAYS = ("dev", "prod")
# The oldest Kubernetes the manifests promise to work on (native preStop sleep
# is on by default from 1.30) and the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.30.0", kv.latest_version())

# Kinds that Kubernetes itself does not define: validated against their CRDs.
CRD_FILES = {
    ("keda.sh/v1alpha1", "ScaledObject"): KEDA_CRD_DIR / "keda.sh_scaledobjects.yaml",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): KEDA_CRD_DIR
    / "keda.sh_triggerauthentications.yaml",
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): GATEWAY_API_CRD_DIR
    / "gateway.networking.k8s.io_httproutes.yaml",
}

WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job")


class ToolMissingError(Exception):
    """A command-line tool the check needs is not installed."""


# --- building ---------------------------------------------------------------------


def kustomize_command() -> list[str] | None:
    """`kubectl kustomize`, else a standalone `kustomize build`, else None."""
    kubectl = shutil.which("kubectl")
    if kubectl:
        return [kubectl, "kustomize"]
    kustomize = shutil.which("kustomize")
    if kustomize:
        return [kustomize, "build"]
    return None


def kustomize_build(path: Path) -> list[Manifest]:
    cmd = kustomize_command()
    if cmd is None:
        raise ToolMissingError("neither kubectl nor kustomize is on PATH")
    proc = subprocess.run(
        [*cmd, str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} {path} failed:\n{proc.stderr}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def load_yaml_docs(path: Path) -> list[Manifest]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


@dataclass(frozen=True)
class Overlay:
    name: str
    objects: list[Manifest]

    @property
    def namespace(self) -> str:
        (ns,) = [o["metadata"]["name"] for o in self.objects if o["kind"] == "Namespace"]
        return str(ns)

    def find(self, kind: str, name: str) -> Manifest:
        return find(self.objects, kind, name)

    def all(self, kind: str) -> list[Manifest]:
        return [o for o in self.objects if o["kind"] == kind]

    def has(self, kind: str, name: str | None = None) -> bool:
        return any(
            o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
            for o in self.objects
        )


def find(objects: list[Manifest], kind: str, name: str) -> Manifest:
    hits = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected one {kind}/{name}, found {len(hits)}"
    return hits[0]


# --- reading workloads -------------------------------------------------------------


def pod_spec(workload: Manifest) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def pod_labels(workload: Manifest) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"].get("labels", {})
    return labels


def container(workload: Manifest, name: str) -> dict[str, Any]:
    hits = [c for c in pod_spec(workload)["containers"] if c["name"] == name]
    assert len(hits) == 1, f"{workload['metadata']['name']}: no single container {name!r}"
    return hits[0]


def all_containers(workload: Manifest) -> Iterator[dict[str, Any]]:
    spec = pod_spec(workload)
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def selector_matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


@dataclass(frozen=True)
class SecretRef:
    name: str
    key: str
    optional: bool


def effective_env(objects: list[Manifest], workload: Manifest, name: str) -> dict[str, Any]:
    """The container's environment as the kubelet assembles it: envFrom first,
    then env on top; values from Secrets stay SecretRef (their content is not here)."""
    c = container(workload, name)
    env: dict[str, Any] = {}
    for source in c.get("envFrom", []):
        ref = source.get("configMapRef")
        assert ref is not None, f"unsupported envFrom source {source}"
        env.update(find(objects, "ConfigMap", ref["name"]).get("data", {}))
    for item in c.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        elif "secretKeyRef" in item["valueFrom"]:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = SecretRef(ref["name"], ref["key"], bool(ref.get("optional")))
        elif "configMapKeyRef" in item["valueFrom"]:
            ref = item["valueFrom"]["configMapKeyRef"]
            env[item["name"]] = find(objects, "ConfigMap", ref["name"])["data"][ref["key"]]
        else:
            env[item["name"]] = item["valueFrom"]
    return env


def volume_for_mount(workload: Manifest, mount_path: str, container_name: str) -> dict[str, Any]:
    mounts = [
        m
        for m in container(workload, container_name).get("volumeMounts", [])
        if m["mountPath"] == mount_path
    ]
    assert len(mounts) == 1, f"nothing mounted at {mount_path}"
    (volume,) = [v for v in pod_spec(workload)["volumes"] if v["name"] == mounts[0]["name"]]
    return dict(volume)


# --- durations ---------------------------------------------------------------------

_GATEWAY_DURATION = re.compile(r"^(?:[0-9]{1,5}(?:h|m|s|ms)){1,4}$")
_DURATION_PART = re.compile(r"([0-9]{1,5})(h|ms|m|s)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def gateway_duration_seconds(value: str) -> float:
    """A Gateway API duration (GEP-2257: "10m", "1h30m", "500ms") in seconds."""
    if not _GATEWAY_DURATION.match(value):
        raise ValueError(f"not a Gateway API duration: {value!r}")
    return sum(int(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(value))


# --- validation: core kinds ---------------------------------------------------------


def k8s_validate(obj: Manifest, version: str) -> None:
    """kubernetes-validate in strict mode: unknown fields are errors, as with
    `kubectl apply --validate=strict`. Raises kv.ValidationError or
    kv.SchemaNotFoundError."""
    kv.validate(copy.deepcopy(obj), version, strict=True)


# --- validation: custom resources ----------------------------------------------------


def _strict(schema: Any) -> Any:
    """An openAPIV3Schema made strict like the API server's field validation:
    an object that lists its properties, and neither allows extra ones nor
    preserves unknown fields, rejects fields it does not list (a CRD schema
    alone would let jsonschema accept a misspelt field that the API server
    then drops)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@dataclass(frozen=True)
class CrdValidator:
    api_version: str
    kind: str
    validator: Validator

    def errors(self, obj: Manifest) -> list[str]:
        problems: list[str] = []
        if obj.get("apiVersion") != self.api_version or obj.get("kind") != self.kind:
            problems.append(
                f"apiVersion/kind {obj.get('apiVersion')}/{obj.get('kind')} is not "
                f"{self.api_version}/{self.kind}"
            )
        for err in sorted(self.validator.iter_errors(obj), key=lambda e: list(e.path)):
            path = ".".join(str(p) for p in err.path) or "<root>"
            problems.append(f"{path}: {err.message}")
        return problems


def crd_validator(crd_file: Path, version: str) -> CrdValidator:
    """A validator for one served version of a CustomResourceDefinition file."""
    (crd,) = [d for d in load_yaml_docs(crd_file) if d.get("kind") == "CustomResourceDefinition"]
    group = crd["spec"]["group"]
    kind = crd["spec"]["names"]["kind"]
    (ver,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = _strict(ver["schema"]["openAPIV3Schema"])
    validator_cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    return CrdValidator(f"{group}/{version}", kind, validator_cls(schema))


def crd_validator_for(obj: Manifest) -> CrdValidator | None:
    """The validator for a custom resource, or None when its CRD file is absent."""
    key = (obj["apiVersion"], obj["kind"])
    crd_file = CRD_FILES[key]
    if not crd_file.is_file():
        return None
    return crd_validator(crd_file, obj["apiVersion"].rsplit("/", 1)[1])
