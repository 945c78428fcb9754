"""API keys on a real gateway (engine-sim upstream, 127.0.0.1): what a client without a key, with a
wrong key, with a right key and over its key's rate sees, on the OpenAI and the Chatchat routes;
what stays open (probes, /metrics, the API docs); the refusals' metric; and that no key reaches
the gateway's log, even at log level debug."""

from __future__ import annotations

import asyncio
import secrets

import httpx
import openai
import pytest
from typer.testing import CliRunner

from chatfleet.cli import app
from tests.conftest import SIM_MODEL, Server, chat, upstream_env
from tests.support.metrics import value

PUBLIC = ["/livez", "/readyz", "/load", "/metrics", "/openapi.json", "/docs"]
PROTECTED = [
    ("POST", "/v1/chat/completions", chat(3)),
    ("GET", "/v1/models", None),
    ("POST", "/chat/chat/completions", {"model": SIM_MODEL, "messages": [{"role": "user", "content": "hi"}],
                                        "max_tokens": 3, "stream": False}),
    ("GET", "/knowledge_base/list_knowledge_bases", None),
    ("GET", "/no/such/route", None),
    ("GET", "/metrics/engine", None),  # each call can reach the engine (issue 12)
]


def new_key() -> str:
    return "sk-test-" + secrets.token_urlsafe(24)


def rejections(gw: Server, reason: str) -> float:
    return value(gw.metrics(), "chatfleet_auth_rejections_total", reason=reason)


def assert_refused(r: httpx.Response, path: str, status: int, *, says: str) -> str:
    """The refusal's message, after checking status and envelope; the envelope is Chatchat's on its
    routes (same HTTP status), OpenAI's elsewhere."""
    assert r.status_code == status, (path, r.status_code, r.text)
    body = r.json()
    if path.startswith(("/chat/", "/knowledge_base/")):
        assert body["code"] == status and body["data"] is None, body
        message = body["msg"]
    else:
        error = body["error"]
        assert error["code"] == status, body
        assert error["type"] == ("authentication_error" if status == 401 else "rate_limit_exceeded")
        message = error["message"]
    assert says in message, message
    return message


