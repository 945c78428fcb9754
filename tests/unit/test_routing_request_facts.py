"""What the picker reads from a request and from a pod: priority, prompt prefix, load, KV usage."""

from __future__ import annotations

import json

import pytest

from chatfleet.routing.pool_load import kv_usage_of, parse_load
from chatfleet.routing.request_facts import RequestFacts, request_facts


def body(**fields: object) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}).encode()


@pytest.mark.parametrize(("headers", "payload", "objectives", "batch", "from_objective"), [
    ({}, body(), None, False, False),
    ({}, body(priority="batch"), None, True, False),
    ({"x-chatfleet-priority": "Batch "}, body(), None, True, False),
    ({"x-chatfleet-priority": "interactive"}, body(priority="batch"), None, False, False),
    ({"x-gateway-inference-objective": "bulk"}, body(), {"bulk": -1}, True, True),
    ({"x-gateway-inference-objective": "chat"}, body(priority="batch"), {"chat": 0}, False, True),
    ({"x-gateway-inference-objective": "unknown"}, body(priority="batch"), {"chat": 0}, True, False),
    ({"x-chatfleet-priority": "interactive", "x-gateway-inference-objective": "bulk"}, body(), {"bulk": -1},
     False, False),
    ({}, b"not json", None, False, False),
    ({}, b"[1, 2]", None, False, False),
], ids=["default", "body", "header", "header-wins", "sheddable-objective", "objective-over-body",
        "unknown-objective", "header-over-objective", "not-json", "not-an-object"])
def test_priority_comes_from_the_header_then_the_objective_then_the_body(
        headers: dict[str, str], payload: bytes, objectives: dict[str, int] | None, batch: bool,
        from_objective: bool) -> None:
    facts = request_facts(headers, payload, prefix_chars=0, objectives=objectives)

    assert (facts.batch, facts.priority_from_objective) == (batch, from_objective)


def test_the_prefix_key_is_the_model_and_the_prompts_start() -> None:
    system = "You are a helpful assistant for the ChatFleet documentation. " * 4
    first = body(messages=[{"role": "system", "content": system}, {"role": "user", "content": "a"}])
    second = body(messages=[{"role": "system", "content": system}, {"role": "user", "content": "b"}])
    parts = body(messages=[{"role": "system", "content": [{"type": "text", "text": system}]}])

    keys = [request_facts({}, b, prefix_chars=64).prefix_key for b in (first, second, parts)]

    assert keys[0] == keys[1] == keys[2] and keys[0] is not None and keys[0].startswith("m\x1f")
    assert request_facts({}, first, prefix_chars=0) == RequestFacts(batch=False, prefix_key=None)
    assert request_facts({}, json.dumps({"model": "m", "prompt": "abc"}).encode(), prefix_chars=2).prefix_key == "m\x1fab"
    assert request_facts({}, json.dumps({"model": "m"}).encode(), prefix_chars=8).prefix_key is None


def test_a_load_answer_is_read_only_with_every_count() -> None:
    answer = {"slots": 4, "batch_slots": 3, "running": 1, "running_batch": 0, "queued_interactive": 0,
              "queued_batch": 2, "max_queue": 8, "draining": False, "retry_after_s": 1}

    load, arrivals = parse_load("10.0.0.1:8000", answer)
    assert (load.queued_batch, arrivals) == (2, None)  # a gateway older than the arrivals count
    assert parse_load("10.0.0.1:8000", {**answer, "arrivals": 7})[1] == 7
    for broken, says in (({**answer, "running": -1}, "'running'"), ({**answer, "slots": "4"}, "'slots'"),
                         ({**answer, "draining": 0}, "'draining'"), ({**answer, "arrivals": None}, "'arrivals'"),
                         ([], "not a JSON object")):
        with pytest.raises(ValueError, match=says):
            parse_load("10.0.0.1:8000", broken)


def test_kv_usage_is_the_highest_engines_line_and_none_without_one() -> None:
    text = (b"# HELP vllm:kv_cache_usage_perc KV-cache usage.\n# TYPE vllm:kv_cache_usage_perc gauge\n"
            b'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25\n'
            b'vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.5\nvllm:other 1.0\n')

    assert kv_usage_of(text) == 0.5
    assert kv_usage_of(b"vllm:other 1.0\n") is None
