"""Which pods of an InferencePool are endpoints, and at which addresses (routing/kube_pool.py)."""

from __future__ import annotations

from typing import Any

import pytest

from chatfleet.routing.kube_pool import PoolSpec, is_ready, pod_endpoints, pool_spec

SPEC = PoolSpec(match_labels=(("app", "chatfleet"),), ports=(8000,))


def pod(ip: str | None = "10.0.0.7", *, ready: str = "True", deleting: bool = False,
        labels: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "p", "labels": {"app": "chatfleet"} if labels is None else labels}
    if deleting:
        meta["deletionTimestamp"] = "2026-12-05T00:00:00Z"
    status: dict[str, Any] = {"conditions": [{"type": "PodScheduled", "status": "True"},
                                             {"type": "Ready", "status": ready}]}
    if ip is not None:
        status["podIP"] = ip
    return {"metadata": meta, "status": status}


def test_ready_means_the_ready_condition_an_address_and_not_being_deleted() -> None:
    assert is_ready(pod())
    assert not is_ready(pod(ready="False"))
    assert not is_ready(pod(ready="Unknown"))
    assert not is_ready(pod(ip=None))
    assert not is_ready(pod(deleting=True))  # out at once, before the kubelet flips Ready
    assert not is_ready({"metadata": {"name": "p"}, "status": {"podIP": "10.0.0.7"}})  # no conditions yet


def test_every_target_port_of_a_selected_ready_pod_is_an_endpoint() -> None:
    two_ports = PoolSpec(SPEC.match_labels, (8000, 8001))

    assert pod_endpoints(pod(), two_ports) == {"10.0.0.7:8000", "10.0.0.7:8001"}
    assert pod_endpoints(pod("fd00::7"), SPEC) == {"[fd00::7]:8000"}
    assert pod_endpoints(pod(labels={"app": "other"}), SPEC) == frozenset()
    assert pod_endpoints(pod(ready="False"), SPEC) == frozenset()


def test_the_pool_spec_is_its_match_labels_and_target_ports() -> None:
    pool = {"spec": {"selector": {"matchLabels": {"tier": "gpu", "app": "chatfleet"}},
                     "targetPorts": [{"number": 8000}, {"number": 8001}],
                     "endpointPickerRef": {"name": "epp", "port": {"number": 9002}}}}

    spec = pool_spec(pool)

    assert spec.label_selector == "app=chatfleet,tier=gpu"
    assert spec.ports == (8000, 8001)
    assert spec.selects({"app": "chatfleet", "tier": "gpu", "extra": "x"})
    assert not spec.selects({"app": "chatfleet"})


@pytest.mark.parametrize("spec", [
    {"selector": {"matchLabels": {}}, "targetPorts": [{"number": 8000}]},
    {"selector": {"matchLabels": {"app": "x"}}, "targetPorts": []},
    {"selector": {"matchLabels": {"app": "x"}}, "targetPorts": [{"number": 0}]},
    {"selector": {"matchLabels": {"app": "x"}}},
])
def test_a_pool_without_a_selector_or_ports_is_refused(spec: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="spec"):
        pool_spec({"spec": spec})
