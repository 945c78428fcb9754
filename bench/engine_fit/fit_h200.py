"""Fit the engine model's GPU step time to the H200 measurement, and its CPU terms to published ITLs.

Reads tests/fixtures/h200-step-profile.json (a copy of one run of shared/gpu/step_profile.py on an
H200; see tests/fixtures/README.md). Every measured row is turned into the step the real
``EngineCore`` schedules for that shape (so the fit sees exactly the inputs the model sees), then:

1. GPU part, on the CUDA-graph rows: for each dense efficiency on a grid (0.500-1.000 by 0.001), the
   floor and 1 / attention efficiency that minimise the squared *relative* error are a linear least
   squares; the grid point with the smallest error wins. The table of measured vs model (and the
   eager rows, for information) is printed.
2. CPU part (``step_overhead_s``, ``per_seq_overhead_s``): what end-to-end ITLs ask for on top of the
   GPU model, replaying the ShareGPT-like workload (``chatfleet.sim.engine_replay``):
   - H100: light-load mean ITL 13 ms (vLLM v0.6.0 blog) and saturated median ITL 25.4 ms
     (vLLM PR #18566), solved jointly;
   - H200: light-load (1 req/s) ITL 8.6 ms (vLLM nightly-benchmark table, engine-figures.md), the
     per-sequence term taken from the H100 fit (the same vLLM CPU code, not a GPU property).
3. KV capacity of each GPU from its memory (docs/engine-model.md, "KV capacity").

Usage (from the repository root):  PYTHONPATH=src python3 bench/engine_fit/fit_h200.py [--json OUT]
It changes no file unless --json is given; the profile JSONs carry the rounded results.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from chatfleet.engines.engine_model import EngineCore, EngineProfile, load_profile
from chatfleet.sim.engine_replay import replay, sharegpt_like_workload

ROOT = Path(__file__).resolve().parents[2]
MEASUREMENT = ROOT / "tests" / "fixtures" / "h200-step-profile.json"
GIB = 2**30


# --- the measured rows as EngineCore steps ------------------------------------------------------


class _Recorder(EngineProfile):
    """A profile that remembers the arguments of every step_seconds call (one list per class)."""

    calls: list[dict[str, float]] = []  # noqa: RUF012 - class-level on purpose: instances are frozen

    def step_seconds(self, **kwargs: Any) -> float:  # type: ignore[override]
        _Recorder.calls.append(kwargs)
        return 0.0


def measured_step(profile: EngineProfile, *, decodes: int, context: int, chunk: int, offset: int) -> dict[str, float]:
    """The step_seconds arguments of the step that has ``decodes`` sequences decoding at ``context``
    tokens (each attends to context + 1, as the measurement) and/or a ``chunk``-token prefill
    chunk after ``offset`` cached tokens of its prompt, run through a real ``EngineCore``."""
    budget = max(decodes * context, decodes + chunk, chunk, 1)
    base = dataclasses.asdict(profile) | {"sources": tuple(profile.sources)}
    base |= {"max_model_len": max(context, offset + chunk) + 8, "max_num_seqs": decodes + 1}
    base |= {"kv_capacity_tokens": decodes * (context + 16) + offset + chunk + 64}
    recorder = _Recorder(**base)
    core = EngineCore(recorder, max_num_batched_tokens=budget)
    for i in range(decodes):
        core.add_request(f"d{i}", prompt_tokens=context, output_tokens=4)
    if decodes:
        core.step()  # every decode prompt prefilled in one step
    if chunk:
        core.add_request("chunk", prompt_tokens=offset + chunk, output_tokens=1)
        core.max_num_batched_tokens = decodes + chunk  # the chunk is `chunk` tokens, as measured
        for _ in range(offset // chunk):
            core.step()  # earlier chunks of the same prompt (the decodes, if any, would decode too)
    _Recorder.calls.clear()
    core.step()
    (call,) = _Recorder.calls
    return call


def rows(data: dict[str, Any], profile: EngineProfile) -> list[dict[str, Any]]:
    """Every measured row with its label, times (ms) and the step's inputs."""
    shapes: list[tuple[str, dict[str, Any], dict[str, int]]] = []
    for r in data["prefill"]:
        shapes.append((f"prefill {r['tokens']}", r, dict(decodes=0, context=0, chunk=r["tokens"], offset=0)))
    for group in ("decode", "long_decode"):
        for r in data[group]:
            label = f"decode B={r['batch']}, ctx {r['context']}"
            shapes.append((label, r, dict(decodes=r["batch"], context=r["context"], chunk=0, offset=0)))
    for r in data["mixed"]:
        label = f"mixed {r['batch']} decodes (ctx {r['context']}) + {r['chunk']} chunk"
        shapes.append((label, r, dict(decodes=r["batch"], context=r["context"], chunk=r["chunk"], offset=0)))
    for r in data["chunk_at_offset"]:
        label = f"{r['chunk']} chunk after {r['offset']} cached"
        shapes.append((label, r, dict(decodes=0, context=0, chunk=r["chunk"], offset=r["offset"])))
    return [
        {"row": label, "graph_ms": r["graph_ms"], "eager_ms": r["eager_ms"], **measured_step(profile, **shape)}
        for label, r, shape in shapes
    ]


