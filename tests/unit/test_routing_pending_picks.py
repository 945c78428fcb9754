"""What the endpoint picker counts as sent to a pod and not yet in the pod's load answer."""

from __future__ import annotations

from chatfleet.routing.pool_load import PendingPicks


def picks(*sent: tuple[float, bool], arrivals: int | None = 10) -> PendingPicks:
    """Pending picks after a first answer (``arrivals``) at t=0, then ``sent`` (time, batch)."""
    pending = PendingPicks(forget_after_s=1.0)
    pending.answered(0.0, arrivals)
    for at, batch in sent:
        pending.add(at, batch=batch)
    return pending


def test_picks_stay_pending_until_the_pods_arrivals_count_them_however_late_the_poll() -> None:
    pending = picks((0.10, False), (0.11, True), (0.12, False))

    pending.answered(0.20, 11)  # asked after all three; one of them has arrived
    assert (len(pending), pending.batch) == (2, 1)
    pending.answered(0.25, 11)
    assert len(pending) == 2
    pending.answered(0.30, 13)
    assert (len(pending), pending.batch) == (0, 0)


def test_a_pick_sent_after_the_poll_was_asked_is_taken_out_when_the_answer_counts_it() -> None:
    pending = picks((0.10, False))

    pending.answered(0.05, 11)  # the request overtook the poll's answer

    assert len(pending) == 0


def test_a_pick_that_never_reaches_admission_is_forgotten() -> None:
    pending = picks((0.10, True), (0.50, False))

    assert pending.answered(1.05, 10) == 0
    assert (len(pending), pending.batch) == (2, 1)
    assert pending.answered(1.15, 10) == 1  # the first is more than a second old
    assert (len(pending), pending.batch) == (1, 0)
    assert pending.answered(1.20, 11) == 0  # the second arrived: taken out, not forgotten
    assert len(pending) == 0


def test_without_an_arrivals_count_an_answer_takes_out_what_was_sent_before_its_poll() -> None:
    pending = picks((0.10, False), (0.30, False), arrivals=None)

    pending.answered(0.20, None)

    assert len(pending) == 1


def test_a_restarted_gateway_counting_from_zero_is_read_as_without_a_count() -> None:
    pending = picks((0.10, False), (0.30, False))

    pending.answered(0.20, 0)
    assert len(pending) == 1
    pending.answered(0.40, 1)  # counting from the new process's answer on
    assert len(pending) == 0
