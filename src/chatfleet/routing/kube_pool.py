"""The pool's endpoints from the Kubernetes API: the ready pods of an InferencePool's selector.

In a cluster the picker's pool is an InferencePool (``inference.networking.k8s.io/v1``): its
``spec.selector.matchLabels`` names the pods (in the pool's namespace) and its
``spec.targetPorts`` the ports, and every ready pod gives one endpoint ``podIP:port`` per target
port, as the Inference Extension defines the pool (a pod serving several data-parallel ranks has
one port per rank). A pod is ready when its Ready condition is True, it has a pod IP and no
deletion timestamp: the reference picker's ``IsPodReady`` plus the address it needs (a pod
being deleted is out at once, before the kubelet flips its Ready condition).

The pool and its pods are both watched the way client-go's reflector does it: a list, then a
watch from the list's resourceVersion, with bookmarks. A watch that ends is resumed from the
last version seen, a 410 Gone (that version left the API server's window) lists again, and any
other failure is retried with capped, jittered backoff while the last known endpoints keep
serving. Every change of the ready set goes to ``on_change`` as its watch event is read, so a
pod that turns unready leaves the pool within the event's delivery time. A change of the pool's
selector or ports restarts the pods' watch on the new selector.

The few calls are made with httpx and the pod's service-account credentials (the token is read
again for every call: the kubelet rotates projected tokens in place); the operator's
autoscale/kube.py makes its own calls with kopf's login instead, which the picker does not run.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import ssl
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson

__all__ = ["KubeApi", "KubeError", "PoolRef", "PoolSpec", "default_namespace", "is_ready",
           "objective_priority", "pod_endpoints", "pool_spec", "watch_objectives", "watch_pool"]

log = logging.getLogger(__name__)

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
POOLS_PATH = "/apis/inference.networking.k8s.io/v1/namespaces/{namespace}/inferencepools"
OBJECTIVES_PATH = "/apis/inference.networking.x-k8s.io/v1alpha2/namespaces/{namespace}/inferenceobjectives"
PODS_PATH = "/api/v1/namespaces/{namespace}/pods"
WATCH_TIMEOUT_S = 60
"""The API server ends each watch after this long and the watch resumes from its last version:
a connection that died without a word (no bookmark either) is noticed within this plus 30 s."""
USER_AGENT = "chatfleet-epp"
BACKOFF_S = (0.25, 5.0)
"""First and longest wait before retrying a failed list or watch."""


class KubeError(RuntimeError):
    """The API server refused or failed a call (the message says what to fix where it can)."""


class _Gone(Exception):
    """410: the watch's resourceVersion is too old; list again."""


@dataclass(frozen=True, slots=True)
class KubeApi:
    """Where the API server is and how to authenticate to it."""

    url: str
    token_file: Path | None = None
    ca_file: Path | None = None

    @classmethod
    def in_cluster(cls) -> KubeApi:
        """The API server as a pod sees it: the service's address from the environment, the
        service account's token and CA from their mounted files."""
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
        if not host or not port:
            raise KubeError("KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT are not set: not in a "
                            "pod, so name the API server with --kube-api")
        host = f"[{host}]" if ":" in host else host
        token, ca = SERVICE_ACCOUNT / "token", SERVICE_ACCOUNT / "ca.crt"
        if not token.is_file() or not ca.is_file():
            raise KubeError(f"{token} or {ca} is missing: mount the service account's token "
                            "(automountServiceAccountToken), or name the API server with --kube-api")
        return cls(f"https://{host}:{port}", token, ca)

    def verify(self) -> ssl.SSLContext | bool:
        """How the API server's certificate is checked: against ``ca_file`` (the cluster's CA),
        else against the system's CAs. OSError (ssl.SSLError) when the CA file cannot be used."""
        return True if self.ca_file is None else ssl.create_default_context(cafile=str(self.ca_file))


@dataclass(frozen=True, slots=True)
class PoolRef:
    """The InferencePool whose pods are the picker's endpoints."""

    api: KubeApi
    namespace: str
    name: str


