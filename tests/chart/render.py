"""Render the chart with the real helm binary, for the chart tests."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.support.tools import tool_path

ROOT = Path(__file__).parents[2]
CHART = ROOT / "charts" / "chatfleet"


def helm(*args: str, binary: str = "helm") -> subprocess.CompletedProcess[str]:
    """Run helm 4 (``helm``) or helm 3 (``helm3``, installed beside it)."""
    return subprocess.run([tool_path(binary), *args], capture_output=True, text=True, timeout=120,
                          check=False)


def set_args(values: dict[str, Any]) -> list[str]:
    """``--set-json key=value`` for each dotted key, so types survive (numbers, lists, null)."""
    out: list[str] = []
    for key, value in values.items():
        out += ["--set-json", f"{key}={json.dumps(value)}"]
    return out


def render_text(values: dict[str, Any] | None = None, release: str = "chatfleet",
                namespace: str = "llm") -> str:
    result = helm("template", release, str(CHART), "--namespace", namespace, *set_args(values or {}))
    assert result.returncode == 0, result.stderr
    return result.stdout


def render(values: dict[str, Any] | None = None, release: str = "chatfleet",
           namespace: str = "llm") -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(render_text(values, release, namespace)) if doc]


def lint_and_render_file(values_file: Path, namespace: str = "llm") -> list[dict[str, Any]]:
    """An example values file as a user would take it: `helm lint --strict` clean (no warning),
    then rendered."""
    lint = helm("lint", "--strict", str(CHART), "-f", str(values_file))
    assert lint.returncode == 0 and "[WARNING]" not in lint.stdout, lint.stdout + lint.stderr
    rendered = helm("template", "chatfleet", str(CHART), "-n", namespace, "-f", str(values_file))
    assert rendered.returncode == 0, rendered.stderr
    return [d for d in yaml.safe_load_all(rendered.stdout) if d]


def by_kind(docs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        out.setdefault(doc["kind"], []).append(doc)
    return out


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(docs).get(kind, [])
    assert len(found) == 1, f"expected one {kind}, rendered {len(found)}"
    return found[0]


def containers(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    return {c["name"]: c for c in pod["containers"]}


def env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def notes(values: dict[str, Any] | None = None, release: str = "chatfleet", namespace: str = "llm") -> str:
    """NOTES.txt as `helm install` prints it: `helm template` never renders NOTES, a client-side
    dry-run install does (helm 4; no cluster needed)."""
    result = helm("install", release, str(CHART), "--namespace", namespace, "--dry-run=client",
                  *set_args(values or {}))
    assert result.returncode == 0, result.stderr
    head, marker, text = result.stdout.partition("\nNOTES:\n")
    assert marker, f"no NOTES section in:\n{head[-2000:]}"
    return text
