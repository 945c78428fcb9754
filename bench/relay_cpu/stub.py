"""A minimal OpenAI-compatible upstream for the relay-CPU benchmark (bench/relay_cpu/run.py).

Serves ``GET /health``, ``GET /v1/models`` and streaming ``POST /v1/chat/completions`` on 127.0.0.1.
Each stream sends a role chunk, then ``max_tokens`` content chunks paced 20 ms apart (an absolute
schedule, as an engine's decode steps: a late chunk does not push the later ones back), a finish
chunk, a usage chunk when ``stream_options.include_usage`` asks for one, and ``data: [DONE]``.
Every content chunk is one word, `` t<i>``, different from the one before (LiteLLM aborts a stream
after 100 identical chunks), so a client counts tokens as words even where a gateway coalesces.
Chunks are pre-encoded byte templates: the stub's own CPU per token stays small and is measured apart.
``GET /stats`` answers the most streams it ever had open at once and how many it served.

Usage: python bench/relay_cpu/stub.py --port PORT [--model NAME] [--pace-ms 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from aiohttp import web

STATS = {"open": 0, "max_open": 0, "streams": 0}


def make_app(model: str, pace_s: float) -> web.Application:
    model_json = json.dumps(model)

    def chunk(cid: str, created: int, delta: str, finish: str = "null") -> bytes:
        return (
            f'data: {{"id":"{cid}","object":"chat.completion.chunk","created":{created},'
            f'"model":{model_json},"choices":[{{"index":0,"delta":{delta},"logprobs":null,'
            f'"finish_reason":{finish}}}]}}\n\n'
        ).encode()

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": model, "object": "model", "created": 0, "owned_by": "relay-cpu-stub"}]})

    async def stats(_: web.Request) -> web.Response:
        return web.json_response(STATS)

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not body.get("stream"):
            return web.json_response({"error": {"message": "this stub only streams"}}, status=400)
        tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        STATS["streams"] += 1
        cid = f"chatcmpl-{STATS['streams']}"
        created = int(time.time())
        head = (
            f'data: {{"id":"{cid}","object":"chat.completion.chunk","created":{created},'
            f'"model":{model_json},"choices":[{{"index":0,"delta":{{"content":" t'
        ).encode()
        tail = b'"},"logprobs":null,"finish_reason":null}]}\n\n'
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        STATS["open"] += 1
        STATS["max_open"] = max(STATS["max_open"], STATS["open"])
        try:
            await response.prepare(request)
            await response.write(chunk(cid, created, '{"role":"assistant","content":""}'))
            loop = asyncio.get_running_loop()
            start = loop.time()
            for i in range(tokens):
                delay = start + i * pace_s - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                await response.write(head + str(i).encode() + tail)
            await response.write(chunk(cid, created, "{}", '"length"'))
            if usage:
                await response.write((
                    f'data: {{"id":"{cid}","object":"chat.completion.chunk","created":{created},'
                    f'"model":{model_json},"choices":[],"usage":{{"prompt_tokens":8,'
                    f'"completion_tokens":{tokens},"total_tokens":{tokens + 8}}}}}\n\n').encode())
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        finally:
            STATS["open"] -= 1
        return response

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/stats", stats)
    app.router.add_post("/v1/chat/completions", chat)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="relay-stub")
    parser.add_argument("--pace-ms", type=float, default=20.0)
    args = parser.parse_args()
    web.run_app(make_app(args.model, args.pace_ms / 1000), host="127.0.0.1", port=args.port,
                access_log=None, print=None, backlog=4096)


if __name__ == "__main__":
    main()
