"""What the built overlays must guarantee beyond schema validity: probes, the
drain sequence, pod security, settings the app understands, LLM discovery,
storage per overlay and sticky routing."""

from __future__ import annotations

import os
import re
import tomllib
from typing import Any

import pytest

from infra.k8s_discovery import parse_k8s_url
from infra.settings import Settings
from tests.deploy.manifests import (
    REPO_ROOT,
    WORKLOAD_KINDS,
    Overlay,
    SecretRef,
    all_containers,
    container,
    effective_env,
    gateway_duration_seconds,
    pod_labels,
    pod_spec,
    selector_matches,
    volume_for_mount,
)

APP_PORT = 8000
# Volume types the "restricted" Pod Security Standard allows.
RESTRICTED_VOLUME_TYPES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
    "persistentVolumeClaim", "projected", "secret",
}  # fmt: skip


def _tiermem(overlay: Overlay) -> dict[str, Any]:
    return overlay.find("Deployment", "tiermem")


def _env(overlay: Overlay) -> dict[str, Any]:
    return effective_env(overlay.objects, _tiermem(overlay), "tiermem")


def _drain_timeout_s(overlay: Overlay) -> float:
    raw = _env(overlay).get("TIERMEM_DRAIN_TIMEOUT_S")
    if raw is None:
        return float(Settings.model_fields["drain_timeout_s"].default)
    return float(raw)


def _workloads(overlay: Overlay) -> list[dict[str, Any]]:
    return [o for o in overlay.objects if o["kind"] in WORKLOAD_KINDS]


def _http_port(workload: dict[str, Any], container_name: str, port: int | str) -> int:
    """A probe's or Service's port, named or numbered, as the container's number."""
    ports = container(workload, container_name).get("ports", [])
    if isinstance(port, int):
        assert any(p["containerPort"] == port for p in ports), f"no container port {port}"
        return port
    (hit,) = [p["containerPort"] for p in ports if p.get("name") == port]
    return int(hit)


# --- probes and drain ----------------------------------------------------------------


def test_probes_hit_the_app_endpoints(overlay: Overlay) -> None:
    dep = _tiermem(overlay)
    c = container(dep, "tiermem")
    expected = {
        "readinessProbe": "/readyz",
        "livenessProbe": "/healthz",
        "startupProbe": "/healthz",
    }
    for probe, path in expected.items():
        get = c[probe]["httpGet"]
        assert get["path"] == path, probe
        assert _http_port(dep, "tiermem", get["port"]) == APP_PORT, probe
    # The startup probe must give a slow start (model load) real time.
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60


def test_termination_outlasts_prestop_sleep_plus_drain(overlay: Overlay) -> None:
    dep = _tiermem(overlay)
    sleep = container(dep, "tiermem")["lifecycle"]["preStop"]["sleep"]["seconds"]
    # Endpoint removal must reach the proxies before SIGTERM.
    assert sleep >= 5
    grace = pod_spec(dep)["terminationGracePeriodSeconds"]
    drain = _drain_timeout_s(overlay)
    assert grace > sleep + drain, f"grace {grace} <= preStop {sleep} + drain {drain}"


def test_container_runs_tiermem_serve_on_the_app_port(overlay: Overlay) -> None:
    c = container(_tiermem(overlay), "tiermem")
    assert "command" not in c, "the image's ENTRYPOINT (tiermem) must stay in charge"
    args = c["args"]
    assert args[0] == "serve"
    assert args[args.index("--port") + 1] == str(APP_PORT)
    assert args[args.index("--host") + 1] == "0.0.0.0"


def test_rollout_never_drops_below_the_wanted_count(overlay: Overlay) -> None:
    strategy = _tiermem(overlay)["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxUnavailable"] in (0, "0%")


# --- security ------------------------------------------------------------------------


