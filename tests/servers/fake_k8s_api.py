"""A small real HTTP server speaking the Kubernetes EndpointSlice list and watch API.

Serves ``GET /apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices`` with
``labelSelector`` (equality terms), as a list, or with ``watch=true`` as a
chunked stream of JSON lines (ADDED / MODIFIED / DELETED) from a
``resourceVersion`` on, ending after ``timeoutSeconds``. Tests change the
slices from their own thread (``apply``, ``delete``); ``compact`` forgets the
event history so a watch from an old version gets the API's 410 ERROR event;
``partition`` holds events back from open watches, ``drop_watches`` ends them;
``fail_lists`` answers the next lists with 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.servers.fake_vllm import ThreadedUvicorn

SERVICE_LABEL = "kubernetes.io/service-name"


def endpoint_slice(
    name: str,
    service: str,
    endpoints: Iterable[tuple[str, bool | None]],
    *,
    namespace: str = "default",
    port: int = 8000,
    port_name: str = "http",
    address_type: str = "IPv4",
) -> dict[str, Any]:
    """An EndpointSlice object; ``endpoints`` are (address, ready) with None = unset."""
    eps = []
    for address, ready in endpoints:
        ep: dict[str, Any] = {"addresses": [address]}
        if ready is not None:
            ep["conditions"] = {"ready": ready}
        eps.append(ep)
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {SERVICE_LABEL: service},
        },
        "addressType": address_type,
        "endpoints": eps,
        "ports": [{"name": port_name, "port": port, "protocol": "TCP"}],
    }


@dataclass
class _Event:
    version: int
    namespace: str
    type: str
    object: dict[str, Any]


def _matches(obj: dict[str, Any], selector: str) -> bool:
    labels = obj.get("metadata", {}).get("labels") or {}
    for term in filter(None, selector.split(",")):
        key, _, value = term.replace("==", "=").partition("=")
        if labels.get(key.strip()) != value.strip():
            return False
    return True


class FakeK8sAPI:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._slices: dict[tuple[str, str], dict[str, Any]] = {}
        self._history: list[_Event] = []
        self._version = 100
        self._compacted = 0
        self._failing_lists = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Event | None = None
        self._watch_generation = 0
        self._partitioned = False
        self._stopping = False
        self.list_calls = 0
        self.watch_calls = 0
        self._server = ThreadedUvicorn(
            Starlette(
                routes=[
                    Route(
                        "/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices",
                        self._endpointslices,
                        methods=["GET"],
                    )
                ]
            )
        )

    @property
    def url(self) -> str:
        return f"http://{self._server.host}:{self._server.port}"

    def start(self) -> FakeK8sAPI:
        self._server.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
        self._wake()
        self._server.stop()

    # --- test controls (any thread) ------------------------------------------------------

    def apply(self, obj: dict[str, Any]) -> None:
        """Create or replace an EndpointSlice."""
        meta = obj["metadata"]
        key = (meta["namespace"], meta["name"])
        with self._lock:
            self._version += 1
            obj = json.loads(json.dumps(obj))
            obj["metadata"]["resourceVersion"] = str(self._version)
            kind = "MODIFIED" if key in self._slices else "ADDED"
            self._slices[key] = obj
            self._history.append(_Event(self._version, key[0], kind, obj))
        self._wake()

    def delete(self, name: str, namespace: str = "default") -> None:
        with self._lock:
            obj = self._slices.pop((namespace, name))
            self._version += 1
            obj = {**obj, "metadata": {**obj["metadata"], "resourceVersion": str(self._version)}}
            self._history.append(_Event(self._version, namespace, "DELETED", obj))
        self._wake()

    def compact(self) -> None:
        """Forget the event history: watches from older versions get 410 Gone."""
        with self._lock:
            self._history.clear()
            self._compacted = self._version

    def partition(self) -> None:
        """Open watches stop delivering events (as if the network held them back)."""
        with self._lock:
            self._partitioned = True

    def drop_watches(self) -> None:
        """End every open watch and heal a partition (clients re-watch from their version)."""
        with self._lock:
            self._watch_generation += 1
            self._partitioned = False
        self._wake()

    def fail_lists(self, times: int) -> None:
        with self._lock:
            self._failing_lists = times

    def _wake(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the server's loop just closed
                loop.call_soon_threadsafe(self._notify)

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
        self._changed = asyncio.Event()

    # --- the API -------------------------------------------------------------------------

    async def _endpointslices(self, request: Request) -> Response:
        self._loop = asyncio.get_running_loop()
        if self._changed is None:
            self._changed = asyncio.Event()
        namespace = request.path_params["namespace"]
        selector = request.query_params.get("labelSelector", "")
        if request.query_params.get("watch") in ("true", "1"):
            with self._lock:
                self.watch_calls += 1
            since = int(request.query_params.get("resourceVersion") or 0)
            timeout = float(request.query_params.get("timeoutSeconds") or 1800)
            return StreamingResponse(
                self._watch(namespace, selector, since, timeout), media_type="application/json"
            )
        with self._lock:
            self.list_calls += 1
            if self._failing_lists > 0:
                self._failing_lists -= 1
                return JSONResponse(
                    {"kind": "Status", "status": "Failure", "message": "injected", "code": 500},
                    status_code=500,
                )
            items = [
                obj
                for (ns, _), obj in sorted(self._slices.items())
                if ns == namespace and _matches(obj, selector)
            ]
            version = self._version
        return JSONResponse(
            {
                "kind": "EndpointSliceList",
                "apiVersion": "discovery.k8s.io/v1",
                "metadata": {"resourceVersion": str(version)},
                "items": items,
            }
        )

    async def _watch(
        self, namespace: str, selector: str, since: int, duration_s: float
    ) -> AsyncIterator[bytes]:
        deadline = time.monotonic() + duration_s
        with self._lock:
            generation = self._watch_generation
            expired = since < self._compacted
        if expired:
            status = {
                "kind": "Status",
                "apiVersion": "v1",
                "status": "Failure",
                "message": f"too old resource version: {since} ({self._compacted})",
                "reason": "Expired",
                "code": 410,
            }
            yield (json.dumps({"type": "ERROR", "object": status}) + "\n").encode()
            return
        sent = since
        while True:
            changed = self._changed
            assert changed is not None
            with self._lock:
                stop = self._stopping or self._watch_generation != generation
                held = self._partitioned or stop
                pending = [] if held else [e for e in self._history if e.version > sent]
            for e in pending:
                sent = e.version
                if e.namespace == namespace and _matches(e.object, selector):
                    yield (json.dumps({"type": e.type, "object": e.object}) + "\n").encode()
            remaining = deadline - time.monotonic()
            if stop or remaining <= 0:
                return
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                return
