"""CPU seconds of a process and all its descendants, read from /proc (Linux).

Benchmarks on a shared machine compare CPU seconds over a fixed workload rather than wall time; a
multi-worker gateway is a supervisor, a coordinator and N workers, so its cost is the whole tree's.
"""

from __future__ import annotations

import os
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float] | None:
    """(ppid, CPU seconds incl. reaped children) of one process, None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = raw[raw.rindex(")") + 2:].split()  # after "pid (comm) ": state is fields[0]
    ppid = int(fields[1])
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return ppid, (utime + stime + cutime + cstime) / CLK_TCK


def tree_cpu_s(root: int) -> tuple[float, int]:
    """CPU seconds of ``root`` and all its descendants, and how many processes that is.

    A child that exited and was reaped counts in its parent's cutime/cstime and is no longer in the
    tree; a live one counts in its own utime/stime: nothing is counted twice."""
    stats: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))) is not None:
            stats[int(entry)] = stat
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, count, todo = 0.0, 0, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            total += stats[pid][1]
            count += 1
            todo.extend(children.get(pid, ()))
    return total, count


def children_cpu_s(parent: int) -> dict[int, float]:
    """CPU seconds of each live child of ``parent`` (a supervisor's workers), by pid."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))) is not None and stat[0] == parent:
            found[int(entry)] = stat[1]
    return found