# --- the fit ------------------------------------------------------------------------------------


def gpu_parts(table: list[dict[str, Any]], bandwidth: float, flops: float, weight_bytes: float, params: float,
              kv_bytes: float) -> dict[str, np.ndarray]:  # fmt: skip
    col = {k: np.array([t[k] for t in table], dtype=float) for k in table[0] if k != "row"}
    return {
        "weights_s": np.full(len(table), weight_bytes / bandwidth),
        "dense_at_peak_s": 2.0 * params * col["num_new_tokens"] / flops,
        "kv_s": kv_bytes * col["context_tokens_read"] / bandwidth,
        "attention_at_peak_s": col["attention_flops"] / flops,
        "graph_s": col["graph_ms"] / 1e3,
        "eager_s": col["eager_ms"] / 1e3,
    }


def gpu_model(p: dict[str, np.ndarray], floor: float, dense_eff: float, attention_eff: float) -> np.ndarray:
    """The same GPU formula as EngineProfile.step_seconds, vectorised."""
    return floor + np.hypot(p["weights_s"], p["dense_at_peak_s"] / dense_eff) + p["kv_s"] + (
        p["attention_at_peak_s"] / attention_eff
    )


def fit_gpu(p: dict[str, np.ndarray]) -> tuple[float, float, float]:
    """Grid over the dense efficiency; floor and 1/attention efficiency by linear least squares on relative error."""
    y = p["graph_s"]
    best: tuple[float, float, float, float] | None = None
    for dense_eff in np.arange(0.5, 1.0005, 0.001):
        rest = np.hypot(p["weights_s"], p["dense_at_peak_s"] / dense_eff) + p["kv_s"]
        # (floor + rest + a * inv_att) / y - 1 = 0  ->  [1/y, a/y] @ [floor, inv_att] = 1 - rest/y
        design = np.column_stack([1 / y, p["attention_at_peak_s"] / y])
        (floor, inv_att), *_ = np.linalg.lstsq(design, 1 - rest / y, rcond=None)
        if floor < 0 or inv_att < 1:
            continue
        error = float(np.sum((gpu_model(p, floor, dense_eff, 1 / inv_att) / y - 1) ** 2))
        if best is None or error < best[0]:
            best = (error, float(floor), float(dense_eff), float(1 / inv_att))
    assert best is not None
    return best[1], best[2], best[3]


def replayed_itl(profile: EngineProfile, *, saturated: bool) -> float:
    """Light load: mean ITL at 1 req/s (300 requests); saturated: median ITL of 1000 sent at t=0."""
    if saturated:
        return replay(EngineCore(profile), sharegpt_like_workload(1000, seed=0)).summary.median_itl_s
    return replay(EngineCore(profile), sharegpt_like_workload(300, seed=0, request_rate=1.0)).summary.mean_itl_s


def solve(f: Any, target: float, lo: float, hi: float) -> float:
    """The x in [lo, hi] where the increasing function f reaches target (bisection)."""
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
    return (lo + hi) / 2


def fit_cpu_h100(gpu: EngineProfile) -> tuple[float, float]:
    step, per_seq = 0.005, 0.0
    for _ in range(4):  # alternate: light load pins the per-step term, saturation the per-sequence one
        step = solve(lambda s: replayed_itl(dataclasses.replace(gpu, step_overhead_s=s, per_seq_overhead_s=per_seq),
                                            saturated=False), 0.013, 0.0, 0.02)  # fmt: skip
        per_seq = solve(lambda q: replayed_itl(dataclasses.replace(gpu, step_overhead_s=step, per_seq_overhead_s=q),
                                               saturated=True), 0.0254, 0.0, 1e-4)  # fmt: skip
    return step, per_seq


# --- KV capacity --------------------------------------------------------------------------------

# (nvidia-smi memory.total in MiB, max_num_batched_tokens, max_num_seqs): vLLM v1 defaults per GPU.
GPUS = {"H200": (143_771, 8192, 1024), "H100 SXM": (81_559, 8192, 1024), "A100 SXM 80 GB": (81_920, 2048, 256),
        "L4": (23_034, 2048, 256)}  # fmt: skip
DRIVER_RESERVED_GIB = 79.65 - 79.22  # H100: nvidia-smi 81,559 MiB vs vLLM's total_gpu_memory 79.22 GiB (PR #10511)
NON_TORCH_GIB, ACTIVATION_GIB_PER_8192 = 1.79, 1.26  # vLLM PR #10511, Llama-3-8B on an H100
VOCAB, WEIGHT_BYTES, KV_BYTES, BLOCK = 128_256, 16.06e9, 131_072, 16


