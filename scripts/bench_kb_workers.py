"""The local knowledge store with several worker processes: what keeping them consistent costs.

Store-level, no HTTP, so that microseconds show. Prints one JSON object:

- ``search_us``: CPU (``time.process_time``) and wall microseconds per ``lexical_search`` and per
  ``dense_search`` on a KB of ``--files`` x ``--chunks`` chunks, nothing written meanwhile.
  Run it with ``PYTHONPATH`` at the code before and after, interleaved: the difference is
  what the change check (``PRAGMA data_version`` under a lock) adds to every search.
- ``catch_up_us`` (only where the store has ``_catch_up``): the check alone, nothing changed.
- ``visible_ms``: two stores on one ``data_dir`` (as two workers hold it): after one stores a
  file of ``n`` chunks, the wall time of the other's next search (which catches up: reads and
  analyzes that file) against its steady search, for a few file sizes. The write is visible to
  that very search: the delay is this search's extra time, no polling interval.

    PYTHONPATH=src python3 scripts/bench_kb_workers.py            # after
    PYTHONPATH=/tmp/base/src python3 scripts/bench_kb_workers.py  # before (no visible_ms)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from chatfleet.rag.stores.base import ChunkDraft
from chatfleet.rag.stores.local import LocalStore

KB = "bench"
DIM = 256
WORDS = [f"w{i}" for i in range(4000)]


def _drafts(rng: random.Random, count: int, tag: str) -> list[ChunkDraft]:
    out = []
    for n in range(count):
        text = " ".join(rng.choices(WORDS, k=120)) + f" {tag}{n}"
        vector = np.asarray([rng.random() for _ in range(DIM)], dtype=np.float32)
        out.append(ChunkDraft(text=text, metadata={"n": n},
                              embedding=vector / np.linalg.norm(vector)))
    return out


async def _put(store: LocalStore, name: str, drafts: list[ChunkDraft]) -> None:
    await store.put_file(KB, name, b"x", drafts, loader="TextLoader", splitter="bench")


async def _per_call_us(call: Any, rounds: int) -> dict[str, float]:
    await call()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(rounds):
        await call()
    return {"cpu": (time.process_time() - cpu) / rounds * 1e6,
            "wall": (time.perf_counter() - wall) / rounds * 1e6}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(7)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as folder:
        data_dir = Path(folder)
        store = LocalStore(data_dir)
        await store.start()
        await store.create_kb(KB, info="", embed_model="m")
        for f in range(args.files):
            await _put(store, f"f{f}.txt", _drafts(rng, args.chunks, f"topic{f}x"))
        query = np.asarray([rng.random() for _ in range(DIM)], dtype=np.float32)
        out["search_us"] = {
            "lexical": await _per_call_us(
                lambda: store.lexical_search(KB, "w12 w345 w2000 topic3x7", 3), args.rounds),
            "dense": await _per_call_us(lambda: store.dense_search(KB, query, 3), args.rounds)}
        catch_up = getattr(store, "_catch_up", None)
        if catch_up is not None:
            started = time.perf_counter()
            for _ in range(args.rounds * 10):
                catch_up()
            out["catch_up_us"] = (time.perf_counter() - started) / (args.rounds * 10) * 1e6
            other = LocalStore(data_dir)
            await other.start()
            visible = {}
            for size in (1, 50, 2000):
                steady = await _per_call_us(
                    lambda: other.lexical_search(KB, "w12 w345", 3), 50)
                await _put(store, f"new{size}.txt", _drafts(rng, size, "fresh"))
                started = time.perf_counter()
                hits = await other.lexical_search(KB, f"fresh{size - 1}", 1)
                first_ms = (time.perf_counter() - started) * 1e3
                assert hits and hits[0].chunk.file_name == f"new{size}.txt"
                visible[str(size)] = {"first_search_ms": round(first_ms, 2),
                                      "steady_search_ms": round(steady["wall"] / 1e3, 3)}
            out["visible_ms"] = visible
            await other.aclose()
        await store.aclose()
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=40)
    parser.add_argument("--chunks", type=int, default=50, help="chunks per file")
    parser.add_argument("--rounds", type=int, default=2000, help="searches timed per kind")
    print(json.dumps(asyncio.run(main(parser.parse_args())), indent=1))
