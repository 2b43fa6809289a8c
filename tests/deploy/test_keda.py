"""keda/: the ScaledObject and TriggerAuthentication against KEDA's CRD schemas
(from ../shared/schemas/keda/), and the scaling policy they express."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest

from tests.deploy.manifests import (
    BASE_DIR,
    KEDA_DIR,
    CrdValidator,
    Manifest,
    Overlay,
    load_yaml_docs,
)

# A scale-in drains a pod's SSE streams: at most this many pods per minute may go.
MAX_SCALE_IN_PODS_PER_MINUTE = 1.0
MIN_SCALE_DOWN_WINDOW_S = 300


def _keda_objects() -> list[Manifest]:
    docs: list[Manifest] = []
    for path in sorted(KEDA_DIR.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += load_yaml_docs(path)
    return docs


def _one(kind: str, objects: list[Manifest] | None = None) -> Manifest:
    (obj,) = [o for o in (objects or _keda_objects()) if o["kind"] == kind]
    return obj


def _base_drain_timeout_s() -> float:
    for line in (BASE_DIR / "tiermem.env").read_text().splitlines():
        if line.startswith("TIERMEM_DRAIN_TIMEOUT_S="):
            return float(line.split("=", 1)[1])
    raise AssertionError("TIERMEM_DRAIN_TIMEOUT_S not in k8s/base/tiermem.env")


def test_keda_kustomization_lists_every_file() -> None:
    (kustomization,) = load_yaml_docs(KEDA_DIR / "kustomization.yaml")
    files = {p.name for p in KEDA_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def test_keda_objects_validate_against_the_crds(keda_validators: dict[str, CrdValidator]) -> None:
    objects = _keda_objects()
    assert {o["kind"] for o in objects} == {"ScaledObject", "TriggerAuthentication"}
    for obj in objects:
        assert keda_validators[obj["kind"]].errors(obj) == [], obj["kind"]


def test_prod_overlay_keda_objects_validate(
    keda_validators: dict[str, CrdValidator], built_overlays: dict[str, Overlay]
) -> None:
    prod = built_overlays["prod"]
    for kind in ("ScaledObject", "TriggerAuthentication"):
        (obj,) = prod.all(kind)
        assert obj["metadata"]["namespace"] == prod.namespace
        assert keda_validators[kind].errors(obj) == [], kind


@pytest.mark.parametrize(
    ("mutate", "why"),
    [
        (
            lambda so: so["spec"]["advanced"].update(
                horizontalPodAutoscalerConfg=so["spec"]["advanced"].pop(
                    "horizontalPodAutoscalerConfig"
                )
            ),
            "misspelt field",
        ),
        (
            lambda so: so["spec"]["triggers"][0]["metadata"].update(threshold=24),
            "number, not string",
        ),
        (lambda so: so["spec"].pop("scaleTargetRef"), "required field"),
        (lambda so: so["spec"].update(minReplicaCount="2"), "string, not integer"),
    ],
    ids=["misspelt", "threshold-number", "no-target", "min-string"],
)
def test_crd_validation_rejects_mistakes(
    keda_validators: dict[str, CrdValidator], mutate: Any, why: str
) -> None:
    broken = copy.deepcopy(_one("ScaledObject"))
    mutate(broken)
    assert keda_validators["ScaledObject"].errors(broken), why


def test_scaled_object_targets_the_tiermem_deployment() -> None:
    (deployment,) = load_yaml_docs(BASE_DIR / "deployment.yaml")
    target = _one("ScaledObject")["spec"]["scaleTargetRef"]
    assert target["kind"] == "Deployment"
    assert target.get("apiVersion", "apps/v1") == "apps/v1"
    assert target["name"] == deployment["metadata"]["name"]


def test_triggers_scale_on_turns_per_pod_and_sessions_per_pod() -> None:
    triggers = _one("ScaledObject")["spec"]["triggers"]
    assert all(t["type"] == "prometheus" for t in triggers)
    queries = {t["name"]: t["metadata"]["query"] for t in triggers}
    turns = [q for q in queries.values() if "tiermem_turns_in_flight" in q]
    assert len(turns) == 1 and "tiermem_turns_queued" in turns[0]
    assert turns[0].replace(" ", "").startswith("sum(")
    assert any("tiermem_active_sessions" in q for q in queries.values())
    for t in triggers:
        # AverageValue: the summed query divided by the replica count, i.e. per pod.
        assert t.get("metricType", "AverageValue") == "AverageValue"
        assert float(t["metadata"]["threshold"]) > 0
        assert t["metadata"]["serverAddress"].startswith(("http://", "https://"))


def test_queries_select_the_namespace_they_are_deployed_in(
    built_overlays: dict[str, Overlay],
) -> None:
    prod = built_overlays["prod"]
    (scaled,) = prod.all("ScaledObject")
    for t in scaled["spec"]["triggers"]:
        namespaces = set(re.findall(r'namespace="([^"]+)"', t["metadata"]["query"]))
        assert namespaces == {prod.namespace}, t["name"]


def test_triggers_authenticate_with_a_matching_trigger_authentication() -> None:
    auth = _one("TriggerAuthentication")
    params = {ref["parameter"] for ref in auth["spec"]["secretTargetRef"]}
    needs = {"bearer": {"bearerToken"}, "basic": {"username", "password"}}
    for t in _one("ScaledObject")["spec"]["triggers"]:
        modes = [m.strip() for m in t["metadata"].get("authModes", "").split(",") if m.strip()]
        if not modes:
            continue
        assert t["authenticationRef"]["name"] == auth["metadata"]["name"]
        assert t["authenticationRef"].get("kind", "TriggerAuthentication") == auth["kind"]
        for mode in modes:
            assert needs[mode] <= params, f"{t['name']}: {mode} needs {needs[mode]}"


def test_replica_bounds_keep_a_pod_to_drain_into() -> None:
    spec = _one("ScaledObject")["spec"]
    assert spec["minReplicaCount"] >= 2
    assert spec["maxReplicaCount"] > spec["minReplicaCount"]
    assert spec["cooldownPeriod"] > 0
    fallback = spec["fallback"]
    assert spec["minReplicaCount"] <= fallback["replicas"] <= spec["maxReplicaCount"]


def test_scale_down_is_slow_and_scale_up_is_not() -> None:
    behavior = _one("ScaledObject")["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    down = behavior["scaleDown"]
    assert down["stabilizationWindowSeconds"] >= MIN_SCALE_DOWN_WINDOW_S
    # With several policies the HPA takes the one allowing the most change
    # unless told to take the least.
    if len(down["policies"]) > 1:
        assert down["selectPolicy"] == "Min"
    assert down.get("selectPolicy") != "Disabled"
    rates = []
    for policy in down["policies"]:
        assert policy["type"] == "Pods", "a percentage grows with the fleet"
        rates.append(policy["value"] * 60.0 / policy["periodSeconds"])
    assert min(rates) <= MAX_SCALE_IN_PODS_PER_MINUTE
    # One scale-in step per drain: a pod finishes draining before the next goes.
    assert all(p["periodSeconds"] >= _base_drain_timeout_s() for p in down["policies"])

    up = behavior["scaleUp"]
    assert up["stabilizationWindowSeconds"] < down["stabilizationWindowSeconds"]
    assert min(p["periodSeconds"] for p in up["policies"]) < min(
        p["periodSeconds"] for p in down["policies"]
    )