def kv_capacity(smi_mib: int, batched_tokens: int, max_num_seqs: int, utilization: float = 0.9) -> dict[str, float]:
    total = smi_mib / 1024 - DRIVER_RESERVED_GIB
    reserve = NON_TORCH_GIB + ACTIVATION_GIB_PER_8192 * batched_tokens / 8192 + max_num_seqs * VOCAB * 4 / GIB
    kv_gib = total * utilization - WEIGHT_BYTES / GIB - reserve
    tokens = int(kv_gib * GIB // KV_BYTES) // BLOCK * BLOCK
    return {"total_gib": total, "reserve_gib": reserve, "kv_gib": kv_gib, "kv_capacity_tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the fit, its residuals and the derived numbers here")
    args = parser.parse_args()
    data = json.loads(MEASUREMENT.read_text())
    h200 = load_profile("llama-3.1-8b-h200")
    bandwidth, flops = data["copy_bandwidth_bytes_per_s"], data["gemm_flops_per_s"]
    table = rows(data, h200)
    parts = gpu_parts(table, bandwidth, flops, h200.weight_bytes, h200.params, h200.kv_bytes_per_token)
    floor, dense_eff, attention_eff = fit_gpu(parts)
    model = gpu_model(parts, floor, dense_eff, attention_eff)
    graph_err, eager_err = model / parts["graph_s"] - 1, model / parts["eager_s"] - 1
    print(f"GPU fit: floor {floor * 1e3:.3f} ms, dense efficiency {dense_eff:.3f}, "
          f"attention efficiency {attention_eff:.3f} (bandwidth {bandwidth:.4g} B/s, GEMM {flops:.4g} FLOP/s)")  # fmt: skip
    print(f"{'row':48s} {'graph ms':>9s} {'model ms':>9s} {'error':>7s} {'eager ms':>9s} {'vs eager':>8s}")
    for t, m, g, e in zip(table, model, graph_err, eager_err, strict=True):
        print(f"{t['row']:48s} {t['graph_ms']:9.2f} {m * 1e3:9.2f} {g:+7.1%} {t['eager_ms']:9.2f} {e:+8.1%}")
    print(f"CUDA-graph rows: median |error| {np.median(abs(graph_err)):.1%}, worst {abs(graph_err).max():.1%} "
          f"({len(table)} rows); eager rows: median {np.median(abs(eager_err)):.1%}, worst {abs(eager_err).max():.1%}")  # fmt: skip

    gpu_h100 = dataclasses.replace(load_profile("llama-3-8b-h100"), gpu_step_floor_s=round(floor, 5),
                                   dense_efficiency=round(dense_eff, 3), attention_efficiency=round(attention_eff, 3))  # fmt: skip
    h100_step, h100_per_seq = fit_cpu_h100(gpu_h100)
    print(f"H100 CPU terms (13 ms light-load ITL, 25.4 ms saturated median ITL): step {h100_step * 1e3:.2f} ms, "
          f"per sequence {h100_per_seq * 1e6:.2f} us")  # fmt: skip
    gpu_h200 = dataclasses.replace(h200, gpu_step_floor_s=round(floor, 5), dense_efficiency=round(dense_eff, 3),
                                   attention_efficiency=round(attention_eff, 3), per_seq_overhead_s=round(h100_per_seq, 7))  # fmt: skip
    h200_step = solve(lambda s: replayed_itl(dataclasses.replace(gpu_h200, step_overhead_s=s), saturated=False),
                      0.0086, 0.0, 0.02)  # fmt: skip
    print(f"H200 CPU step term (8.6 ms ITL at 1 req/s): {h200_step * 1e3:.2f} ms")
    kv = {name: kv_capacity(*spec) for name, spec in GPUS.items()}
    for name, k in kv.items():
        print(f"KV {name}: total {k['total_gib']:.2f} GiB x 0.9 - {WEIGHT_BYTES / GIB:.2f} GiB weights - "
              f"{k['reserve_gib']:.2f} GiB reserve = {k['kv_gib']:.2f} GiB = {k['kv_capacity_tokens']:,} tokens")  # fmt: skip
    if args.json:
        result = {
            "measurement": str(MEASUREMENT.relative_to(ROOT)),
            "gpu": {"gpu_step_floor_s": floor, "dense_efficiency": dense_eff, "attention_efficiency": attention_eff,
                    "median_abs_error": float(np.median(abs(graph_err))), "worst_abs_error": float(abs(graph_err).max())},
            "cpu": {"h100_step_overhead_s": h100_step, "h100_per_seq_overhead_s": h100_per_seq,
                    "h200_step_overhead_s": h200_step},
            "rows": [{"row": t["row"], "graph_ms": t["graph_ms"], "model_ms": round(float(m) * 1e3, 3),
                      "error": round(float(g), 4), "eager_ms": t["eager_ms"]}
                     for t, m, g in zip(table, model, graph_err, strict=True)],
            "kv_capacity": kv,
        }  # fmt: skip
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
