"""A Kubernetes API server just big enough for `helm template --dry-run=server`: discovery for
the kinds the chart renders, empty lists, and one live Deployment (or none), so the chart's
`lookup` sees what a cluster would hold. Listens on 127.0.0.1 only.

    python -m tests.chart.fake_apiserver PORT NAMESPACE DEPLOYMENT REPLICAS   # REPLICAS -1: none
"""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

GROUPS = {"apps": "v1", "autoscaling": "v2", "policy": "v1", "networking.k8s.io": "v1",
          "monitoring.coreos.com": "v1", "keda.sh": "v1alpha1"}
RESOURCES = {
    "/api/v1": [("services", "Service"), ("serviceaccounts", "ServiceAccount"), ("secrets", "Secret"),
                ("configmaps", "ConfigMap"), ("pods", "Pod"),
                ("persistentvolumeclaims", "PersistentVolumeClaim")],
    "/apis/apps/v1": [("deployments", "Deployment")],
    "/apis/autoscaling/v2": [("horizontalpodautoscalers", "HorizontalPodAutoscaler")],
    "/apis/policy/v1": [("poddisruptionbudgets", "PodDisruptionBudget")],
    "/apis/networking.k8s.io/v1": [("networkpolicies", "NetworkPolicy"), ("ingresses", "Ingress")],
    "/apis/monitoring.coreos.com/v1": [("servicemonitors", "ServiceMonitor"),
                                       ("prometheusrules", "PrometheusRule"), ("podmonitors", "PodMonitor")],
    "/apis/keda.sh/v1alpha1": [("scaledobjects", "ScaledObject")],
}
PLURALS = {plural for listed in RESOURCES.values() for plural, _ in listed}


def make_handler(namespace: str, name: str, replicas: int) -> type[BaseHTTPRequestHandler]:
    deployment_path = f"/apis/apps/v1/namespaces/{namespace}/deployments/{name}"
    # A Deployment an earlier release of the chart made (Helm's ownership marks, so an install
    # dry-run does not refuse it as someone else's).
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment",
                  "metadata": {"name": name, "namespace": namespace,
                               "labels": {"app.kubernetes.io/managed-by": "Helm"},
                               "annotations": {"meta.helm.sh/release-name": name,
                                               "meta.helm.sh/release-namespace": namespace}},
                  "spec": {"replicas": replicas}}

    class Handler(BaseHTTPRequestHandler):
        def answer(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = self.path.split("?")[0]
            if path in ("/healthz", "/version"):
                self.answer(200, {"major": "1", "minor": "33", "gitVersion": "v1.33.0"})
            elif path == "/api":
                self.answer(200, {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []})
            elif path == "/apis":
                self.answer(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                    {"name": group, "versions": [{"groupVersion": f"{group}/{version}", "version": version}],
                     "preferredVersion": {"groupVersion": f"{group}/{version}", "version": version}}
                    for group, version in GROUPS.items()]})
            elif path in RESOURCES:
                self.answer(200, {"kind": "APIResourceList", "groupVersion": path.removeprefix("/apis/")
                                  .removeprefix("/api/"),
                                  "resources": [{"name": plural, "singularName": kind.lower(), "kind": kind,
                                                 "namespaced": True, "verbs": ["get", "list", "create",
                                                                               "patch", "delete"]}
                                                for plural, kind in RESOURCES[path]]})
            elif path == deployment_path and replicas >= 0:
                self.answer(200, deployment)
            elif path.rsplit("/", 1)[-1] in PLURALS:  # a list (Helm's release Secrets): empty
                self.answer(200, {"kind": "List", "apiVersion": "v1", "metadata": {}, "items": []})
            else:
                self.answer(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                  "reason": "NotFound", "code": 404, "message": f"{path} not found"})

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base's name)
            sys.stderr.write(f"{self.command} {self.path}\n")

    return Handler


def main() -> None:
    port, namespace, name, replicas = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    ThreadingHTTPServer(("127.0.0.1", int(port)), make_handler(namespace, name, replicas)).serve_forever()


if __name__ == "__main__":
    main()
