"""How many workers ``server.workers=auto`` means: the container's CPU limit.

A container's limit is its cgroup's CPU quota (``resources.limits.cpu`` in Kubernetes), not the
node's cores, which ``os.cpu_count()`` reports: a pod limited to 2 CPUs on a 64-core node must not
start 64 workers, each throttled to 1/32 of a core. The quota is read from cgroup v2
(``cpu.max``: ``<quota> <period>`` or ``max``) or v1 (``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``,
-1 when unlimited), rounded up (1.5 CPUs: 2 workers, each mostly idle between tokens). Without a
quota it is the CPUs this process may run on (``sched_getaffinity``: a cpuset, ``taskset``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["CGROUP_ROOT", "MAX_AUTO_WORKERS", "auto_workers", "cgroup_cpu_limit"]

CGROUP_ROOT = Path("/sys/fs/cgroup")
"""Where a container sees its own cgroup (cgroup namespaces, the default of containerd and Docker
on cgroup v2)."""

MAX_AUTO_WORKERS = 16
"""The most workers ``auto`` starts. One worker relays thousands of tokens/s (docs/benchmarks.md),
so 16 are far more than one engine replica (the pod's one GPU server) produces, even an H200's
~25,000 tokens/s; past that, more workers only add memory (each holds its own app, upstream pool
and knowledge-base state) and connections to the engine. Set a number to go above it."""


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """The CPUs the cgroup's quota allows (e.g. 1.5), or None when it sets no limit or there is
    no cgroup to read."""
    v2 = _read(root / "cpu.max")
    if v2 is not None:
        fields = v2.split()
        if len(fields) == 2 and fields[0] != "max" and fields[0].isdigit() and fields[1].isdigit() \
                and int(fields[1]) > 0:
            return int(fields[0]) / int(fields[1])
        return None
    for controller in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        quota = _read(root / controller / "cpu.cfs_quota_us")
        period = _read(root / controller / "cpu.cfs_period_us")
        if quota is None or period is None:
            continue
        try:
            quota_us, period_us = int(quota), int(period)
        except ValueError:
            return None
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    return None


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def auto_workers(root: Path = CGROUP_ROOT, usable_cpus: int | None = None) -> int:
    """Workers for ``auto``: the cgroup's CPU limit rounded up, else the usable CPUs; never more
    than the usable CPUs, nor ``MAX_AUTO_WORKERS``, nor fewer than 1."""
    cpus = usable_cpus if usable_cpus is not None else _usable_cpus()
    limit = cgroup_cpu_limit(root)
    wanted = math.ceil(limit) if limit is not None else cpus
    return max(1, min(wanted, cpus, MAX_AUTO_WORKERS))
