"""What admission did with the request being served (its priority, how long it queued), for
whoever records requests: the HTTP layer's access log (``api/access_log.py``).

The recorder puts a fresh :class:`AdmissionRecord` in :data:`current_admission` before it calls the
code that serves the request, and reads it when the request is over; ``CompletionService`` fills it
in. A context variable rather than a field of ``CompletionJob``: every route that builds a job (the
OpenAI and the Chatchat ones) and the admission gate's early refusals are covered without passing
anything through them, and serving learns nothing about HTTP. The tasks a request starts (a
cancellable wait, a streamed response) copy the context, so they fill in the same record. With no
record set (the fleet simulator, a service called directly), nothing is recorded.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

from chatfleet.serving.admission import Priority

__all__ = ["AdmissionRecord", "current_admission"]


@dataclass(slots=True)
class AdmissionRecord:
    priority: Priority | None = None
    """The priority the request queued with; None if it never reached admission (refused
    before, e.g. a bad body, or not a completion)."""
    queue_wait_s: float | None = None
    """Seconds from arrival (a knowledge-base chat: from the end of retrieval) until a slot was
    granted or admission refused it; None while it still waits, or if it never queued."""


current_admission: ContextVar[AdmissionRecord | None] = ContextVar("chatfleet_admission",
                                                                  default=None)
"""The record of the request this task serves, if its recorder set one."""
