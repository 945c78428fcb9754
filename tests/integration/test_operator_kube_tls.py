"""The operator's own API calls (autoscale/kube.py) over real TLS, with the credentials kopf's
login hands over: a cluster CA and a client certificate given inline, as kind's and minikube's
kubeconfigs give them, against a local HTTPS server that requires the client certificate."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from typing import Any

import kopf
import pytest
import trustme
from aiohttp import web

from chatfleet.autoscale.kube import TARGETS, KubeClient, KubeError, TargetNotFound
from tests.support.procs import free_port

HPA = TARGETS["HorizontalPodAutoscaler"]
PATH = "/apis/autoscaling/v2/namespaces/llm/horizontalpodautoscalers/chatfleet"


@pytest.fixture
async def api_server() -> AsyncIterator[tuple[str, trustme.CA, list[dict[str, Any]]]]:
    """HTTPS on 127.0.0.1 with a certificate of ``ca``; client certificates of ``ca`` required.
    Answers the HPA's GET and records the PATCHes."""
    ca = trustme.CA()
    patches: list[dict[str, Any]] = []

    async def hpa(request: web.Request) -> web.Response:
        if request.method == "PATCH":
            patches.append({"type": request.content_type, "body": await request.json(),
                            "query": dict(request.query)})
        return web.json_response({"kind": "HorizontalPodAutoscaler", "spec": {"minReplicas": 1}})

    app = web.Application()
    app.router.add_route("*", PATH, hpa)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    ca.configure_trust(context)
    context.verify_mode = ssl.CERT_REQUIRED
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=context).start()
    yield f"https://127.0.0.1:{port}", ca, patches
    await runner.cleanup()


def login(server: str, ca: trustme.CA, *, client: bool = True) -> kopf.ConnectionInfo:
    """What kopf's kubeconfig login returns for inline certificate-authority-data and
    client-certificate-data / client-key-data."""
    cert = ca.issue_cert("chatfleet-operator")
    return kopf.ConnectionInfo(
        server=server, ca_data=ca.cert_pem.bytes(),
        certificate_data=cert.cert_chain_pems[0].bytes() if client else None,
        private_key_data=cert.private_key_pem.bytes() if client else None)


async def test_inline_ca_and_client_certificate_work(api_server) -> None:
    server, ca, patches = api_server
    client = KubeClient(login(server, ca))
    try:
        assert (await client.get_target(HPA, "llm", "chatfleet"))["spec"]["minReplicas"] == 1
        await client.set_floor(HPA, "llm", "chatfleet", 4)
        with pytest.raises(TargetNotFound):
            await client.get_target(HPA, "llm", "other")
    finally:
        await client.aclose()
    assert patches == [{"type": "application/apply-patch+yaml",
                        "body": {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
                                 "metadata": {"name": "chatfleet"}, "spec": {"minReplicas": 4}},
                        "query": {"fieldManager": "chatfleet-operator", "force": "true"}}]


async def test_without_the_client_certificate_the_call_fails_as_a_kube_error(api_server) -> None:
    server, ca, _ = api_server
    client = KubeClient(login(server, ca, client=False))
    try:
        with pytest.raises(KubeError):
            await client.get_target(HPA, "llm", "chatfleet")
    finally:
        await client.aclose()


async def test_another_cluster_ca_is_refused(api_server) -> None:
    server, _, _ = api_server
    client = KubeClient(login(server, trustme.CA()))
    try:
        with pytest.raises(KubeError, match="CERTIFICATE_VERIFY_FAILED"):
            await client.get_target(HPA, "llm", "chatfleet")
    finally:
        await client.aclose()
