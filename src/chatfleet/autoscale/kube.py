"""The few Kubernetes API calls the operator makes itself (kopf makes the rest): read a scaling
target and patch its floor.

What it may touch is closed here: an autoscaling/v2 HorizontalPodAutoscaler's
``spec.minReplicas`` or a KEDA ScaledObject's ``spec.minReplicaCount``. There is no code path to
a Deployment: the HPA owns ``spec.replicas``, and writing it too is how operators end up fighting
their autoscaler. The write is a server-side apply of that one field under the field manager
``chatfleet-operator`` (``force``: it takes the field over once from whoever set it before), so
the operator owns exactly that field and nothing else: Helm 4, which installs and upgrades with
server-side apply, owns the rest and never conflicts with it, since the chart leaves the floor
out when the operator is enabled (docs/operations.md#who-owns-the-floor).

The chart's own floor (``autoscaling.minReplicas``) reaches the operator as the target's
``chatfleet.io/chart-floor`` annotation: the floor to start from, and the one to hold while a
policy only recommends.

Credentials come from kopf's login (kubeconfig or the pod's service account), so the operator
and these calls always talk to the same API server as the same user.
"""

from __future__ import annotations

import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import kopf

__all__ = ["CHART_FLOOR_ANNOTATION", "FIELD_MANAGER", "TARGETS", "KubeClient", "KubeError",
           "Target", "TargetNotFound", "chart_floor", "current_floor", "floor_apply_patch",
           "scale_target_name"]

FIELD_MANAGER = "chatfleet-operator"
"""The operator's field manager: ``kubectl get hpa -o yaml --show-managed-fields`` names it as
the owner of the floor field."""
CHART_FLOOR_ANNOTATION = "chatfleet.io/chart-floor"


@dataclass(frozen=True, slots=True)
class Target:
    """A kind of scaling target: where it lives in the API and which field is its floor."""

    kind: str
    api_version: str
    plural: str
    floor_field: str


TARGETS: dict[str, Target] = {
    "HorizontalPodAutoscaler": Target("HorizontalPodAutoscaler", "autoscaling/v2",
                                      "horizontalpodautoscalers", "minReplicas"),
    "ScaledObject": Target("ScaledObject", "keda.sh/v1alpha1", "scaledobjects",
                           "minReplicaCount"),
}


class KubeError(RuntimeError):
    """The API server refused or failed a call."""


class TargetNotFound(KubeError):
    """The policy's target does not exist (yet)."""


def _pem(data: bytes | str) -> str:
    return data.decode() if isinstance(data, bytes) else data


def _ssl_context(info: kopf.ConnectionInfo) -> ssl.SSLContext:
    """TLS as kopf's login found it: the cluster's CA (file or inline kubeconfig data), a client
    certificate (files or inline data, as kind and minikube kubeconfigs have), or no checks when
    the kubeconfig says ``insecure-skip-tls-verify``."""
    context = ssl.create_default_context()
    if info.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if info.ca_path:
        context.load_verify_locations(cafile=str(info.ca_path))
    if info.ca_data:
        context.load_verify_locations(cadata=_pem(info.ca_data))
    if info.certificate_path and info.private_key_path:
        context.load_cert_chain(str(info.certificate_path), str(info.private_key_path))
    elif info.certificate_data and info.private_key_data:
        # ssl loads a client certificate from files only: into a private folder, gone after.
        with tempfile.TemporaryDirectory(prefix="chatfleet-kube-") as folder:
            cert, key = Path(folder) / "client.crt", Path(folder) / "client.key"
            cert.write_text(_pem(info.certificate_data))
            key.touch(mode=0o600)
            key.write_text(_pem(info.private_key_data))
            context.load_cert_chain(str(cert), str(key))
    return context


class KubeClient:
    """An httpx client on the API server kopf logged in to."""

    def __init__(self, info: kopf.ConnectionInfo, *, timeout_s: float = 10.0) -> None:
        headers = {"Accept": "application/json"}
        if info.token:
            headers["Authorization"] = f"Bearer {info.token}"
        auth = httpx.BasicAuth(info.username, info.password or "") if info.username else None
        self._client = httpx.AsyncClient(base_url=info.server.rstrip("/"), headers=headers,
                                         auth=auth, verify=_ssl_context(info), timeout=timeout_s)

    async def aclose(self) -> None:
        await self._client.aclose()

    def _url(self, target: Target, namespace: str, name: str) -> str:
        return f"/apis/{target.api_version}/namespaces/{namespace}/{target.plural}/{name}"

    async def _call(self, method: str, url: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = await self._client.request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            raise KubeError(f"{method} {url}: {exc}") from exc
        if response.status_code == 404:
            raise TargetNotFound(f"{url} not found")
        if response.status_code >= 400:
            raise KubeError(f"{method} {url}: {response.status_code} {response.text[:300]}")
        body: dict[str, Any] = response.json()
        return body

    async def get_target(self, target: Target, namespace: str, name: str) -> dict[str, Any]:
        return await self._call("GET", self._url(target, namespace, name))

    async def set_floor(self, target: Target, namespace: str, name: str, floor: int) -> None:
        """Server-side apply of exactly the target's floor field, as ``FIELD_MANAGER``. The body
        is JSON, which is YAML, as the apply content type asks."""
        await self._call("PATCH", self._url(target, namespace, name),
                         json=floor_apply_patch(target, name, floor),
                         params={"fieldManager": FIELD_MANAGER, "force": "true"},
                         headers={"Content-Type": "application/apply-patch+yaml"})


def floor_apply_patch(target: Target, name: str, floor: int) -> dict[str, Any]:
    """The apply configuration that owns the floor field and nothing else: an apply body names
    the object (apiVersion, kind, metadata.name) and lists only the fields its manager owns."""
    return {"apiVersion": target.api_version, "kind": target.kind, "metadata": {"name": name},
            "spec": {target.floor_field: floor}}


def current_floor(target: Target, obj: dict[str, Any]) -> int | None:
    """The target's floor as it is now (None if unset)."""
    value = obj.get("spec", {}).get(target.floor_field)
    return int(value) if isinstance(value, int | float) else None


def chart_floor(obj: dict[str, Any]) -> int | None:
    """The floor the chart was given (its ``chatfleet.io/chart-floor`` annotation on the target);
    None when the target has none or it is not a positive whole number."""
    value = (obj.get("metadata", {}).get("annotations") or {}).get(CHART_FLOOR_ANNOTATION)
    try:
        floor = int(str(value))
    except ValueError:
        return None
    return floor if floor >= 1 else None


def scale_target_name(obj: dict[str, Any]) -> str | None:
    """The Deployment the HPA or ScaledObject scales: its name is the Prometheus job."""
    ref = obj.get("spec", {}).get("scaleTargetRef", {})
    name = ref.get("name")
    return name if isinstance(name, str) and name else None
