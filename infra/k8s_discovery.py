"""LLM replicas discovered from a Kubernetes Service's EndpointSlices.

``TIERMEM_LLM_URL=k8s://<namespace>/<service>:<port>`` names a Service in front
of the vLLM pods; its EndpointSlices (label ``kubernetes.io/service-name``)
list the pods' addresses. ``EndpointSliceDiscovery`` lists them, then watches
for changes, and hands the router ``http://<ip>:<port>/v1`` for every ready
endpoint, so replicas that scale up join and replicas that go away leave
without a restart. ``<port>`` is the pods' port: a number, or the name of a
port of the slices (``k8s://llm/vllm:http``).

The ``kubernetes`` client is blocking, so list and watch run in a daemon
thread; each new replica set reaches the event loop through
``call_soon_threadsafe``. API errors keep the last known set and retry with
backoff; an expired watch (HTTP 410) re-lists.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

SERVICE_LABEL = "kubernetes.io/service-name"
_URL = re.compile(
    r"^k8s://(?P<ns>[a-z0-9-]{1,63})/(?P<svc>[a-z0-9-]{1,63}):(?P<port>[a-z0-9-]{1,63})$"
)


@dataclass(frozen=True)
class K8sTarget:
    namespace: str
    service: str
    port: str  # a number, or the name of an EndpointSlice port
    scheme: str = "http"
    path: str = "/v1"

    @property
    def label_selector(self) -> str:
        return f"{SERVICE_LABEL}={self.service}"


def parse_k8s_url(url: str) -> K8sTarget:
    """``k8s://<namespace>/<service>:<port>`` -> ``K8sTarget``."""
    m = _URL.match(url.strip())
    if m is None:
        raise ValueError(
            f"bad LLM URL {url!r}: expected k8s://<namespace>/<service>:<port> "
            "(lower-case DNS names; port a number or a port name)"
        )
    return K8sTarget(namespace=m["ns"], service=m["svc"], port=m["port"])


def replica_urls(slices: Iterable[Mapping[str, Any]], target: K8sTarget) -> list[str]:
    """Base URLs of the ready endpoints of ``slices`` (EndpointSlice JSON objects), sorted."""
    urls: set[str] = set()
    for s in slices:
        port = _slice_port(s, target.port)
        if port is None:
            continue
        ipv6 = s.get("addressType") == "IPv6"
        for endpoint in s.get("endpoints") or ():
            # The API: a missing "ready" condition is to be read as ready.
            ready = ((endpoint.get("conditions") or {}).get("ready")) is not False
            if not ready:
                continue
            for address in endpoint.get("addresses") or ():
                host = f"[{address}]" if ipv6 else address
                urls.add(f"{target.scheme}://{host}:{port}{target.path}")
    return sorted(urls)


def _slice_port(s: Mapping[str, Any], wanted: str) -> int | None:
    if wanted.isdigit():
        return int(wanted)
    for p in s.get("ports") or ():
        if p.get("name") == wanted and p.get("port"):
            return int(p["port"])
    return None


class _WatchExpired(Exception):
    """The watch's resourceVersion is too old (HTTP 410): list again."""


