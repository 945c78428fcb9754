"""k8s/ (plain manifests for kubectl users) is the chart rendered: it must not drift."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.chart.render import ROOT, render
from tests.support.tools import tool_path


def render_k8s_module():
    spec = importlib.util.spec_from_file_location("render_k8s", ROOT / "scripts" / "render_k8s.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tool_env() -> dict[str, str]:
    helm_dir = str(Path(tool_path("helm")).parent)
    return {**os.environ, "PATH": helm_dir + os.pathsep + os.environ.get("PATH", "")}


def test_k8s_is_what_the_chart_renders_now() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "render_k8s.py"), "--check"],
                            capture_output=True, text=True, env=tool_env(), timeout=120, check=False)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(("overlay", "values"), [
    ("gpu", {"engine.kind": "vllm"}), ("sim", {"engine.kind": "sim"}),
    ("inferencepool", {"engine.kind": "vllm", "routing.mode": "inferencepool", "routing.httpRoute.enabled": True,
                       "routing.httpRoute.gatewayName": "inference-gateway"}),
])
def test_kustomize_builds_exactly_the_helm_objects(overlay: str, values: dict[str, object]) -> None:
    built = subprocess.run([tool_path("kubectl"), "kustomize", str(ROOT / "k8s" / "overlays" / overlay)],
                           capture_output=True, text=True, timeout=60, check=False)
    assert built.returncode == 0, built.stderr
    from_kustomize = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(built.stdout) if d}
    for_kubectl = render_k8s_module().for_kubectl
    from_helm = {(d["kind"], d["metadata"]["name"]): for_kubectl(d)
                 for d in render(values, namespace="chatfleet")
                 if "helm.sh/hook" not in d["metadata"].get("annotations", {})}
    assert from_kustomize.keys() == from_helm.keys()
    for key, doc in from_helm.items():
        assert from_kustomize[key] == doc, key


def test_k8s_manifests_say_kubectl_manages_them_not_helm() -> None:
    """No Helm release owns k8s/: a `managed-by: Helm` label would mislead tools that trust it."""
    files = list((ROOT / "k8s").rglob("*.yaml"))
    labelled = 0
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            labels = (doc or {}).get("metadata", {}).get("labels", {})
            if "app.kubernetes.io/managed-by" in labels:
                assert labels["app.kubernetes.io/managed-by"] == "kubectl", path
                labelled += 1
    assert labelled >= 10, "k8s/ objects lost their labels"
    assert "managed-by: Helm" not in "".join(p.read_text() for p in files)