def test_every_pod_meets_the_restricted_pod_security_standard(overlay: Overlay) -> None:
    ns = overlay.find("Namespace", overlay.namespace)
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for workload in _workloads(overlay):
        name = workload["metadata"]["name"]
        spec = pod_spec(workload)
        pod_sc = spec.get("securityContext", {})
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(flag), f"{name}: {flag}"
        for v in spec.get("volumes", []):
            types = set(v) - {"name"}
            assert types <= RESTRICTED_VOLUME_TYPES, f"{name}: volume {v['name']} is {types}"
        for c in all_containers(workload):
            sc = c.get("securityContext", {})
            where = f"{name}/{c['name']}"
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, where
            assert sc.get("runAsUser", pod_sc.get("runAsUser", 1)) != 0, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert not sc.get("privileged"), where
            assert "ALL" in sc.get("capabilities", {}).get("drop", []), where
            assert not sc.get("capabilities", {}).get("add"), where
            seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
            assert seccomp.get("type") in ("RuntimeDefault", "Localhost"), where


def test_tiermem_root_filesystem_is_read_only_with_writable_scratch(overlay: Overlay) -> None:
    dep = _tiermem(overlay)
    c = container(dep, "tiermem")
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert isinstance(pod_spec(dep)["securityContext"]["runAsUser"], int)
    data_dir = _env(overlay)["TIERMEM_DATA_DIR"]
    assert "emptyDir" in volume_for_mount(dep, data_dir, "tiermem")
    assert "emptyDir" in volume_for_mount(dep, "/tmp", "tiermem")


def test_every_container_has_requests_and_a_memory_limit(overlay: Overlay) -> None:
    for workload in _workloads(overlay):
        for c in all_containers(workload):
            res = c.get("resources", {})
            where = f"{workload['metadata']['name']}/{c['name']}"
            assert {"cpu", "memory"} <= set(res.get("requests", {})), where
            assert "memory" in res.get("limits", {}), where


def test_tiermem_pods_spread_over_zones_and_nodes(overlay: Overlay) -> None:
    dep = _tiermem(overlay)
    constraints = pod_spec(dep)["topologySpreadConstraints"]
    keys = {c["topologyKey"] for c in constraints}
    assert {"topology.kubernetes.io/zone", "kubernetes.io/hostname"} <= keys
    for c in constraints:
        assert selector_matches(c["labelSelector"]["matchLabels"], pod_labels(dep))


# --- services, PDB, metrics ------------------------------------------------------------


def test_every_service_selects_pods_on_a_declared_port(overlay: Overlay) -> None:
    for svc in overlay.all("Service"):
        selector = svc["spec"]["selector"]
        targets = [w for w in _workloads(overlay) if selector_matches(selector, pod_labels(w))]
        assert len(targets) == 1, f"Service {svc['metadata']['name']} selects {len(targets)}"
        (workload,) = targets
        for port in svc["spec"]["ports"]:
            first = pod_spec(workload)["containers"][0]["name"]
            _http_port(workload, first, port["targetPort"])


def test_pdb_covers_tiermem_and_lets_a_pod_drain(overlay: Overlay) -> None:
    dep = _tiermem(overlay)
    pdb = overlay.find("PodDisruptionBudget", "tiermem")
    assert selector_matches(pdb["spec"]["selector"]["matchLabels"], pod_labels(dep))
    # minAvailable equal to the replica count would block every node drain.
    assert "minAvailable" not in pdb["spec"]
    assert int(pdb["spec"]["maxUnavailable"]) >= 1