@dataclass(frozen=True, slots=True)
class PoolSpec:
    """What of an InferencePool decides its endpoints."""

    match_labels: tuple[tuple[str, str], ...]
    ports: tuple[int, ...]

    def selects(self, labels: Mapping[str, object]) -> bool:
        return all(labels.get(key) == value for key, value in self.match_labels)

    @property
    def label_selector(self) -> str:
        return ",".join(f"{key}={value}" for key, value in self.match_labels)


def default_namespace() -> str | None:
    """The pod's own namespace (its service account's), or None outside a pod."""
    try:
        return (SERVICE_ACCOUNT / "namespace").read_text().strip() or None
    except OSError:
        return None


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def pool_spec(pool: Mapping[str, Any]) -> PoolSpec:
    """An InferencePool's selector and ports; ValueError when they are missing or mistyped
    (the CRD's validation refuses such a pool, so this is a pool from a different schema)."""
    spec = _dict(pool.get("spec"))
    labels = _dict(_dict(spec.get("selector")).get("matchLabels"))
    if not labels or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise ValueError("spec.selector.matchLabels is not a non-empty map of strings")
    ports = spec.get("targetPorts")
    numbers = [_dict(port).get("number") for port in ports] if isinstance(ports, list) else []
    if not numbers or not all(type(n) is int and 0 < n < 65536 for n in numbers):
        raise ValueError(f"spec.targetPorts is {ports!r}, not a list of {{number: 1..65535}}")
    return PoolSpec(tuple(sorted(labels.items())), tuple(dict.fromkeys(numbers)))


def is_ready(pod: Mapping[str, Any]) -> bool:
    """Ready condition True, a pod IP, and not being deleted."""
    if _dict(pod.get("metadata")).get("deletionTimestamp"):
        return False
    status = _dict(pod.get("status"))
    if not status.get("podIP"):
        return False
    conditions = status.get("conditions")
    for condition in conditions if isinstance(conditions, list) else ():
        if _dict(condition).get("type") == "Ready":
            return _dict(condition).get("status") == "True"
    return False


def pod_endpoints(pod: Mapping[str, Any], spec: PoolSpec) -> frozenset[str]:
    """The endpoints the pod gives the pool: one per target port while it is ready and selected."""
    if not is_ready(pod) or not spec.selects(_dict(_dict(pod.get("metadata")).get("labels"))):
        return frozenset()
    ip = str(_dict(pod.get("status"))["podIP"])
    host = f"[{ip}]" if ":" in ip else ip
    return frozenset(f"{host}:{port}" for port in spec.ports)


class _PodSet:
    """The pods last seen by name, and the ready endpoints they make, handed on when they change."""

    def __init__(self, on_change: Callable[[Iterable[str]], None]) -> None:
        self._on_change = on_change
        self._pods: dict[str, Mapping[str, Any]] = {}
        self._spec: PoolSpec | None = None
        self._published: frozenset[str] | None = None

    def use(self, spec: PoolSpec | None) -> None:
        """A new pool spec (None: the pool is gone): drops what it no longer selects at once."""
        self._spec = spec
        if spec is None:
            self._pods.clear()
        if self._published is not None:
            self._publish()

    def replace(self, pods: list[Any]) -> None:
        self._pods = {_name(pod): pod for pod in pods if isinstance(pod, dict)}
        self._publish()

    def event(self, kind: str, pod: dict[str, Any]) -> None:
        if kind == "DELETED":
            self._pods.pop(_name(pod), None)
        else:
            self._pods[_name(pod)] = pod
        self._publish()

    def _publish(self) -> None:
        spec = self._spec
        ready = frozenset() if spec is None else frozenset().union(
            *(pod_endpoints(pod, spec) for pod in self._pods.values()))
        if ready != self._published:
            log.info("epp: %d ready endpoint(s) in the pool", len(ready))
            self._published = ready
            self._on_change(sorted(ready))


