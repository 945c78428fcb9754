"""The body the gateway sends its engine: the same JSON whichever encoder wrote it."""

from __future__ import annotations

import json

import pytest

from chatfleet.engines.openai_compat import _encoded


@pytest.mark.parametrize("body", [
    {"model": "m", "stream": True, "messages": [{"role": "user", "content": "héllo ✓ \"q\" \n"}],
     "temperature": 0.7, "max_tokens": 256, "stream_options": {"include_usage": True}},
    {"model": "m", "prompt": "p", "seed": 2**63 - 1, "logit_bias": {"50256": -100.0}},
    {"model": "m", "prompt": "p", "seed": 2**70},  # over orjson's 64 bits: the stdlib's way
    {"model": "m", "prompt": "p", "response_format": {"type": "json_schema", "max": -(2**80)}},
])
def test_the_body_is_compact_utf8_json_of_the_same_values(body: dict) -> None:
    assert _encoded(body) == json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def test_a_lone_surrogate_fails_as_it_always_did() -> None:
    with pytest.raises(UnicodeEncodeError):
        _encoded({"model": "m", "prompt": "\ud800"})