def test_pods_are_annotated_for_prometheus_scraping(overlay: Overlay) -> None:
    annotations = _tiermem(overlay)["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == APP_PORT
    assert annotations["prometheus.io/path"] == "/metrics"


def test_image_tag_is_the_package_version(overlay: Overlay) -> None:
    with (REPO_ROOT / "pyproject.toml").open("rb") as f:
        version = tomllib.load(f)["project"]["version"]
    image = container(_tiermem(overlay), "tiermem")["image"]
    assert image.rsplit(":", 1)[1] == version


# --- settings ------------------------------------------------------------------------


def test_settings_are_known_and_parse(overlay: Overlay, monkeypatch: pytest.MonkeyPatch) -> None:
    env = _env(overlay)
    fields = {f"TIERMEM_{name.upper()}" for name in Settings.model_fields}
    unknown = {k for k in env if k.startswith("TIERMEM_")} - fields
    assert not unknown, f"settings the app does not have: {unknown}"
    # Parse the plain values exactly as the pod will (secret values are not here).
    for name in [n for n in os.environ if n.startswith("TIERMEM_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("TIERMEM_") and isinstance(value, str):
            monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.log_format == "json"
    assert str(settings.data_dir) == "/var/lib/tiermem"


def test_api_keys_file_is_the_mounted_secret_when_auth_is_on(overlay: Overlay) -> None:
    env = _env(overlay)
    dep = _tiermem(overlay)
    if env.get("TIERMEM_AUTH", "on") == "off":
        assert overlay.name == "dev", "auth may be off in the dev overlay only"
        return
    path = env["TIERMEM_API_KEYS_FILE"]
    mount_dir, file_name = path.rsplit("/", 1)
    volume = volume_for_mount(dep, mount_dir, "tiermem")
    secret = volume["secret"]
    assert not secret.get("optional"), "a missing key file must stop the pod, not disable auth"
    assert file_name in [item["path"] for item in secret["items"]]


def test_secrets_come_from_secret_refs(overlay: Overlay) -> None:
    env = _env(overlay)
    for name in ("TIERMEM_MILVUS_TOKEN", "TIERMEM_LLM_API_KEY"):
        assert isinstance(env.get(name), SecretRef), f"{name} must come from a Secret"
    # A password inside a URL belongs in the Secret, not the ConfigMap.
    url_with_password = re.compile(r"^[a-z+]+://[^/@]*:[^/@]+@")
    for name, value in env.items():
        if isinstance(value, str):
            assert not url_with_password.match(value), f"{name} holds a credential"


# --- the LLM -------------------------------------------------------------------------


def test_llm_url_discovers_the_vllm_service_with_rbac(overlay: Overlay) -> None:
    env = _env(overlay)
    # Parsed by the app's own parser, so the format cannot drift from it.
    target = parse_k8s_url(env["TIERMEM_LLM_URL"])
    namespace, service, port = target.namespace, target.service, target.port
    assert namespace == overlay.namespace, "TIERMEM_LLM_URL names another namespace"
    svc = overlay.find("Service", service)
    # A number is taken as the pod's port as it is; a name is looked up in the
    # EndpointSlices, which carry the Service's port names: prefer the name.
    assert port in [p.get("name") for p in svc["spec"]["ports"]], "use the Service port name"

    dep = _tiermem(overlay)
    account = pod_spec(dep)["serviceAccountName"]
    assert overlay.has("ServiceAccount", account)
    allowed: set[str] = set()
    for binding in overlay.all("RoleBinding"):
        subjects = binding.get("subjects", [])
        if not any(
            s["kind"] == "ServiceAccount"
            and s["name"] == account
            and s.get("namespace") == overlay.namespace
            for s in subjects
        ):
            continue
        role = overlay.find(binding["roleRef"]["kind"], binding["roleRef"]["name"])
        for rule in role["rules"]:
            if "discovery.k8s.io" in rule["apiGroups"] and "endpointslices" in rule["resources"]:
                allowed |= set(rule["verbs"])
    assert {"list", "watch"} <= allowed


def test_vllm_serves_with_prefix_caching_on_a_gpu(overlay: Overlay) -> None:
    vllm = overlay.find("Deployment", "vllm")
    c = container(vllm, "vllm")
    argv = c.get("command", []) + c.get("args", [])
    assert argv[:2] == ["vllm", "serve"]
    assert "--enable-prefix-caching" in argv
    assert "--enable-prompt-tokens-details" in argv
    served = [a.split("=", 1)[1] for a in argv if a.startswith("--served-model-name=")]
    assert served == [_env(overlay)["TIERMEM_LLM_MODEL"]]
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    models = volume_for_mount(vllm, "/models", "vllm")
    assert overlay.has("PersistentVolumeClaim", models["persistentVolumeClaim"]["claimName"])
    assert volume_for_mount(vllm, "/dev/shm", "vllm")["emptyDir"]["medium"] == "Memory"
    # A ReadWriteOnce weights volume cannot be mounted by the old and new pod at once.
    assert vllm["spec"]["strategy"]["type"] == "Recreate"


# --- storage per overlay ---------------------------------------------------------------


def test_dev_runs_redis_with_aof_and_one_pod(built_overlays: dict[str, Overlay]) -> None:
    dev = built_overlays["dev"]
    redis = dev.find("StatefulSet", "redis")
    args = container(redis, "redis")["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert redis["spec"]["volumeClaimTemplates"], "AOF needs a persistent volume"
    env = _env(dev)
    m = re.fullmatch(r"redis://([^:/]+):(\d+)/\d+", env["TIERMEM_REDIS_URL"])
    assert m and dev.has("Service", m.group(1))
    svc = dev.find("Service", m.group(1))
    assert int(m.group(2)) in [p["port"] for p in svc["spec"]["ports"]]
    assert selector_matches(svc["spec"]["selector"], pod_labels(redis))
    # Milvus Lite inside the pod: one process per file, so one pod and no autoscaler.
    assert "TIERMEM_MILVUS_URI" not in env
    assert _tiermem(dev)["spec"]["replicas"] == 1
    assert not dev.all("ScaledObject")


def test_prod_uses_external_stores_and_leaves_replicas_to_keda(
    built_overlays: dict[str, Overlay],
) -> None:
    prod = built_overlays["prod"]
    env = _env(prod)
    assert not prod.all("StatefulSet"), "prod Redis/Milvus come from operators or managed services"
    redis_url = env["TIERMEM_REDIS_URL"]
    assert isinstance(redis_url, SecretRef) and not redis_url.optional
    assert env["TIERMEM_MILVUS_URI"].startswith(("http://", "https://"))
    (scaled,) = prod.all("ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == "tiermem"
    assert "replicas" not in _tiermem(prod)["spec"], "an applied replica count fights KEDA"


# --- sticky routing --------------------------------------------------------------------


def test_each_overlay_has_one_sticky_route(overlay: Overlay) -> None:
    routes = overlay.all("Ingress") + overlay.all("HTTPRoute")
    assert len(routes) == 1


def test_ingress_nginx_hashes_sessions_and_streams(built_overlays: dict[str, Overlay]) -> None:
    with_ingress = [o for o in built_overlays.values() if o.all("Ingress")]
    assert with_ingress, "no overlay uses the ingress-nginx component"
    for overlay in with_ingress:
        ingress = overlay.find("Ingress", "tiermem")
        a = ingress["metadata"]["annotations"]
        prefix = "nginx.ingress.kubernetes.io/"
        assert a[prefix + "upstream-hash-by"] == "$http_x_session_id"
        assert a[prefix + "proxy-buffering"] == "off"
        drain = _drain_timeout_s(overlay)
        assert int(a[prefix + "proxy-read-timeout"]) > drain
        assert int(a[prefix + "proxy-send-timeout"]) > drain
        backends = [
            p["backend"]["service"] for r in ingress["spec"]["rules"] for p in r["http"]["paths"]
        ]
        assert backends == [{"name": "tiermem", "port": {"name": "http"}}]


def test_httproute_persists_sessions_and_allows_long_streams(
    built_overlays: dict[str, Overlay],
) -> None:
    with_route = [o for o in built_overlays.values() if o.all("HTTPRoute")]
    assert with_route, "no overlay uses the gateway-api component"
    for overlay in with_route:
        route = overlay.find("HTTPRoute", "tiermem")
        assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
        drain = _drain_timeout_s(overlay)
        for rule in route["spec"]["rules"]:
            persistence = rule["sessionPersistence"]
            assert persistence["type"] == "Cookie"
            assert persistence["sessionName"]
            for key in ("request", "backendRequest"):
                assert gateway_duration_seconds(rule["timeouts"][key]) > drain, key
            refs = [(b["name"], b["port"]) for b in rule["backendRefs"]]
            assert refs == [("tiermem", APP_PORT)]


def test_gateway_duration_parser() -> None:
    assert gateway_duration_seconds("10m") == 600
    assert gateway_duration_seconds("1h30m") == 5400
    assert gateway_duration_seconds("250ms") == 0.25
    with pytest.raises(ValueError):
        gateway_duration_seconds("10 minutes")
