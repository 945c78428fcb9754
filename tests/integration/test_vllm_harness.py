"""What tests built on the vLLM harness rely on, checked directly against the real server."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.support.metrics import samples
from tests.support.metrics import value as metric_value
from tests.support.procs import wait_until
from tests.support.vllm_cpu import VLLMServer

pytestmark = pytest.mark.vllm

METRIC_FAMILIES = [
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:time_to_first_token_seconds",
    "vllm:inter_token_latency_seconds",
    "vllm:e2e_request_latency_seconds",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:request_success_total",
]
RUNNING = "vllm:num_requests_running"
SUCCESS = "vllm:request_success_total"
GENERATED = "vllm:generation_tokens_total"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say something."}]


def client(server: VLLMServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60.0)


def test_models_endpoint_lists_the_served_name_tiny(vllm_server: VLLMServer) -> None:
    models = httpx.get(f"{vllm_server.base_url}/models", timeout=10.0).json()

    assert [m["id"] for m in models["data"]] == ["tiny"]


def test_streamed_chat_with_ignore_eos_yields_exactly_max_tokens_and_reports_usage(
    vllm_server: VLLMServer,
) -> None:
    stream = client(vllm_server).chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    chunks = list(stream)

    choices = [c.choices[0] for c in chunks if c.choices]
    # Count token ids, not chunks: vLLM may merge tokens into one chunk when the reader lags.
    # (Not logprobs: the first logprobs request costs vLLM ~10 s of torch.compile.)
    tokens = [t for c in choices for t in getattr(c, "token_ids", None) or []]
    assert len(tokens) == 16
    assert "".join(c.delta.content or "" for c in choices)
    assert choices[-1].finish_reason == "length"
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 16 and usage.prompt_tokens > 0


def test_non_streamed_chat_returns_a_message_and_usage(vllm_server: VLLMServer) -> None:
    completion = client(vllm_server).chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=8,
        extra_body={"ignore_eos": True},
    )

    assert completion.choices[0].message.content
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 8


def test_metrics_expose_the_families_a_gateway_reads(vllm_server: VLLMServer) -> None:
    client(vllm_server).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4)

    text = vllm_server.metrics_text()

    for family in METRIC_FAMILIES:
        assert f"# TYPE {family} " in text, family
    finish_reasons = {dict(labels).get("finished_reason") for name, labels in samples(text) if name == SUCCESS}
    assert {"stop", "length", "abort", "error"} <= finish_reasons
    assert metric_value(text, SUCCESS, finished_reason="length", model_name="tiny") >= 1
    assert metric_value(text, "vllm:time_to_first_token_seconds_count") >= 1


def test_engine_runs_at_most_max_num_seqs_sequences_and_queues_the_rest(vllm_server: VLLMServer) -> None:
    """Of six sequences that reach the engine together, four take the slots and two wait.

    ``n=6`` makes vLLM add six sequences at once, so the outcome does not hang on when six
    separate requests would get through an API server that generation starves of CPU; vLLM's
    queue-time histogram gives the verdict, as sampled gauges can miss the moment.
    """
    assert vllm_server.max_num_seqs == 4
    before = vllm_server.metrics_text()

    completion = client(vllm_server).chat.completions.create(
        model="tiny", messages=MESSAGES, n=6, max_tokens=300, extra_body={"ignore_eos": True}
    )

    assert len(completion.choices) == 6
    after = vllm_server.metrics_text()

    def queued(**labels: str) -> float:
        name = "vllm:request_queue_time_seconds_" + ("bucket" if labels else "count")
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    assert queued() == 6
    # Four started at once; two waited for one of them to finish 300 tokens (over a second).
    assert queued(le="0.3") == 4


def test_client_disconnect_stops_generation_but_is_not_counted_as_abort(vllm_server: VLLMServer) -> None:
    """vLLM 0.32 drops a disconnected request without recording it as finished
    (vllm-project/vllm#31503): request_success_total{finished_reason="abort"} stays put, so a
    gateway that wants abort counts must keep its own.

    ``n=4`` with 2000 tokens each gives the engine 8000 tokens of work (about 7 s here, alone), so
    the disconnect lands mid-generation even when the busy 2-core machine starves this client for
    a few seconds after the first chunk (CI once saw all of 4000 tokens generated first).
    """
    before = vllm_server.metrics_text()
    body = {"model": "tiny", "messages": MESSAGES, "n": 4, "max_tokens": 2000, "stream": True, "ignore_eos": True}

    with httpx.stream("POST", f"{vllm_server.base_url}/chat/completions", json=body, timeout=60.0) as response:
        next(line for line in response.iter_lines() if line.startswith("data: "))  # generation has begun

    wait_until(lambda: vllm_server.metric(RUNNING) == 0, timeout=30.0, message="engine idle")
    after = vllm_server.metrics_text()
    time.sleep(1.0)  # a request still generating would add hundreds of tokens a second

    assert vllm_server.metric(GENERATED) == metric_value(after, GENERATED)
    assert 1 <= metric_value(after, GENERATED) - metric_value(before, GENERATED) < 8000
    assert metric_value(after, SUCCESS) == metric_value(before, SUCCESS)
    assert metric_value(after, SUCCESS, finished_reason="abort") == 0