async def test_without_a_valid_key_every_api_route_is_refused_and_the_probes_stay_open(
        engine_sim, gateway) -> None:
    key_a, key_b, wrong = new_key(), new_key(), new_key()
    sim: Server = engine_sim()
    gw: Server = gateway({**upstream_env(sim, server__log_level="debug"),
                          "CHATFLEET_API_KEYS": f"{key_a}, {key_b}"})

    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
        for path in PUBLIC:
            r = await client.get(path)
            assert r.status_code == 200, (path, r.status_code, r.text)

        for method, path, body in PROTECTED:
            r = await client.request(method, path, json=body)
            assert_refused(r, path, 401, says="send the header 'Authorization: Bearer <key>'")
            assert r.headers["WWW-Authenticate"] == "Bearer"

            r = await client.request(method, path, json=body, headers={"Authorization": wrong})
            assert_refused(r, path, 401, says="not of the form 'Bearer <key>'")

            r = await client.request(method, path, json=body,
                                     headers={"Authorization": f"Bearer {wrong}"})
            message = assert_refused(r, path, 401, says="is not accepted here")
            assert wrong not in r.text and wrong[8:20] not in message
            assert r.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'

        for key in (key_a, key_b):  # both keys work: how a key is rotated
            r = await client.post("/chat/chat/completions", json=PROTECTED[2][2],
                                  headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"]

    assert rejections(gw, "missing") == 2 * len(PROTECTED)
    assert rejections(gw, "invalid") == len(PROTECTED)
    assert rejections(gw, "rate_limited") == 0

    sdk = openai.AsyncOpenAI(base_url=gw.v1, api_key=key_a, max_retries=0, timeout=30)
    assert SIM_MODEL in [m.id async for m in sdk.models.list()]
    answer = await sdk.chat.completions.create(
        model=SIM_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
        extra_body={"ignore_eos": True})
    assert answer.usage is not None and answer.usage.completion_tokens == 5
    stream = await sdk.chat.completions.create(
        model=SIM_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True,
        extra_body={"ignore_eos": True})
    assert sum([1 async for c in stream if c.choices and c.choices[0].delta.content]) == 5

    stranger = openai.AsyncOpenAI(base_url=gw.v1, api_key=wrong, max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError) as info:
        await stranger.chat.completions.create(model=SIM_MODEL, messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 401 and "is not accepted here" in info.value.message
    assert rejections(gw, "invalid") == len(PROTECTED) + 1

    log = gw.proc.log_text()
    assert "API keys required on every route but" in log and "2 key(s)" in log
    assert "DEBUG" in log and "refused POST /v1/chat/completions: invalid" in log, (
        "the gateway logged at debug level, so the next assertion means something")
    for key in (key_a, key_b, wrong):
        assert key not in log and key[8:20] not in log, gw.proc.log_tail()


async def test_a_key_over_its_rate_gets_429_while_another_key_is_served(engine_sim, gateway) -> None:
    """0.25 requests/s, bursts of 3, per key: of four requests key A sends at once one is refused,
    with a Retry-After that, waited, is enough; key B, in the same process, is served meanwhile.
    /openapi.json declares the bearer scheme and the 401 and 429 on protected routes only."""
    key_a, key_b = new_key(), new_key()
    sim: Server = engine_sim()
    gw: Server = gateway({**upstream_env(sim, auth__rate_limit_rps=0.25, auth__rate_limit_burst=3),
                          "CHATFLEET_API_KEYS": f"{key_a},{key_b}"})
    a = openai.AsyncOpenAI(base_url=gw.v1, api_key=key_a, max_retries=0, timeout=30)

    results = await asyncio.gather(*(a.models.list() for _ in range(4)), return_exceptions=True)
    refusals = [r for r in results if isinstance(r, BaseException)]
    assert len(refusals) == 1 and isinstance(refusals[0], openai.RateLimitError), results
    refused = refusals[0].response
    retry_after = int(refused.headers["Retry-After"])
    assert 1 <= retry_after <= 4, retry_after
    assert_refused(refused, "/v1/models", 429, says="over its rate limit of 0.25 requests/s (bursts of 3)")

    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
        r = await client.get("/knowledge_base/list_knowledge_bases",
                             headers={"Authorization": f"Bearer {key_a}"})
        assert_refused(r, "/knowledge_base/list_knowledge_bases", 429, says="retry after")
        retry_after = int(r.headers["Retry-After"])
        assert 1 <= retry_after <= 4, retry_after
        for _ in range(3):
            assert (await client.get("/v1/models", headers={"Authorization": f"Bearer {key_b}"})
                    ).status_code == 200, "key B has its own bucket"
        assert (await client.get("/metrics")).status_code == 200, "the scrape is never limited"

    assert rejections(gw, "rate_limited") == 2
    document = (await client_get_openapi(gw))
    assert document["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    chat_responses = document["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"401", "429"} <= set(chat_responses) and "Retry-After" in chat_responses["429"]["headers"]
    kb_list = document["paths"]["/knowledge_base/list_knowledge_bases"]["get"]
    assert kb_list["security"] == [{"apiKey": []}] and "401" in kb_list["responses"]
    assert "security" not in document["paths"]["/readyz"]["get"]
    await asyncio.sleep(retry_after)
    answer = await a.chat.completions.create(model=SIM_MODEL, messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=3, extra_body={"ignore_eos": True})
    assert answer.usage is not None and answer.usage.completion_tokens == 3
    assert rejections(gw, "rate_limited") == 2
    assert rejections(gw, "missing") == rejections(gw, "invalid") == 0
    metrics = gw.metrics()
    assert key_a not in metrics and key_b not in metrics


async def client_get_openapi(gw: Server) -> dict:
    """The gateway's /openapi.json, fetched without a key (it is public)."""
    async with httpx.AsyncClient(timeout=10) as client:
        return (await client.get(gw.url + "/openapi.json")).json()


def test_the_kb_command_sends_its_api_key(engine_sim, gateway) -> None:
    """``chatfleet kb`` against a gateway with keys: refused (exit 1, the gateway's message)
    without one, served with ``--api-key`` or CHATFLEET_API_KEY."""
    key = new_key()
    gw: Server = gateway({**upstream_env(engine_sim()), "CHATFLEET_API_KEYS": key})
    runner = CliRunner()
    refused = runner.invoke(app, ["kb", "list", "--url", gw.url])
    assert refused.exit_code == 1 and "Authorization: Bearer" in refused.output
    assert runner.invoke(app, ["kb", "--api-key", key, "create", "keyed", "--url", gw.url]).exit_code == 0
    listed = runner.invoke(app, ["kb", "list", "--url", gw.url], env={"CHATFLEET_API_KEY": key})
    assert listed.exit_code == 0 and "keyed" in listed.output
    assert key not in listed.output + gw.proc.log_text()
