"""API-key settings and matching: CHATFLEET_API_KEYS as a plain comma-separated list, keys kept out
of every repr, dump and configuration error, the Authorization header forms accepted, and the
constant-time key ring. The HTTP behaviour is tested on a real gateway in
tests/integration/test_api_keys.py."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError

from chatfleet.api.auth import ApiKeyAuth, KeyRing, bearer_token
from chatfleet.settings import Settings, masked_dump
from chatfleet.telemetry.metrics import AuthRejection

KEY_A = "sk-unit-0123456789abcdef-A"
KEY_B = "sk-unit-0123456789abcdef-B"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("CHATFLEET_")]:
        monkeypatch.delenv(key)


@pytest.mark.parametrize(("raw", "keys"), [
    (None, []),
    ("", []),
    (KEY_A, [KEY_A]),
    (f"{KEY_A},{KEY_B}", [KEY_A, KEY_B]),
    (f"  {KEY_A} ,\t{KEY_B} ,, ", [KEY_A, KEY_B]),
    (f"{KEY_A},{KEY_A},{KEY_B}", [KEY_A, KEY_B]),
    (" , ,", []),
], ids=["unset", "empty", "one", "two", "spaces-and-blanks", "repeated", "only-separators"])
def test_api_keys_are_a_plain_comma_separated_list(raw: str | None, keys: list[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    if raw is not None:
        monkeypatch.setenv("CHATFLEET_API_KEYS", raw)
    assert [k.get_secret_value() for k in Settings().api_keys] == keys


def test_keys_never_show_in_repr_dump_or_config_output(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATFLEET_API_KEYS", f"{KEY_A},{KEY_B}")
    settings = Settings()
    dumped = json.dumps(masked_dump(settings))
    for text in (repr(settings), str(settings), dumped, repr(settings.api_keys)):
        assert KEY_A not in text and KEY_B not in text
    assert masked_dump(settings)["api_keys"] == ["**********", "**********"]
    again = Settings.model_validate(settings.model_dump())  # how `chatfleet serve` applies flags
    assert [k.get_secret_value() for k in again.api_keys] == [KEY_A, KEY_B]


@pytest.mark.parametrize("env", [
    {"CHATFLEET_ENGINE__KIND": "openai"},
    {"CHATFLEET_ADMISSION__ENGINE_SLOTS": "zero"},
    {"CHATFLEET_KB__CHUNK_OVERLAP": "900", "CHATFLEET_KB__PG_DSN": "postgresql://u:pw-in-dsn@db/kb"},
    {"CHATFLEET_AUTH__RATE_LIMIT_BURST": "0"},
], ids=["settings-level-check", "field-error", "section-check", "auth-field"])
def test_a_refused_configuration_does_not_print_the_keys(env: dict[str, str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A Settings-level check's input is the whole environment: pydantic would print it."""
    monkeypatch.setenv("CHATFLEET_API_KEYS", f"{KEY_A},{KEY_B}")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as info:
        Settings()
    text = str(info.value)
    assert "sk-unit" not in text and "pw-in-dsn" not in text, "not even a key's first characters"
    assert "validation error" in text


def test_a_rate_limit_without_keys_is_refused_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATFLEET_AUTH__RATE_LIMIT_RPS", "5")
    with pytest.raises(ValidationError, match="auth.rate_limit_rps is set but api_keys is empty"):
        Settings()
    monkeypatch.setenv("CHATFLEET_API_KEYS", KEY_A)
    assert Settings().auth.rate_limit_rps == 5


@pytest.mark.parametrize(("headers", "token", "present"), [
    ([], None, False),
    ([(b"content-type", b"application/json")], None, False),
    ([(b"authorization", b"Bearer sk-1")], b"sk-1", True),
    ([(b"authorization", b"bearer sk-1")], b"sk-1", True),
    ([(b"authorization", b"BEARER   sk-1  ")], b"sk-1", True),
    ([(b"authorization", b"Bearer")], None, True),
    ([(b"authorization", b"Bearer   ")], None, True),
    ([(b"authorization", b"Basic dXNlcjpwdw==")], None, True),
    ([(b"authorization", b"sk-1")], None, True),
    ([(b"authorization", b"Bearer sk-1"), (b"authorization", b"Bearer sk-2")], b"sk-1", True),
], ids=["none", "other-headers", "bearer", "lowercase-scheme", "extra-spaces", "scheme-only",
        "blank-key", "basic", "key-without-scheme", "first-of-two"])
def test_the_key_is_read_from_authorization_bearer_only(headers: list[tuple[bytes, bytes]],
                                                        token: bytes | None, present: bool) -> None:
    assert bearer_token(headers) == (token, present)


def test_the_key_ring_matches_any_configured_key_and_keeps_only_digests() -> None:
    ring = KeyRing([SecretStr(KEY_A), SecretStr(KEY_B)])
    assert ring.match(KEY_A.encode()) == 0
    assert ring.match(KEY_B.encode()) == 1
    for wrong in (b"", KEY_A[:-1].encode(), KEY_A.encode() + b"x", KEY_A.lower().encode(), b"sk"):
        assert ring.match(wrong) is None
    assert KEY_A not in repr(ring) and KEY_A.encode() not in repr(vars(ring)).encode()
    with pytest.raises(ValueError):
        KeyRing([])


async def test_a_websocket_without_a_key_is_closed_before_it_reaches_the_app() -> None:
    """No route is a WebSocket today; one added later is still behind the key."""
    reached: list[str] = []
    sent: list[dict[str, Any]] = []
    refused: list[AuthRejection] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope["path"])

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    auth = ApiKeyAuth(app, keys=[SecretStr(KEY_A)], on_reject=refused.append)
    await auth({"type": "websocket", "path": "/v1/realtime", "headers": []}, receive, send)
    assert sent == [{"type": "websocket.close", "code": 1008, "reason": ""}]
    assert refused == [AuthRejection.MISSING] and not reached
    headers = [(b"authorization", f"Bearer {KEY_A}".encode())]
    await auth({"type": "websocket", "path": "/v1/realtime", "headers": headers}, receive, send)
    assert reached == ["/v1/realtime"]
