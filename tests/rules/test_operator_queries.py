"""The operator's cold-start query (autoscale/prometheus.py) evaluated by promtool on
kube-state-metrics series: what it learns from which pods, and nothing when there are none."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from chatfleet.autoscale.prometheus import cold_start_query
from tests.support.tools import tool_path


def pod_series(pod: str, created: str, ready: str, instance: str = "ksm-0") -> list[dict[str, str]]:
    """kube-state-metrics' two series of one pod (promtool's expanding notation, one per minute)."""
    labels = f'namespace="llm", pod="{pod}", uid="{pod}-uid", instance="{instance}"'
    return [{"series": f"kube_pod_created{{{labels}}}", "values": created},
            {"series": f"kube_pod_status_ready_time{{{labels}}}", "values": ready}]


def test_the_cold_start_is_the_p90_of_creation_to_first_ready_over_the_deployments_pods(
        tmp_path: Path) -> None:
    series = [
        # Created at 0 s, Ready at 60 s; a second kube-state-metrics reports it too.
        *pod_series("chatfleet-6b7c9-a1b2c", "0x10", "_ 60x9"),
        *pod_series("chatfleet-6b7c9-a1b2c", "0x10", "_ 60x9", instance="ksm-1"),
        # Created at 60 s, Ready at 240 s (180 s); its container restarts later and it is Ready
        # again at 480 s: still 180 s, the first readiness.
        *pod_series("chatfleet-6b7c9-d3e4f", "_ 60x9", "_ _ _ _ 240x3 _ 480x1"),
        # Created at 120 s, not Ready yet (kube-state-metrics reports no ready time): left out.
        *pod_series("chatfleet-6b7c9-g5h6j", "_ _ 120x8", "_x10"),
        # Another Deployment whose name starts the same: left out.
        *pod_series("chatfleet-canary-7f8d9-k1l2m", "0x10", "_ 3000x9"),
    ]
    tests = {"rule_files": [], "evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": series,
        "promql_expr_test": [
            # The 90th percentile of 60 s and 180 s: 60 + 0.9 * 120.
            {"expr": cold_start_query("llm", "chatfleet"), "eval_time": "10m",
             "exp_samples": [{"labels": "{}", "value": 168}]},
            # No pod of the Deployment seen: no sample (the operator uses its default).
            {"expr": cold_start_query("other", "chatfleet"), "eval_time": "10m",
             "exp_samples": []},
        ]}]}
    path = tmp_path / "cold_start_test.yaml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = subprocess.run([tool_path("promtool"), "test", "rules", str(path)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
