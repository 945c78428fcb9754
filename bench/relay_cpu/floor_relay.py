"""The floor of a Python relay on ChatFleet's stack, for the relay-CPU benchmark (run.py).

A raw ASGI app on uvicorn (httptools, uvloop: what ``chatfleet serve`` runs) that forwards a
streamed completion's upstream bytes unchanged through one aiohttp session, one ASGI ``send`` per
read: no routing, validation, admission, parsing, formatting or metrics. Whatever ChatFleet spends
above it is its own work; what this spends is the price of the Python server and client themselves
(event loop, HTTP parsing, one task per request), which no change inside ChatFleet can remove.

Usage: python bench/relay_cpu/floor_relay.py --port PORT --upstream http://127.0.0.1:STUB
"""

from __future__ import annotations

import argparse
from typing import Any

import aiohttp
import uvicorn


def make_app(upstream: str) -> Any:
    session: aiohttp.ClientSession | None = None

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        nonlocal session
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=4096))
                    await send({"type": "lifespan.startup.complete"})
                else:
                    assert session is not None
                    await session.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["method"] != "POST":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        assert session is not None
        async with session.post(upstream + scope["path"], data=bytes(body),
                                headers={"Content-Type": "application/json"}) as upstream_response:
            await send({"type": "http.response.start", "status": upstream_response.status,
                        "headers": [(b"content-type", b"text/event-stream")]})
            content = upstream_response.content
            while piece := await content.readany():
                await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    uvicorn.run(make_app(args.upstream), host="127.0.0.1", port=args.port, log_level="warning",
                access_log=False, lifespan="on")


if __name__ == "__main__":
    main()
