"""The routing score: which pod a request goes to, given each pod's admission as last reported."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest

from chatfleet.routing.scoring import Pick, PodLoad, Refusal, RoutingSpec, Tier, pick


def pod(endpoint: str, *, running: int = 0, running_batch: int = 0, queued_i: int = 0, queued_b: int = 0,
        slots: int = 8, batch_slots: int = 6, max_queue: int = 16, **kw: object) -> PodLoad:
    return PodLoad(endpoint=endpoint, slots=slots, batch_slots=batch_slots, running=running,
                   running_batch=running_batch, queued_interactive=queued_i, queued_batch=queued_b,
                   max_queue=max_queue, **kw)  # type: ignore[arg-type]


def picked(result: Pick | Refusal) -> str:
    assert isinstance(result, Pick), result
    return result.endpoint


def test_a_full_pod_is_avoided_while_another_has_a_free_slot() -> None:
    pods = [pod("10.0.0.1:8000", running=8, queued_i=5), pod("10.0.0.2:8000", running=7)]

    result = pick(pods, batch=False)

    assert result == Pick("10.0.0.2:8000", Tier.SLOT)


def test_the_least_loaded_pod_wins_and_kv_usage_breaks_equal_slot_counts() -> None:
    pods = [pod("a:1", running=4), pod("b:1", running=2), pod("c:1", running=2, kv_usage=0.9)]

    assert picked(pick(pods, batch=False)) == "b:1"


def test_pending_picks_spread_a_burst_between_two_polls() -> None:
    """Requests sent since the last observation count as running, so a burst is shared."""
    loads = {"a:1": pod("a:1"), "b:1": pod("b:1"), "c:1": pod("c:1")}
    sent: Counter[str] = Counter()
    for _ in range(12):
        endpoint = picked(pick([replace(p, pending=sent[e]) for e, p in loads.items()], batch=False))
        sent[endpoint] += 1

    assert sent == {"a:1": 4, "b:1": 4, "c:1": 4}


def test_equal_pods_take_turns_for_one_request_after_another() -> None:
    pods = [pod("a:1", running=1), pod("b:1", running=1), pod("c:1", running=1), pod("d:1", running=3)]

    picked_in_turn = [picked(pick(pods, batch=False, turn=turn)) for turn in range(6)]

    assert picked_in_turn == ["a:1", "b:1", "c:1", "a:1", "b:1", "c:1"]


def test_with_every_slot_taken_the_shortest_queue_gets_the_request() -> None:
    pods = [pod("a:1", running=8, queued_i=6), pod("b:1", running=8, queued_i=2)]

    assert pick(pods, batch=False) == Pick("b:1", Tier.QUEUE)


def test_every_queue_full_is_429_with_the_soonest_retry_after() -> None:
    pods = [pod("a:1", running=8, queued_i=16, retry_after_s=7), pod("b:1", running=8, queued_i=16, retry_after_s=3)]

    result = pick(pods, batch=False)

    assert isinstance(result, Refusal)
    assert (result.status, result.retry_after_s) == (429, 3)
    assert "queue is full" in result.message


def test_interactive_displaces_queued_batch_on_a_full_pod_rather_than_being_refused() -> None:
    pods = [pod("a:1", running=8, queued_i=16), pod("b:1", running=8, queued_i=10, queued_b=6)]

    assert pick(pods, batch=False) == Pick("b:1", Tier.DISPLACE)


def test_batch_is_refused_before_interactive_under_saturation() -> None:
    """Half the queue is batch's share: past it batch gets 429 while interactive still queues."""
    pods = [pod("a:1", running=8, running_batch=6, queued_i=9), pod("b:1", running=8, running_batch=6, queued_i=8)]

    batch = pick(pods, batch=True)
    interactive = pick(pods, batch=False)

    assert isinstance(batch, Refusal) and batch.status == 429
    assert interactive == Pick("b:1", Tier.QUEUE)


def test_batch_goes_to_the_pod_with_the_most_free_batch_slots() -> None:
    """Pod a has free slots but its batch share is taken; b has batch room."""
    pods = [pod("a:1", running=6, running_batch=6), pod("b:1", running=7, running_batch=2)]

    assert pick(pods, batch=True) == Pick("b:1", Tier.SLOT)
    assert pick(pods, batch=False) == Pick("a:1", Tier.SLOT)


def test_pending_batch_counts_against_the_batch_share_only() -> None:
    loads = [pod("a:1", running=2, running_batch=5, pending=1, pending_batch=1), pod("b:1", running=3)]

    assert pick(loads, batch=True) == Pick("b:1", Tier.SLOT)


@pytest.mark.parametrize("change", [{"draining": True}, {"age_s": 2.5}, {"slots": 0}])
def test_draining_stale_or_slotless_pods_are_not_eligible(change: dict[str, object]) -> None:
    pods = [pod("a:1", **change), pod("b:1", running=8, queued_i=3)]

    assert picked(pick(pods, batch=False)) == "b:1"


def test_no_eligible_pod_is_503_saying_why() -> None:
    result = pick([pod("a:1", draining=True)], batch=False)

    assert isinstance(result, Refusal) and result.status == 503
    assert "no pod is ready" in result.message
    assert pick([], batch=False) == result


def test_the_subset_hint_limits_the_choice_and_an_empty_or_unknown_subset_is_503() -> None:
    pods = [pod("a:1"), pod("b:1", running=7)]

    assert picked(pick(pods, batch=False, subset=frozenset({"b:1"}))) == "b:1"
    empty = pick(pods, batch=False, subset=frozenset())
    unknown = pick(pods, batch=False, subset=frozenset({"c:1"}))
    assert isinstance(empty, Refusal) and empty.status == 503 and "subset is empty" in empty.message
    assert isinstance(unknown, Refusal) and unknown.status == 503 and "1 endpoint" in unknown.message


def test_a_prefix_sticks_to_one_pod_while_it_has_room_and_keys_spread() -> None:
    pods = [pod(f"10.0.0.{i}:8000", running=2) for i in range(4)]

    homes = {key: picked(pick(pods, batch=False, prefix_key=key)) for key in map(str, range(200))}
    again = {key: picked(pick(pods, batch=False, prefix_key=key)) for key in homes}

    assert again == homes
    assert min(Counter(homes.values()).values()) >= 30  # about 50 keys per pod


def test_a_prefix_leaves_its_pod_once_it_is_much_busier_than_the_least_loaded() -> None:
    pods = [pod(f"10.0.0.{i}:8000", running=2) for i in range(3)]
    home = picked(pick(pods, batch=False, prefix_key="system prompt"))
    busier = [replace(p, running=6) if p.endpoint == home else p for p in pods]  # 0.75 vs 0.25 used

    assert picked(pick(busier, batch=False, prefix_key="system prompt")) != home
    slightly = [replace(p, running=3) if p.endpoint == home else p for p in pods]  # within the slack
    assert picked(pick(slightly, batch=False, prefix_key="system prompt")) == home


def test_spec_bounds_are_honoured() -> None:
    pods = [pod("a:1", age_s=5.0)]

    assert picked(pick(pods, batch=False, spec=RoutingSpec(stale_after_s=10.0))) == "a:1"
    assert isinstance(pick(pods, batch=False), Refusal)
