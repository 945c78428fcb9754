"""Three pods, one degraded, through the real Envoy: the endpoint picker against round-robin.

Three real pods on 127.0.0.1, each a `chatfleet serve` (8 engine slots, a queue of 16) in front of
its own `chatfleet engine-sim`: two on the fast ``tiny-cpu`` profile, one on ``llama-3-8b-l4``
(a step of about 55 ms at batch 8 against about 5 ms: a pod on a slow or shared GPU). Two Envoys
run deploy/envoy/epp-envoy.yaml's listener and routes: one with its ext_proc filter asking
`chatfleet epp` (the Inference Extension's configuration), one without it, sending to the three
pods in turn (ROUND_ROBIN: what a Service does per request at best). The same open-loop Poisson
workload (streamed chats, 8-token prompts, 64-token answers) goes through each, in interleaved
rounds (EPP, round-robin, round-robin, EPP, ...), the pods idle before each run. Reported per
routing: TTFT p50/p99, 429s, answers/s, SLO attainment (TTFT <= 2 s, TPOT <= 100 ms), and the
share of requests each pod answered.

The picker's added latency, two ways: its decision time (``chatfleet_epp_decision_seconds``,
from the proxy's last message to the answer), and end to end: 400 sequential one-token
non-streamed chats through Envoy with the picker (the pool narrowed to one fast pod by the
subset hint) against Envoy straight to that pod, interleaved in blocks of 50; the difference of
the medians is what the ext_proc round trip and the decision add to a request.

Writes docs/benchmarks/epp-routing.json and .png. About 6 minutes (``--quick``: about 2).
Usage: python bench/epp_routing/run.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from chatfleet.bench.loadgen import LoadConfig, RunResult, run_event_loop, run_load  # noqa: E402
from chatfleet.bench.report import Slo, Summary, plot_runs, summarize  # noqa: E402
from chatfleet.bench.workload import FixedLengths, poisson  # noqa: E402
from tests.conftest import Server, start_engine_sim, start_gateway, upstream_env  # noqa: E402
from tests.support.envoy import Envoy, start_envoy, start_round_robin_envoy  # noqa: E402
from tests.support.epp import EppServer, start_epp  # noqa: E402
from tests.support.metrics import samples, value  # noqa: E402
from tests.support.procs import wait_until  # noqa: E402

SLOTS, QUEUE = 8, 16
FAST, SLOW = "tiny-cpu", "llama-3-8b-l4"
SLO = Slo(ttft_s=2.0, tpot_s=0.100)
OUT = REPO / "docs" / "benchmarks" / "epp-routing"
EPP, ROUND_ROBIN = "envoy + epp", "envoy round-robin"


@dataclass(frozen=True)
class Plan:
    rate_per_s: float
    duration_s: float
    warmup_s: float
    rounds: int
    latency_requests: int


FULL = Plan(rate_per_s=12.0, duration_s=40.0, warmup_s=5.0, rounds=2, latency_requests=400)
QUICK = Plan(rate_per_s=12.0, duration_s=20.0, warmup_s=3.0, rounds=1, latency_requests=200)


@dataclass
class Pod:
    profile: str
    engine: Server
    gateway: Server

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.gateway.port}"

    def counts(self) -> dict[str, float]:
        text = httpx.get(f"{self.gateway.url}/metrics", timeout=10).text
        outcomes: dict[str, float] = {}
        for (name, labels), amount in samples(text).items():
            if name == "chatfleet_requests_total":
                outcome = dict(labels)["outcome"]
                outcomes[outcome] = outcomes.get(outcome, 0.0) + amount
        return outcomes

    def idle(self) -> bool:
        load = httpx.get(f"{self.gateway.url}/load", timeout=10).json()
        return load["running"] == 0 and load["queued_interactive"] == 0 and load["queued_batch"] == 0


@contextmanager
def pods() -> Iterator[list[Pod]]:
    started: list[Pod] = []
    try:
        for profile in (FAST, FAST, SLOW):
            engine = start_engine_sim(profile=profile, max_num_seqs=SLOTS)
            env = upstream_env(engine, admission__engine_slots=SLOTS, admission__max_queue=QUEUE)
            env["CHATFLEET_ENGINE__MODEL"] = f"chatfleet-sim/{profile}"
            env["CHATFLEET_ENGINE__MODEL_ALIASES"] = f"chatfleet-sim/{FAST}"  # one name for the pool
            started.append(Pod(profile, engine, start_gateway(env)))
        yield started
    finally:
        for pod in started:
            pod.gateway.proc.terminate()
            pod.engine.proc.terminate()


def run_once(envoy: Envoy, plan: Plan, pool: Sequence[Pod], label: str, seed: int) -> tuple[RunResult, Summary, list[dict[str, float]]]:
    wait_until(lambda: all(pod.idle() for pod in pool), timeout=120, message="pods idle")
    before = [pod.counts() for pod in pool]
    workload = poisson(rate_per_s=plan.rate_per_s, lengths=FixedLengths(8, 64), seed=seed)
    config = LoadConfig(url=f"{envoy.url}/v1", model="chatfleet-sim/tiny-cpu", duration_s=plan.duration_s,
                        max_in_flight=512, drain_timeout_s=90.0, seed=seed)
    run = run_event_loop(run_load(workload, config, label=label))
    after = [pod.counts() for pod in pool]
    served = [{k: a.get(k, 0.0) - b.get(k, 0.0) for k in a} for a, b in zip(after, before, strict=True)]
    return run, summarize(run, slo=SLO, warmup_s=plan.warmup_s, label=label), served


def added_latency(epp_envoy: Envoy, direct_envoy: Envoy, requests: int) -> dict[str, float]:
    """Median and p99 of one-token chats through each Envoy, interleaved in blocks of 50 (ms)."""
    body = {"model": "chatfleet-sim/tiny-cpu", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 1}
    times: dict[str, list[float]] = {EPP: [], "direct": []}
    with httpx.Client(timeout=30) as client:
        for block in range(requests // 50):
            for name, envoy in ((EPP, epp_envoy), ("direct", direct_envoy))[:: 1 if block % 2 else -1]:
                for _ in range(50):
                    started = time.perf_counter()
                    response = client.post(f"{envoy.url}/v1/chat/completions", json=body)
                    times[name].append((time.perf_counter() - started) * 1000)
                    response.raise_for_status()
    quantiles = {name: statistics.quantiles(values, n=100) for name, values in times.items()}
    return {
        "epp_p50_ms": statistics.median(times[EPP]), "direct_p50_ms": statistics.median(times["direct"]),
        "epp_p99_ms": quantiles[EPP][98], "direct_p99_ms": quantiles["direct"][98],
        "added_p50_ms": statistics.median(times[EPP]) - statistics.median(times["direct"]),
        "added_p99_ms": quantiles[EPP][98] - quantiles["direct"][98],
    }


def decision_quantiles(epp: EppServer) -> dict[str, float]:
    """p50 and p99 of the picker's decision time from its histogram (upper bucket bounds, ms)."""
    text = epp.metrics_text()
    total = value(text, "chatfleet_epp_decision_seconds_count")
    buckets = sorted((float(dict(labels)["le"]), amount) for (name, labels), amount in samples(text).items()
                     if name == "chatfleet_epp_decision_seconds_bucket")
    found = {}
    for quantile in (0.5, 0.99):
        found[f"decision_p{round(quantile * 100)}_ms_at_most"] = next(
            bound for bound, count in buckets if count >= quantile * total) * 1000
    found["decisions"] = total
    found["decision_mean_ms"] = value(text, "chatfleet_epp_decision_seconds_sum") / total * 1000
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    plan = QUICK if parser.parse_args().quick else FULL
    results: list[tuple[RunResult, Summary, list[dict[str, float]]]] = []
    workdir = Path(tempfile.mkdtemp(prefix="epp-routing-"))
    with pods() as pool:
        epp = start_epp([pod.endpoint for pod in pool])
        epp_envoy = start_envoy(_fresh(workdir / "epp"), picker=epp.address)
        rr_envoy = start_round_robin_envoy(_fresh(workdir / "rr"), [pod.endpoint for pod in pool])
        try:
            order = [EPP, ROUND_ROBIN]
            for round_ in range(plan.rounds):
                for label in order if round_ % 2 == 0 else order[::-1]:
                    envoy = epp_envoy if label == EPP else rr_envoy
                    results.append(run_once(envoy, plan, pool, label, seed=round_))
                    summary = results[-1][1]
                    print(f"{label:18s} round {round_}: ttft p50 {_ms(summary, 'p50')} p99 {_ms(summary, 'p99')} "
                          f"429 {summary.rejected_429} answers/s {summary.request_throughput:.2f} "
                          f"slo {summary.slo_attainment:.3f} served {[round(s.get('ok', 0)) for s in results[-1][2]]}",
                          flush=True)
            subset_envoy = start_envoy(_fresh(workdir / "subset"), picker=epp.address,
                                       subset_hint=[pool[0].endpoint])
            direct_envoy = start_round_robin_envoy(_fresh(workdir / "direct"), [pool[0].endpoint])
            try:
                latency = added_latency(subset_envoy, direct_envoy, plan.latency_requests)
            finally:
                subset_envoy.proc.terminate()
                direct_envoy.proc.terminate()
            latency.update(decision_quantiles(epp))
        finally:
            for server in (epp_envoy, rr_envoy):
                server.proc.terminate()
            epp.proc.terminate()
    report(plan, results, latency)


