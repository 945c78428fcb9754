"""The pure parts of the pod supervisor: ``auto``'s CPU count from cgroup files, the restart
backoff, and the rule that nothing imports prometheus_client before the pod's metrics directory
is set."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from chatfleet.pod.backoff import RestartBackoff
from chatfleet.pod.cpu import MAX_AUTO_WORKERS, auto_workers, cgroup_cpu_limit


def write(root: Path, name: str, text: str) -> None:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


@pytest.mark.parametrize(("text", "limit"), [("150000 100000", 1.5), ("200000 100000", 2.0),
                                             ("max 100000", None), ("garbage", None)])
def test_cgroup_v2_quota(tmp_path: Path, text: str, limit: float | None) -> None:
    write(tmp_path, "cpu.max", text)
    assert cgroup_cpu_limit(tmp_path) == limit


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    write(tmp_path, "cpu,cpuacct/cpu.cfs_quota_us", "250000")
    write(tmp_path, "cpu,cpuacct/cpu.cfs_period_us", "100000")
    assert cgroup_cpu_limit(tmp_path) == 2.5
    write(tmp_path, "cpu,cpuacct/cpu.cfs_quota_us", "-1")
    assert cgroup_cpu_limit(tmp_path) is None


def test_auto_rounds_the_quota_up_and_stays_within_the_cpus_and_the_cap(tmp_path: Path) -> None:
    assert auto_workers(tmp_path, usable_cpus=8) == 8  # no cgroup files: the usable CPUs
    write(tmp_path, "cpu.max", "150000 100000")
    assert auto_workers(tmp_path, usable_cpus=8) == 2
    write(tmp_path, "cpu.max", "50000 100000")
    assert auto_workers(tmp_path, usable_cpus=8) == 1
    write(tmp_path, "cpu.max", "800000 100000")
    assert auto_workers(tmp_path, usable_cpus=4) == 4  # a cpuset narrower than the quota
    write(tmp_path, "cpu.max", "max 100000")
    assert auto_workers(tmp_path, usable_cpus=96) == MAX_AUTO_WORKERS


def test_backoff_doubles_while_workers_die_young_and_resets_after_a_long_life() -> None:
    backoff = RestartBackoff(first_s=0.5, max_s=4, reset_after_s=60)
    assert [backoff.delay(1.0) for _ in range(6)] == [0.0, 0.5, 1.0, 2.0, 4.0, 4.0]
    assert backoff.delay(61.0) == 0.0
    assert backoff.delay(1.0) == 0.5


def test_the_cli_and_the_pod_launcher_do_not_import_prometheus_client() -> None:
    """prometheus_client picks its multiprocess mode at import: the supervisor must set
    PROMETHEUS_MULTIPROC_DIR first (pod/launch.py)."""
    code = ("import sys, chatfleet.cli, chatfleet.pod.launch; "
            "print(sorted(m for m in sys.modules if m.startswith('prometheus_client')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         check=True).stdout
    assert out.strip() == "[]"
