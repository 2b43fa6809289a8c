"""Fixtures of the deployment tests: the built overlays and the CRD validators.

A check whose tool or schema is missing is skipped with that reason, never
passed silently.
"""

from __future__ import annotations

import pytest

from tests.deploy.manifests import (
    KEDA_CRD_DIR,
    OVERLAYS,
    OVERLAYS_DIR,
    CrdValidator,
    Overlay,
    crd_validator,
    kustomize_build,
    kustomize_command,
)


@pytest.fixture(scope="session")
def built_overlays() -> dict[str, Overlay]:
    if kustomize_command() is None:
        pytest.skip("neither `kubectl` nor `kustomize` is on PATH: the overlays cannot be built")
    return {name: Overlay(name, kustomize_build(OVERLAYS_DIR / name)) for name in OVERLAYS}


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest, built_overlays: dict[str, Overlay]) -> Overlay:
    return built_overlays[request.param]


@pytest.fixture(scope="session")
def keda_validators() -> dict[str, CrdValidator]:
    files = {
        "ScaledObject": KEDA_CRD_DIR / "keda.sh_scaledobjects.yaml",
        "TriggerAuthentication": KEDA_CRD_DIR / "keda.sh_triggerauthentications.yaml",
    }
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        pytest.skip(
            f"KEDA CRDs not found ({', '.join(missing)}): they come from the steering "
            "repo's shared/schemas/keda/, checked out beside this repository"
        )
    return {kind: crd_validator(path, "v1alpha1") for kind, path in files.items()}