class EndpointSliceDiscovery:
    """Keeps ``on_change`` fed with the replica URLs of one Service.

    ``on_change`` is called on the event loop that called ``start`` (never
    from the watch thread), only when the set changes. ``configuration`` is a
    ``kubernetes.client.Configuration``; None means the in-cluster service
    account (or, outside a cluster, the local kubeconfig).
    """

    def __init__(
        self,
        target: K8sTarget,
        on_change: Callable[[list[str]], None],
        *,
        configuration: Any = None,
        watch_timeout_s: int = 240,
        retry_s: float = 1.0,
        max_retry_s: float = 30.0,
    ) -> None:
        self.target = target
        self._on_change = on_change
        self._configuration = configuration
        self._watch_timeout_s = watch_timeout_s
        self._retry_s = retry_s
        self._max_retry_s = max_retry_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = asyncio.Event()
        self._published: list[str] | None = None
        self._response: Any = None  # the open watch response, to cut it on close
        self.replicas: list[str] = []

    @classmethod
    def from_url(
        cls, url: str, on_change: Callable[[list[str]], None], **kwargs: Any
    ) -> EndpointSliceDiscovery:
        return cls(parse_k8s_url(url), on_change, **kwargs)

    async def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        api = await asyncio.to_thread(self._build_api)
        self._thread = threading.Thread(
            target=self._run, args=(api,), daemon=True, name="tiermem-k8s-discovery"
        )
        self._thread.start()

    async def wait_ready(self, within_s: float) -> bool:
        """True once the first list has been applied (False if not within ``within_s``)."""
        try:
            await asyncio.wait_for(self._ready.wait(), within_s)
        except TimeoutError:
            return False
        return True

    async def aclose(self) -> None:
        self._stop.set()
        response = self._response
        if response is not None:
            # Unblocks the thread's read of the watch stream at once.
            response.shutdown()
        thread = self._thread
        if thread is not None:
            await asyncio.to_thread(thread.join, 5.0)
        self._thread = None

    # --- the watch thread ---------------------------------------------------------

    def _build_api(self) -> Any:
        from kubernetes import client, config

        configuration = self._configuration
        if configuration is None:
            configuration = client.Configuration()
            try:
                config.load_incluster_config(client_configuration=configuration)
            except config.ConfigException:
                config.load_kube_config(client_configuration=configuration)
        return client.DiscoveryV1Api(client.ApiClient(configuration))

    def _run(self, api: Any) -> None:
        delay = self._retry_s
        while not self._stop.is_set():
            try:
                slices, version = self._list(api)
                self._publish(slices)
                delay = self._retry_s
                while not self._stop.is_set():
                    version = self._watch(api, slices, version)
            except _WatchExpired:
                log.info("EndpointSlice watch expired, listing again")
                continue
            except Exception as e:
                if self._stop.is_set():
                    return
                log.warning(
                    "EndpointSlice discovery of %s/%s failed (%s); retrying in %.1f s",
                    self.target.namespace,
                    self.target.service,
                    e,
                    delay,
                )
                self._stop.wait(delay)
                delay = min(delay * 2, self._max_retry_s)

    def _list(self, api: Any) -> tuple[dict[str, dict[str, Any]], str]:
        resp = api.list_namespaced_endpoint_slice(
            self.target.namespace,
            label_selector=self.target.label_selector,
            _preload_content=False,
            _request_timeout=(5, 30),
        )
        try:
            body = json.loads(resp.data)
        finally:
            resp.release_conn()
        slices = {item["metadata"]["name"]: item for item in body.get("items") or ()}
        return slices, str(body.get("metadata", {}).get("resourceVersion", ""))

    def _watch(self, api: Any, slices: dict[str, dict[str, Any]], version: str) -> str:
        """One watch request, until the server ends it; returns the last resourceVersion."""
        from kubernetes.watch.watch import iter_resp_lines

        resp = api.list_namespaced_endpoint_slice(
            self.target.namespace,
            label_selector=self.target.label_selector,
            watch=True,
            allow_watch_bookmarks=True,
            resource_version=version,
            timeout_seconds=self._watch_timeout_s,
            _preload_content=False,
            # The server ends the watch after timeout_seconds; the read timeout
            # only catches a connection that went silent without closing.
            _request_timeout=(5, self._watch_timeout_s + 30),
        )
        self._response = resp
        try:
            if self._stop.is_set():
                return version
            for line in iter_resp_lines(resp):
                if not line.strip():
                    continue
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise _WatchExpired()
                    raise RuntimeError(f"watch error: {obj.get('message') or obj}")
                version = str(obj.get("metadata", {}).get("resourceVersion") or version)
                if kind == "BOOKMARK":
                    continue
                name = obj.get("metadata", {}).get("name")
                if kind in ("ADDED", "MODIFIED") and name:
                    slices[name] = obj
                elif kind == "DELETED" and name:
                    slices.pop(name, None)
                self._publish(slices)
        finally:
            self._response = None
            resp.release_conn()
        return version

    def _publish(self, slices: Mapping[str, Mapping[str, Any]]) -> None:
        urls = replica_urls(slices.values(), self.target)
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        # RuntimeError: the loop closed meanwhile, nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._apply, urls)

    def _apply(self, urls: list[str]) -> None:
        """On the event loop: hand a changed set to the router."""
        if urls != self._published:
            if self._published is not None:
                log.info("LLM replicas of %s: %s", self.target.service, urls or "none ready")
            self._published = urls
            self.replicas = urls
            self._on_change(urls)
        self._ready.set()
