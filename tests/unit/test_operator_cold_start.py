"""Which cold start a ChatFleetPolicy's forecast looks ahead by: the policy's own figure, else
the one learned from its pods, else the default (autoscale/operator.py)."""

from __future__ import annotations

import math

import pytest

from chatfleet.autoscale.operator import (
    DEFAULT_COLD_START_S,
    MAX_COLD_START_S,
    PolicyError,
    cold_start_for,
    parse_policy,
)

SPEC = {"targetRef": {"kind": "HorizontalPodAutoscaler", "name": "chatfleet"},
        "minReplicas": 1, "maxReplicas": 8, "replicaCapacity": 4}


def test_a_configured_cold_start_wins_over_the_learned_one() -> None:
    assert cold_start_for(45.0, 300.0) == (45.0, "configured")
    assert cold_start_for(0.0, 300.0) == (0.0, "configured")


def test_unset_the_learned_one_is_used_up_to_the_crds_maximum() -> None:
    assert cold_start_for(None, 212.5) == (212.5, "learned")
    assert cold_start_for(None, 5 * 3600.0) == (MAX_COLD_START_S, "learned")


@pytest.mark.parametrize("learned", [None, math.nan, -1.0])
def test_with_nothing_learned_the_default(learned: float | None) -> None:
    assert cold_start_for(None, learned) == (DEFAULT_COLD_START_S, "default") == (120.0, "default")


def test_the_policy_says_whether_it_sets_one() -> None:
    unset = parse_policy(SPEC)
    assert unset.cold_start_s is None and unset.spec.cold_start_s == DEFAULT_COLD_START_S
    assert parse_policy({**SPEC, "coldStartSeconds": None}).cold_start_s is None
    configured = parse_policy({**SPEC, "coldStartSeconds": 300})
    assert configured.cold_start_s == 300.0 == configured.spec.cold_start_s
    with pytest.raises(PolicyError, match="coldStartSeconds must be a number"):
        parse_policy({**SPEC, "coldStartSeconds": "2m"})
    with pytest.raises(PolicyError, match="cold_start_s must be >= 0"):
        parse_policy({**SPEC, "coldStartSeconds": -5})