def _fresh(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _ms(summary: Summary, quantile: str) -> str:
    return f"{getattr(summary.ttft_s, quantile) * 1000:.0f} ms" if summary.ttft_s else "-"


def report(plan: Plan, results: list[tuple[RunResult, Summary, list[dict[str, float]]]],
           latency: dict[str, float]) -> None:
    by_label: dict[str, list[Summary]] = {}
    for _, summary, _ in results:
        by_label.setdefault(summary.label, []).append(summary)
    table = {}
    for label, summaries in by_label.items():
        served = [[s.get("ok", 0.0) for s in r[2]] for r in results if r[1].label == label]
        table[label] = {
            "ttft_p50_ms": statistics.median(s.ttft_s.p50 * 1000 for s in summaries if s.ttft_s),
            "ttft_p99_ms": statistics.median(s.ttft_s.p99 * 1000 for s in summaries if s.ttft_s),
            "rejected_429": sum(s.rejected_429 for s in summaries),
            "requests": sum(s.requests for s in summaries),
            "answers_per_s": statistics.median(s.request_throughput for s in summaries),
            "slo_attainment": statistics.median(s.slo_attainment for s in summaries),
            "served_share_per_pod": [round(sum(col) / max(sum(map(sum, served)), 1), 3) for col in zip(*served, strict=True)],
        }
    ratio = table[ROUND_ROBIN]["ttft_p99_ms"] / table[EPP]["ttft_p99_ms"]
    print("\n| routing | TTFT p50 | TTFT p99 | 429s | answers/s | SLO | share per pod (fast, fast, slow) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for label, row in table.items():
        print(f"| {label} | {row['ttft_p50_ms']:.0f} ms | {row['ttft_p99_ms']:.0f} ms | {row['rejected_429']} "
              f"of {row['requests']} | {row['answers_per_s']:.2f} | {row['slo_attainment']:.3f} | "
              f"{row['served_share_per_pod']} |")
    print(f"\nTTFT p99, round-robin / epp: {ratio:.1f}x")
    print("added latency per request (ms): " + ", ".join(f"{k} {v:.3f}" for k, v in latency.items()))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.with_suffix(".json").write_text(json.dumps({
        "plan": plan.__dict__, "pods": [FAST, FAST, SLOW], "slots": SLOTS, "max_queue": QUEUE,
        "routings": table, "ttft_p99_ratio_round_robin_to_epp": ratio, "latency": latency,
        "runs": [summary.as_dict() | {"served": served} for _, summary, served in results],
    }, indent=2) + "\n")
    plot_runs(OUT.with_suffix(".png"), [(run, summary) for run, summary, _ in results],
              title=f"3 pods (one {SLOW}), Poisson {plan.rate_per_s:g} req/s: Envoy + picker vs round-robin",
              warmup_s=plan.warmup_s)
    print(f"wrote {OUT.with_suffix('.json')} and .png")


if __name__ == "__main__":
    main()
