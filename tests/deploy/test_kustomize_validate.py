"""Every object of every overlay against the Kubernetes API schemas.

Core kinds go through kubernetes-validate in strict mode (unknown fields are
errors) for the oldest and newest Kubernetes the manifests target; custom
resources (ScaledObject, TriggerAuthentication, HTTPRoute) through their CRDs'
openAPIV3Schema, or are skipped by name with the reason when a CRD is absent.
"""

from __future__ import annotations

import copy

import pytest
from kubernetes_validate import utils as kv

from tests.deploy.manifests import (
    CRD_FILES,
    GATEWAY_API_CRD_DIR,
    K8S_VERSIONS,
    Overlay,
    container,
    crd_validator_for,
    k8s_validate,
)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_objects_pass_strict_schema_validation(overlay: Overlay, version: str) -> None:
    failures: list[str] = []
    custom: set[tuple[str, str]] = set()
    validated = 0
    for obj in overlay.objects:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        try:
            k8s_validate(obj, version)
            validated += 1
        except kv.SchemaNotFoundError:
            custom.add((obj["apiVersion"], obj["kind"]))
        except kv.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            failures.append(f"{name}: {path}: {e.message}")
    assert not failures, f"{overlay.name} @ {version}:\n" + "\n".join(failures)
    # Only the known custom resources may bypass this check; they have their own.
    assert custom <= set(CRD_FILES), f"kinds no schema knows: {custom - set(CRD_FILES)}"
    assert validated >= 10, f"only {validated} objects validated in {overlay.name}"


def test_strict_validation_rejects_unknown_and_mistyped_fields(overlay: Overlay) -> None:
    """The check above can fail: a misspelt field and a wrong type are caught."""
    good = overlay.find("Deployment", "tiermem")
    k8s_validate(good, K8S_VERSIONS[-1])

    misspelt = copy.deepcopy(good)
    container(misspelt, "tiermem")["readinessProbe"]["httpGet"]["pathh"] = "/readyz"
    with pytest.raises(kv.ValidationError):
        k8s_validate(misspelt, K8S_VERSIONS[-1])

    mistyped = copy.deepcopy(good)
    mistyped["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "330s"
    with pytest.raises(kv.ValidationError):
        k8s_validate(mistyped, K8S_VERSIONS[-1])


@pytest.mark.parametrize(
    ("api_version", "kind"), sorted(CRD_FILES), ids=[k for _, k in sorted(CRD_FILES)]
)
def test_custom_resources_pass_their_crd_schemas(
    built_overlays: dict[str, Overlay], api_version: str, kind: str
) -> None:
    objects = [
        o
        for overlay in built_overlays.values()
        for o in overlay.objects
        if (o["apiVersion"], o["kind"]) == (api_version, kind)
    ]
    assert objects, f"no overlay has a {kind}: the prod overlay should"
    crd_file = CRD_FILES[(api_version, kind)]
    if not crd_file.is_file():
        pytest.skip(f"{kind} not validated: its CRD {crd_file} is absent")
    for obj in objects:
        validator = crd_validator_for(obj)
        assert validator is not None
        assert validator.errors(obj) == [], f"{kind}/{obj['metadata']['name']}"


def test_httproute_crd_check_rejects_a_misspelt_field(built_overlays: dict[str, Overlay]) -> None:
    """The HTTPRoute check can fail: a misspelt sessionPersistence field is caught
    (a CRD schema alone would let it through and the API server would drop it)."""
    route = built_overlays["prod"].find("HTTPRoute", "tiermem")
    validator = crd_validator_for(route)
    if validator is None:
        pytest.skip(
            "Gateway API experimental-channel CRD gateway.networking.k8s.io_httproutes.yaml "
            f"not found in {GATEWAY_API_CRD_DIR} (set TIERMEM_GATEWAY_API_CRD_DIR, or add it "
            "to shared/schemas/gateway-api/)"
        )
    broken = copy.deepcopy(route)
    broken["spec"]["rules"][0]["sessionPersistence"]["sessionNmae"] = "typo"
    assert any("sessionNmae" in e for e in validator.errors(broken))
    broken = copy.deepcopy(route)
    broken["spec"]["rules"][0]["timeouts"]["request"] = "10 minutes"
    assert validator.errors(broken)
