"""How long the supervisor waits before it restarts a worker that died.

A worker that crashes at once again and again (a bad upstream URL does not do it, a bug might)
must not be restarted in a tight loop that burns the pod's CPU and floods the log: each quick
death doubles the wait, up to ``max_s``. A worker that had lived ``reset_after_s`` died of
something else (the OOM killer, a rare crash): it is replaced at once, and the count starts over.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RestartBackoff"]


@dataclass
class RestartBackoff:
    first_s: float = 0.5
    """The wait after the second quick death in a row (the first is replaced at once)."""
    max_s: float = 30.0
    reset_after_s: float = 60.0
    _quick_deaths: int = 0

    def delay(self, lived_s: float) -> float:
        """Seconds to wait before replacing a worker that lived ``lived_s`` seconds."""
        if lived_s >= self.reset_after_s:
            self._quick_deaths = 0
        self._quick_deaths += 1
        if self._quick_deaths == 1:
            return 0.0
        return min(self.max_s, self.first_s * 2 ** (self._quick_deaths - 2))
