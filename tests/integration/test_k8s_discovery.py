"""Replica discovery from EndpointSlices, against a real HTTP server speaking the K8s API."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
from kubernetes import client as k8s_client

from infra.k8s_discovery import EndpointSliceDiscovery, K8sTarget, parse_k8s_url, replica_urls
from infra.llm import LLMDone, OpenAICompatibleLLM, build_llm, collect
from infra.routing import RendezvousRouter
from infra.settings import Settings
from tests.servers.fake_k8s_api import FakeK8sAPI, endpoint_slice
from tests.servers.fake_vllm import FakeVLLM

TARGET = K8sTarget(namespace="llm", service="vllm", port="8000")


def test_parse_k8s_url() -> None:
    assert parse_k8s_url("k8s://llm/vllm:8000") == TARGET
    assert parse_k8s_url("k8s://llm/vllm:http").port == "http"
    assert parse_k8s_url("k8s://llm/vllm:8000").label_selector == (
        "kubernetes.io/service-name=vllm"
    )
    for bad in ("k8s://llm/vllm", "http://llm/vllm:8000", "k8s://LLM/vllm:80", "k8s://a/b:c/d"):
        with pytest.raises(ValueError, match="k8s://"):
            parse_k8s_url(bad)


def test_replica_urls_keep_ready_endpoints_only() -> None:
    slices = [
        endpoint_slice("a", "vllm", [("10.0.0.2", True), ("10.0.0.1", None), ("10.0.0.3", False)]),
        endpoint_slice("b", "vllm", [("fd00::5", True)], address_type="IPv6", port=9000),
    ]
    assert replica_urls(slices, TARGET) == [
        "http://10.0.0.1:8000/v1",
        "http://10.0.0.2:8000/v1",
        "http://[fd00::5]:8000/v1",
    ]
    named = K8sTarget(namespace="llm", service="vllm", port="http")
    assert replica_urls(slices, named) == [
        "http://10.0.0.1:8000/v1",
        "http://10.0.0.2:8000/v1",
        "http://[fd00::5]:9000/v1",
    ]
    missing = K8sTarget(namespace="llm", service="vllm", port="grpc")
    assert replica_urls(slices, missing) == []


@pytest.fixture
def k8s_api() -> Iterator[FakeK8sAPI]:
    api = FakeK8sAPI().start()
    yield api
    api.stop()


def configuration(api: FakeK8sAPI) -> k8s_client.Configuration:
    cfg = k8s_client.Configuration()
    cfg.host = api.url
    return cfg


@pytest.fixture
async def discovered(
    k8s_api: FakeK8sAPI,
) -> AsyncIterator[tuple[EndpointSliceDiscovery, RendezvousRouter, list[list[str]]]]:
    router = RendezvousRouter()
    calls: list[list[str]] = []

    def on_change(urls: list[str]) -> None:
        calls.append(urls)
        router.set_replicas(urls)

    discovery = EndpointSliceDiscovery(
        TARGET, on_change, configuration=configuration(k8s_api), retry_s=0.05
    )
    yield discovery, router, calls
    await discovery.aclose()


async def eventually(check: Callable[[], bool], within_s: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not check():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_lists_then_follows_changes(
    k8s_api: FakeK8sAPI,
    discovered: tuple[EndpointSliceDiscovery, RendezvousRouter, list[list[str]]],
) -> None:
    discovery, router, calls = discovered
    k8s_api.apply(
        endpoint_slice("vllm-a", "vllm", [("10.0.0.1", True), ("10.0.0.9", False)], namespace="llm")
    )
    k8s_api.apply(endpoint_slice("other", "other-svc", [("10.9.9.9", True)], namespace="llm"))
    k8s_api.apply(endpoint_slice("vllm-x", "vllm", [("10.8.8.8", True)], namespace="elsewhere"))
    await discovery.start()
    assert await discovery.wait_ready(3.0)
    assert router.replicas == ["http://10.0.0.1:8000/v1"]
    # a pod becomes ready
    k8s_api.apply(
        endpoint_slice("vllm-a", "vllm", [("10.0.0.1", True), ("10.0.0.9", True)], namespace="llm")
    )
    await eventually(lambda: len(router.replicas) == 2)
    # a second slice of the same service
    k8s_api.apply(endpoint_slice("vllm-b", "vllm", [("10.0.1.1", True)], namespace="llm"))
    await eventually(lambda: "http://10.0.1.1:8000/v1" in router.replicas)
    # the first slice goes away
    k8s_api.delete("vllm-a", namespace="llm")
    await eventually(lambda: router.replicas == ["http://10.0.1.1:8000/v1"])
    # other services and namespaces never leaked in, and no duplicate updates were sent
    assert all("10.9.9.9" not in u and "10.8.8.8" not in u for c in calls for u in c)
    assert all(a != b for a, b in itertools.pairwise(calls))
    assert discovery.replicas == router.replicas


async def test_expired_watch_lists_again(
    k8s_api: FakeK8sAPI,
    discovered: tuple[EndpointSliceDiscovery, RendezvousRouter, list[list[str]]],
) -> None:
    discovery, router, _ = discovered
    k8s_api.apply(endpoint_slice("vllm-a", "vllm", [("10.0.0.1", True)], namespace="llm"))
    await discovery.start()
    assert await discovery.wait_ready(3.0)
    await eventually(lambda: k8s_api.watch_calls >= 1)
    lists_before = k8s_api.list_calls
    # A change the watch never saw, then the history is compacted past it:
    # the re-watch from the client's version gets 410 and the client re-lists.
    k8s_api.partition()
    k8s_api.apply(endpoint_slice("vllm-a", "vllm", [("10.0.0.2", True)], namespace="llm"))
    k8s_api.compact()
    await asyncio.sleep(0.1)
    assert router.replicas == ["http://10.0.0.1:8000/v1"]
    k8s_api.drop_watches()
    await eventually(lambda: router.replicas == ["http://10.0.0.2:8000/v1"])
    assert k8s_api.list_calls == lists_before + 1


async def test_api_errors_are_retried(
    k8s_api: FakeK8sAPI,
    discovered: tuple[EndpointSliceDiscovery, RendezvousRouter, list[list[str]]],
) -> None:
    discovery, router, _ = discovered
    k8s_api.apply(endpoint_slice("vllm-a", "vllm", [("10.0.0.1", True)], namespace="llm"))
    k8s_api.fail_lists(2)
    await discovery.start()
    assert await discovery.wait_ready(3.0)
    assert router.replicas == ["http://10.0.0.1:8000/v1"]
    assert k8s_api.list_calls == 3


async def test_aclose_returns_promptly_while_watching(
    k8s_api: FakeK8sAPI,
    discovered: tuple[EndpointSliceDiscovery, RendezvousRouter, list[list[str]]],
) -> None:
    discovery, _, _ = discovered
    await discovery.start()
    assert await discovery.wait_ready(3.0)
    await eventually(lambda: k8s_api.watch_calls >= 1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await discovery.aclose()
    assert loop.time() - started < 1.0


async def test_llm_client_streams_from_discovered_replicas(k8s_api: FakeK8sAPI) -> None:
    fake = FakeVLLM().start()
    try:
        target = K8sTarget(namespace="llm", service="vllm", port=str(fake.port))
        router = RendezvousRouter()
        discovery = EndpointSliceDiscovery(
            target, router.set_replicas, configuration=configuration(k8s_api)
        )
        k8s_api.apply(endpoint_slice("vllm-a", "vllm", [("127.0.0.1", True)], namespace="llm"))
        llm = OpenAICompatibleLLM(router=router, discovery=discovery)
        try:
            text, done = await collect(
                llm.stream_chat([{"role": "user", "content": "hi"}], session_key="t:s")
            )
        finally:
            await llm.aclose()
        assert isinstance(done, LLMDone)
        assert done.replica == fake.base_url
        assert text.startswith("Re: hi")
    finally:
        fake.stop()


async def test_build_llm_with_a_k8s_url_discovers() -> None:
    llm = build_llm(Settings(llm_url="k8s://llm/vllm:8000"))
    try:
        assert isinstance(llm, OpenAICompatibleLLM)
        assert llm.router.replicas == []  # nothing is contacted before the first request
    finally:
        await llm.aclose()
