"""The HTTP side of ``chatfleet kb``: one call to a gateway's Chatchat route, and what went wrong
said the way a shell user needs it.

Every failure becomes a :class:`GatewayError` whose message says what happened and what to type
next, with the exit code of its class (chatfleet/exits.py): the gateway could not be reached (3);
it refused or failed the request (1). The messages the gateway itself sends are Chatchat's
bilingual ones, written for its WebUI; the commands (rag/cli.py) replace those they can recognise
by what a request answered (a name that exists, a knowledge base that does not), not by their text.
"""

from __future__ import annotations

from typing import Any

import httpx

from chatfleet.exits import ExitCode

__all__ = ["DEFAULT_URL", "Gateway", "GatewayError"]

DEFAULT_URL = "http://127.0.0.1:8000"
_TIMEOUT = httpx.Timeout(30, read=600)
"""A large file's upload is split and indexed before the answer comes: minutes on a slow store."""
_START_OR_POINT = (f"start one with `chatfleet serve`, or point at yours with --url URL "
                   f"(or CHATFLEET_URL=URL; the default is {DEFAULT_URL})")


class GatewayError(Exception):
    """A call that did not succeed. ``code``: the ``code`` of Chatchat's envelope when the gateway
    answered with one (404: no such knowledge base, on the routes that take one), else None."""

    def __init__(self, message: str, exit_code: ExitCode, *, code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.code = code


class Gateway:
    """A gateway's base URL and the API key to send, if any."""

    def __init__(self, url: str, api_key: str | None) -> None:
        self.url = url
        self._api_key = api_key

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """The route's JSON answer; raises :class:`GatewayError` for anything else."""
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        try:
            with httpx.Client(base_url=self.url, headers=headers, timeout=_TIMEOUT) as client:
                response = client.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise GatewayError(f"the gateway at {self.url} did not answer in time "
                               f"({type(exc).__name__}): is it overloaded or stuck? Its /readyz "
                               "and log say; or point at another with --url URL",
                               ExitCode.UNREACHABLE) from exc
        except httpx.TransportError as exc:
            raise GatewayError(f"cannot reach the gateway at {self.url} ({exc or type(exc).__name__}): "
                               + _START_OR_POINT, ExitCode.UNREACHABLE) from exc
        return self._answer(response, path)

    def _answer(self, response: httpx.Response, path: str) -> Any:
        try:
            body = response.json()
        except ValueError:
            body = None
        enveloped = isinstance(body, dict) and "code" in body and "msg" in body
        message = str(body["msg"]) if enveloped else response.text[:300]
        if response.status_code == 401:
            raise GatewayError(self._key_message(), ExitCode.REFUSED, code=401)
        if response.status_code == 429:
            wait = response.headers.get("Retry-After")
            raise GatewayError(f"the gateway is busy ({message}): try again"
                               + (f" in {wait} s" if wait else " shortly"), ExitCode.REFUSED,
                               code=429)
        if enveloped:
            code = int(body["code"])
            if code != 200 or response.status_code >= 400:
                what = "failed" if code >= 500 else "refused"
                raise GatewayError(f"the gateway {what} the request (code {code}): {message}",
                                   ExitCode.REFUSED, code=code)
            return body
        if response.status_code == 404:
            raise GatewayError(f"{self.url} has no {path} (HTTP 404): is --url the gateway's base "
                               f"URL, like {DEFAULT_URL}, without /v1?", ExitCode.REFUSED)
        if response.status_code >= 400:
            raise GatewayError(f"the gateway failed the request: HTTP {response.status_code}: "
                               f"{message}", ExitCode.REFUSED)
        if body is None:
            raise GatewayError(f"{self.url}{path} did not answer JSON: is --url a ChatFleet "
                               "gateway?", ExitCode.REFUSED)
        return body

    def _key_message(self) -> str:
        if self._api_key:
            return (f"the gateway at {self.url} did not accept the API key: check CHATFLEET_API_KEY "
                    "or --api-key")
        return (f"the gateway at {self.url} needs an API key, sent as Authorization: Bearer: set "
                "CHATFLEET_API_KEY=KEY, or type `chatfleet kb --api-key KEY` before the command")
