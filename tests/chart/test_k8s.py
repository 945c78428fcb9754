"""k8s/ (plain manifests for kubectl users) is the chart rendered: it must not drift."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.chart.render import ROOT, render
from tests.support.tools import tool_path


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
    from_helm = {(d["kind"], d["metadata"]["name"]): d
                 for d in render(values, namespace="chatfleet")
                 if "helm.sh/hook" not in d["metadata"].get("annotations", {})}
    assert from_kustomize.keys() == from_helm.keys()
    for key, doc in from_helm.items():
        assert from_kustomize[key] == doc, key