def _name(obj: Mapping[str, Any]) -> str:
    return str(_dict(obj.get("metadata")).get("name", ""))


class _TokenFile(httpx.Auth):
    """A bearer token read from its file for every call: the kubelet rewrites a projected
    service-account token in place before it expires, and a watch that resumes must use the new one."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self._path.read_text().strip()}"
        yield request


def _client(api: KubeApi) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=api.url.rstrip("/"),
                             headers={"Accept": "application/json", "User-Agent": USER_AGENT},
                             auth=_TokenFile(api.token_file) if api.token_file is not None else None,
                             verify=api.verify(), timeout=httpx.Timeout(10.0, read=WATCH_TIMEOUT_S + 30.0),
                             trust_env=False)


def _refusal(response: httpx.Response, what: str) -> KubeError:
    hint = {401: " (the service-account token was not accepted)",
            403: " (the picker's service account needs get, list and watch on pods, "
                 "inferencepools.inference.networking.k8s.io and "
                 "inferenceobjectives.inference.networking.x-k8s.io in this namespace)",
            404: " (is the CRD installed: InferencePool, inference.networking.k8s.io/v1; "
                 "InferenceObjective, inference.networking.x-k8s.io/v1alpha2?)"}
    return KubeError(f"{what}: {response.status_code}{hint.get(response.status_code, '')}: "
                     f"{response.text[:300]}")


async def _list(client: httpx.AsyncClient, path: str, params: dict[str, str]) -> tuple[str, list[Any]]:
    response = await client.get(path, params=params)
    if response.status_code != 200:
        raise _refusal(response, f"list {path}")
    listing = _dict(orjson.loads(response.content))
    items = listing.get("items")
    return str(_dict(listing.get("metadata")).get("resourceVersion", "")), items if isinstance(items, list) else []


async def _watch(client: httpx.AsyncClient, path: str, params: dict[str, str],
                 version: str) -> AsyncIterator[tuple[str, dict[str, Any], str]]:
    """The watch's events from ``version`` on, each with the version to resume from after it."""
    query = {**params, "watch": "true", "allowWatchBookmarks": "true", "resourceVersion": version,
             "timeoutSeconds": str(WATCH_TIMEOUT_S)}
    async with client.stream("GET", path, params=query) as response:
        if response.status_code == 410:
            raise _Gone()
        if response.status_code != 200:
            await response.aread()
            raise _refusal(response, f"watch {path}")
        async for line in response.aiter_lines():
            if not line.strip():
                continue
            event = _dict(orjson.loads(line))
            kind, obj = str(event.get("type")), _dict(event.get("object"))
            if kind == "ERROR":
                if obj.get("code") == 410:
                    raise _Gone()
                raise KubeError(f"watch {path}: {obj.get('code')} {obj.get('message')}")
            version = str(_dict(obj.get("metadata")).get("resourceVersion") or version)
            yield kind, obj, version


async def _reflect(client: httpx.AsyncClient, path: str, params: dict[str, str], *,
                   on_list: Callable[[list[Any]], None],
                   on_event: Callable[[str, dict[str, Any]], None]) -> None:
    """List ``path`` and follow its changes forever; failures are logged and retried."""
    delay = BACKOFF_S[0]
    version: str | None = None
    while True:
        started = time.monotonic()
        try:
            if version is None:
                version, items = await _list(client, path, params)
                on_list(items)
                delay = BACKOFF_S[0]
            async for kind, obj, version in _watch(client, path, params, version):
                if kind != "BOOKMARK":
                    on_event(kind, obj)
                delay = BACKOFF_S[0]
            if time.monotonic() - started >= 1.0:
                continue  # the API server ended the watch after its timeout: resume at once
        except _Gone:
            log.info("epp: the watch of %s is too old (410 Gone); listing again", path)
            version = None
            continue
        except (httpx.HTTPError, OSError, ValueError, KubeError) as exc:
            log.warning("epp: %s: %s; retrying in %.1f s with the last known endpoints", path,
                        exc or type(exc).__name__, delay)
        except Exception:  # a bug must not take the picker down: it serves the last known set
            log.exception("epp: following %s failed; retrying in %.1f s", path, delay)
        await asyncio.sleep(delay * random.uniform(0.5, 1.0))
        delay = min(delay * 2, BACKOFF_S[1])


async def watch_pool(ref: PoolRef, on_change: Callable[[Iterable[str]], None]) -> None:
    """Hand ``on_change`` the pool's ready endpoints once its pods are listed, and again on every
    change, until cancelled. Nothing is handed on while the pool cannot be read at first (the
    picker stays unready); a pool that is deleted leaves no endpoints."""
    pods = _PodSet(on_change)
    pods_path = PODS_PATH.format(namespace=ref.namespace)
    spec: PoolSpec | None = None
    following: asyncio.Task[None] | None = None

    async with _client(ref.api) as client:

        def seen(pool: dict[str, Any] | None) -> None:
            nonlocal spec, following
            new: PoolSpec | None = None
            if pool is None:
                log.warning("epp: InferencePool %s/%s not found: no endpoints", ref.namespace, ref.name)
            else:
                try:
                    new = pool_spec(pool)
                except ValueError as exc:
                    log.error("epp: InferencePool %s/%s: %s; no endpoints", ref.namespace, ref.name, exc)
            if new == spec:
                return
            spec = new
            pods.use(new)
            if following is not None:
                following.cancel()
                following = None
            if new is not None:
                following = asyncio.create_task(_reflect(
                    client, pods_path, {"labelSelector": new.label_selector},
                    on_list=pods.replace, on_event=pods.event), name="watch pods")

        def listed(items: list[Any]) -> None:
            seen(next((item for item in items if isinstance(item, dict) and _name(item) == ref.name), None))

        def changed(kind: str, pool: dict[str, Any]) -> None:
            if _name(pool) == ref.name:
                seen(None if kind == "DELETED" else pool)

        try:
            await _reflect(client, POOLS_PATH.format(namespace=ref.namespace),
                           {"fieldSelector": f"metadata.name={ref.name}"}, on_list=listed, on_event=changed)
        finally:
            if following is not None:
                following.cancel()
                await asyncio.gather(following, return_exceptions=True)


def objective_priority(objective: Mapping[str, Any], pool: str) -> int | None:
    """An InferenceObjective's priority when it serves ``pool`` (its ``spec.poolRef``), else None.
    No priority is 0, the Inference Extension's default."""
    spec = _dict(objective.get("spec"))
    pool_ref = _dict(spec.get("poolRef"))
    if pool_ref.get("name") != pool or pool_ref.get("kind", "InferencePool") != "InferencePool":
        return None
    priority = spec.get("priority", 0)
    return priority if type(priority) is int else 0


async def watch_objectives(ref: PoolRef, on_change: Callable[[dict[str, int]], None]) -> None:
    """Hand ``on_change`` the priorities of the pool's InferenceObjectives (name -> priority) once
    listed, and again on every change, until cancelled. A cluster without the InferenceObjective
    CRD (``inference.networking.x-k8s.io/v1alpha2``) is retried with backoff, and requests that
    name an objective are routed on their own priority meanwhile."""
    priorities: dict[str, int] = {}

    def listed(items: list[Any]) -> None:
        priorities.clear()
        for item in items:
            if isinstance(item, dict) and (priority := objective_priority(item, ref.name)) is not None:
                priorities[_name(item)] = priority
        on_change(dict(priorities))

    def changed(kind: str, objective: dict[str, Any]) -> None:
        priority = None if kind == "DELETED" else objective_priority(objective, ref.name)
        if priority is None:
            priorities.pop(_name(objective), None)
        else:
            priorities[_name(objective)] = priority
        on_change(dict(priorities))

    async with _client(ref.api) as client:
        await _reflect(client, OBJECTIVES_PATH.format(namespace=ref.namespace), {},
                       on_list=listed, on_event=changed)
