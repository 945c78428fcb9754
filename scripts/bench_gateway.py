"""Gateway overhead: what ``chatfleet serve`` adds between a client and the engine it fronts.

Starts ``chatfleet engine-sim`` and ``chatfleet serve`` pointed at it (engine slots and queue at least
the highest concurrency, so the gateway's queue is never the limit; one uvicorn worker), then for each
concurrency runs the same closed-loop workload straight to the engine and through the gateway, in
A/B/B/A/A/B/B/A order so that drift (other load on the machine, the engine's state) cancels out. Writes
``docs/benchmarks/gateway-overhead.json`` and ``.png`` and prints a markdown table: TTFT and ITL
added by the gateway, throughput through it relative to direct, and the CPU each process used.
Read ITL with TPOT: a busy gateway relays several tokens in one write, which turns gaps into zeros
(ITL p50 falls) while the time per token (TPOT) rises.

Why the ``llama-3-8b-l4`` profile and 8-token prompts with 32-token answers: the engine-sim, the
gateway and this client share two cores, and every token is one event in each of them (measured
here, per-request work included: about 0.1 ms of CPU a token in the engine-sim, 0.1 to 0.15 ms in
this client, 0.25 to 0.3 ms in the gateway). The L4 profile makes about 900 tokens/s at 64 streams
and under 5,000 at 512, so at 64 the engine's step time sets the pace with CPU to spare; at 256 and
512 the three processes' needs approach the two cores, and the CPU columns say how close. 8 + 32
tokens (plus 5 of chat template) fill 3 KV blocks of 16, so 512 sequences fit in the L4's
30,816-token KV cache without preemption. Each run also records the CPU that other processes used
("other"): on a shared machine, runs with much of it are disturbed.

Usage: python scripts/bench_gateway.py [--quick]    (about 8 minutes; --quick about 1)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from chatfleet.bench.loadgen import LoadConfig, RunResult, run_event_loop, run_load
from chatfleet.bench.process_cpu import tree_cpu_s
from chatfleet.bench.report import Summary, cdf_points, summarize, write_json
from chatfleet.bench.workload import FixedLengths, closed_loop

HOST = "127.0.0.1"
DIRECT, GATEWAY = "direct", "gateway"
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True, kw_only=True)
class Plan:
    profile: str
    concurrencies: tuple[int, ...]
    prompt_tokens: int
    output_tokens: int
    duration_s: float
    ramp_s: float
    warmup_s: float
    rounds: int
    """Runs per target and concurrency: 1 alternates which target goes first between concurrencies;
    more go A/B/B/A/A/B/B/A..., so that slow drift (other load on the machine) hits both alike."""
    workers: int = 1
    """Gateway worker processes (``chatfleet serve --workers``); above 1 the pod's admission is shared."""

    @property
    def model(self) -> str:
        return f"chatfleet-sim/{self.profile}"

    def order(self, concurrency_index: int) -> list[str]:
        if self.rounds == 1:
            return [DIRECT, GATEWAY] if concurrency_index % 2 == 0 else [GATEWAY, DIRECT]
        return [
            target
            for round_ in range(self.rounds)
            for target in ((DIRECT, GATEWAY) if round_ % 2 == 0 else (GATEWAY, DIRECT))
        ]


FULL = Plan(
    profile="llama-3-8b-l4",
    concurrencies=(64, 256, 512),
    prompt_tokens=8,
    output_tokens=32,
    duration_s=14.0,
    ramp_s=3.0,
    warmup_s=5.0,
    rounds=4,
)
QUICK = dataclasses.replace(FULL, duration_s=6.0, ramp_s=1.5, warmup_s=3.0, rounds=1)


class Server:
    """A ``chatfleet`` subcommand in its own process group, logging to a file; killed with its group."""

    def __init__(
        self, name: str, args: list[str], *, env: dict[str, str] | None = None, log_dir: Path
    ) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "chatfleet", *args],
                env={**os.environ, **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, url: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                if httpx.get(url, timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(
            f"{self.name} did not answer 200 on {url} within {timeout_s:.0f} s; log tail:\n{tail}"
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def machine_busy_seconds() -> float:
    """CPU seconds every process on this machine has used so far (/proc/stat), to spot other load."""
    user, nice, system, _idle, _iowait, irq, softirq = map(int, Path("/proc/stat").read_text().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, kw_only=True)
class Measured:
    concurrency: int
    target: str
    round_: int
    result: RunResult
    summary: Summary
    cpu_s: dict[str, float]
    """CPU seconds used during the run by the engine-sim, the gateway, this client, and everything
    else on the machine ("other": other people's work, which disturbs the measurement)."""


def run_once(
    plan: Plan, *, concurrency: int, target: str, round_: int, url: str, pids: dict[str, int]
) -> Measured:
    workload = closed_loop(
        concurrency=concurrency,
        lengths=FixedLengths(plan.prompt_tokens, plan.output_tokens),
        seed=round_,
        ramp_s=plan.ramp_s,
    )
    config = LoadConfig(url=url, model=plan.model, duration_s=plan.duration_s, seed=round_)

    def snapshot() -> dict[str, float]:
        own = {name: tree_cpu_s(pid)[0] for name, pid in pids.items()} | {"client": time.process_time()}
        return own | {"machine": machine_busy_seconds()}

    before = snapshot()
    result = run_event_loop(run_load(workload, config, label=f"{target} x{concurrency}"))
    after = snapshot()
    used = {name: after[name] - before[name] for name in before}
    machine = used.pop("machine")
    cpu_s = used | {"other": max(0.0, machine - sum(used.values()))}
    summary = summarize(result, warmup_s=plan.warmup_s)
    return Measured(
        concurrency=concurrency, target=target, round_=round_, result=result, summary=summary, cpu_s=cpu_s
    )


def compare(plan: Plan, measured: list[Measured]) -> tuple[list[Summary], list[dict[str, Any]]]:
    """Pool the rounds of each (concurrency, target) and set gateway against direct."""
    pooled: list[Summary] = []
    rows: list[dict[str, Any]] = []
    for concurrency in plan.concurrencies:
        pair: dict[str, Summary] = {}
        cores: dict[str, dict[str, float]] = {}
        for target in (DIRECT, GATEWAY):
            runs = [m for m in measured if m.concurrency == concurrency and m.target == target]
            pair[target] = summarize(
                *(m.result for m in runs), warmup_s=plan.warmup_s, label=f"{target} x{concurrency}"
            )
            wall_s = sum(m.result.wall_s for m in runs)
            cores[target] = {name: sum(m.cpu_s[name] for m in runs) / wall_s for name in runs[0].cpu_s}
        pooled += [pair[DIRECT], pair[GATEWAY]]
        direct, gateway = pair[DIRECT], pair[GATEWAY]
        rows.append(
            {
                "concurrency": concurrency,
                "direct_output_tokens_per_s": direct.output_throughput,
                "gateway_output_tokens_per_s": gateway.output_throughput,
                "throughput_ratio": gateway.output_throughput / direct.output_throughput,
                "direct_ttft_p50_ms": _ms(direct, "ttft_s", "p50"),
                "added_ttft_p50_ms": _ms(gateway, "ttft_s", "p50") - _ms(direct, "ttft_s", "p50"),
                "added_ttft_p99_ms": _ms(gateway, "ttft_s", "p99") - _ms(direct, "ttft_s", "p99"),
                "direct_itl_p50_ms": _ms(direct, "itl_s", "p50"),
                "added_itl_p50_ms": _ms(gateway, "itl_s", "p50") - _ms(direct, "itl_s", "p50"),
                "added_itl_p99_ms": _ms(gateway, "itl_s", "p99") - _ms(direct, "itl_s", "p99"),
                "direct_tpot_p50_ms": _ms(direct, "tpot_s", "p50"),
                "added_tpot_p50_ms": _ms(gateway, "tpot_s", "p50") - _ms(direct, "tpot_s", "p50"),
                "errors": {DIRECT: direct.errors, GATEWAY: gateway.errors},
                "cpu_cores": cores,
            }
        )
    return pooled, rows


def _ms(summary: Summary, attribute: str, statistic: str) -> float:
    distribution = getattr(summary, attribute)
    return float("nan") if distribution is None else getattr(distribution, statistic) * 1000


def progress_line(m: Measured) -> str:
    cpu = ", ".join(f"{name} {seconds:.1f}" for name, seconds in m.cpu_s.items())
    return (
        f"{m.target:>7} x{m.concurrency:<3} round {m.round_}: {m.summary.output_throughput:5.0f} tok/s, "
        f"TTFT p50 {_ms(m.summary, 'ttft_s', 'p50'):6.1f} ms, errors {m.summary.errors or 'none'}; "
        f"CPU s {cpu} in {m.result.wall_s:.1f} s"
    )


def markdown(rows: list[dict[str, Any]]) -> str:
    header = (
        "streams",
        "direct tok/s",
        "gateway tok/s",
        "ratio",
        "direct TTFT p50",
        "added TTFT p50",
        "added TTFT p99",
        "direct ITL p50",
        "added ITL p50",
        "added TPOT p50",
        "CPU cores direct (engine+client)",
        "CPU cores via gateway (engine+gateway+client)",
        "other load (cores)",
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * 10 + "---|---|---:|"]
    for row in rows:
        direct, gateway = row["cpu_cores"][DIRECT], row["cpu_cores"][GATEWAY]
        cells = (
            str(row["concurrency"]),
            f"{row['direct_output_tokens_per_s']:.0f}",
            f"{row['gateway_output_tokens_per_s']:.0f}",
            f"{row['throughput_ratio']:.3f}",
            f"{row['direct_ttft_p50_ms']:.1f} ms",
            f"{row['added_ttft_p50_ms']:+.1f} ms",
            f"{row['added_ttft_p99_ms']:+.1f} ms",
            f"{row['direct_itl_p50_ms']:.1f} ms",
            f"{row['added_itl_p50_ms']:+.1f} ms",
            f"{row['added_tpot_p50_ms']:+.1f} ms",
            f"{direct['engine']:.2f}+{direct['client']:.2f}",
            f"{gateway['engine']:.2f}+{gateway['gateway']:.2f}+{gateway['client']:.2f}",
            f"{direct['other']:.2f} / {gateway['other']:.2f}",
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(
    path: Path, plan: Plan, pooled: list[Summary], rows: list[dict[str, Any]], measured: list[Measured]
) -> None:
    """Four panels: TTFT p50/p99 by concurrency, throughput, CPU by process, and the TTFT CDFs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ((ttft_axes, throughput_axes), (cpu_axes, cdf_axes)) = plt.subplots(2, 2, figsize=(13, 9))
    _plot_ttft_percentiles(ttft_axes, plan, pooled)
    _plot_throughput(throughput_axes, rows)
    _plot_cpu(cpu_axes, rows)
    _plot_ttft_cdfs(cdf_axes, plan, measured)
    for axes in (ttft_axes, throughput_axes, cpu_axes, cdf_axes):
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    figure.suptitle(
        f"gateway overhead: engine-sim {plan.profile}, {plan.prompt_tokens}+{plan.output_tokens} tokens, "
        f"closed loop, {plan.rounds} run(s) per concurrency and target"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plot_ttft_percentiles(axes: Any, plan: Plan, pooled: list[Summary]) -> None:
    by_label = {summary.label: summary for summary in pooled}
    positions = range(len(plan.concurrencies))
    for target, style in ((DIRECT, "--"), (GATEWAY, "-")):
        for statistic, marker in (("p50", "o"), ("p99", "^")):
            values = [_ms(by_label[f"{target} x{c}"], "ttft_s", statistic) for c in plan.concurrencies]
            axes.plot(positions, values, style, marker=marker, label=f"{target} {statistic}")
    axes.set_xticks(list(positions), [str(c) for c in plan.concurrencies])
    axes.set(yscale="log", xlabel="concurrent streams", ylabel="TTFT (ms)", title="time to first token")


def _plot_throughput(axes: Any, rows: list[dict[str, Any]]) -> None:
    width = 0.38
    positions = range(len(rows))
    for offset, target in ((-width / 2, DIRECT), (width / 2, GATEWAY)):
        values = [row[f"{target}_output_tokens_per_s"] for row in rows]
        axes.bar([p + offset for p in positions], values, width, label=target)
    axes.set_xticks(list(positions), [str(row["concurrency"]) for row in rows])
    axes.set(xlabel="concurrent streams", ylabel="output tokens/s", title="throughput")


def _plot_cpu(axes: Any, rows: list[dict[str, Any]]) -> None:
    bars = [
        (f"{target[0].upper()} x{row['concurrency']}", row["cpu_cores"][target])
        for row in rows
        for target in (DIRECT, GATEWAY)
    ]
    base = [0.0] * len(bars)
    for process in ("engine", "gateway", "client", "other"):
        values = [cores[process] for _, cores in bars]
        axes.bar(range(len(bars)), values, bottom=base, label=process)
        base = [b + v for b, v in zip(base, values, strict=True)]
    axes.axhline(os.cpu_count() or 1, color="grey", linestyle=":", label="cores on this machine")
    axes.set_xticks(range(len(bars)), [label for label, _ in bars])
    axes.set(ylabel="CPU cores used (CPU s / wall s)", title="where the CPU goes (D direct, G via gateway)")


def _plot_ttft_cdfs(axes: Any, plan: Plan, measured: list[Measured]) -> None:
    for concurrency in plan.concurrencies:
        for target, style in ((DIRECT, "--"), (GATEWAY, "-")):
            ttfts_ms = [
                record.ttft_s * 1000
                for m in measured
                if m.concurrency == concurrency and m.target == target
                for record in m.result.records
                if record.ok and record.ttft_s is not None and record.sent_s >= plan.warmup_s
            ]
            axes.step(*cdf_points(ttfts_ms), style, where="post", label=f"{target} x{concurrency}")
    axes.set(xscale="log", xlabel="TTFT (ms)", ylabel="fraction of requests", title="TTFT CDF")


@contextlib.contextmanager
def servers(plan: Plan) -> Iterator[tuple[dict[str, str], dict[str, int]]]:
    """Start engine-sim, then the gateway in front of it; yield their URLs and pids; stop both."""
    top = max(plan.concurrencies)
    engine_port, gateway_port = free_port(), free_port()
    log_dir = Path(tempfile.mkdtemp(prefix="chatfleet-bench-gateway-"))
    started: list[Server] = []
    try:
        engine_args = (
            f"engine-sim --host {HOST} --port {engine_port} --profile {plan.profile} "
            f"--max-num-seqs {top} --log-level warning"
        )
        engine = Server("engine-sim", engine_args.split(), log_dir=log_dir)
        started.append(engine)
        engine.wait_ready(f"http://{HOST}:{engine_port}/health")
        gateway_env = {
            "CHATFLEET_ENGINE__KIND": "openai",
            "CHATFLEET_ENGINE__URL": f"http://{HOST}:{engine_port}/v1",
            "CHATFLEET_ENGINE__MODEL": plan.model,
            "CHATFLEET_ADMISSION__ENGINE_SLOTS": str(top),
            "CHATFLEET_ADMISSION__MAX_QUEUE": str(top),
            "CHATFLEET_SERVER__LOG_LEVEL": "warning",
        }
        gateway_args = ["serve", "--host", HOST, "--port", str(gateway_port), "--workers", str(plan.workers)]
        gateway = Server("gateway", gateway_args, env=gateway_env, log_dir=log_dir)
        started.append(gateway)
        gateway.wait_ready(f"http://{HOST}:{gateway_port}/readyz")
        yield (
            {DIRECT: f"http://{HOST}:{engine_port}/v1", GATEWAY: f"http://{HOST}:{gateway_port}/v1"},
            {"engine": engine.pid, "gateway": gateway.pid},
        )
    finally:
        for server in reversed(started):
            server.stop()


def measure(plan: Plan) -> list[Measured]:
    """Every run of the plan, in its A/B order, after one short unrecorded run that warms both paths."""
    measured: list[Measured] = []
    with servers(plan) as (urls, pids):
        prime = closed_loop(concurrency=64, lengths=FixedLengths(plan.prompt_tokens, plan.output_tokens))
        run_event_loop(run_load(prime, LoadConfig(url=urls[GATEWAY], model=plan.model, max_requests=128)))
        for index, concurrency in enumerate(plan.concurrencies):
            for run_index, target in enumerate(plan.order(index)):
                m = run_once(
                    plan,
                    concurrency=concurrency,
                    target=target,
                    round_=run_index // 2,
                    url=urls[target],
                    pids=pids,
                )
                measured.append(m)
                print(progress_line(m), flush=True)
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="about one minute: short runs, one round")
    parser.add_argument("--out-dir", type=Path, default=REPO / "docs" / "benchmarks")
    parser.add_argument("--workers", type=int, default=1, help="gateway worker processes (default 1)")
    parser.add_argument(
        "--concurrencies", type=lambda text: tuple(int(c) for c in text.split(",")),
        help="comma-separated stream counts (default 64,256,512)",
    )
    parser.add_argument(
        "--name", default="gateway-overhead", help="output file stem under --out-dir (default gateway-overhead)"
    )
    args = parser.parse_args()
    plan = dataclasses.replace(QUICK if args.quick else FULL, workers=args.workers)
    if args.concurrencies:
        plan = dataclasses.replace(plan, concurrencies=args.concurrencies)
    started = time.time()
    measured = measure(plan)
    pooled, rows = compare(plan, measured)
    top = max(plan.concurrencies)
    meta = {
        "plan": dataclasses.asdict(plan)
        | {"order": {c: plan.order(i) for i, c in enumerate(plan.concurrencies)}},
        "quick": args.quick,
        "started_at_unix": started,
        "elapsed_s": time.time() - started,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "gateway": {"engine_slots": top, "max_queue": top, "workers": plan.workers, "log_level": "warning"},
    }
    runs = [
        {
            "concurrency": m.concurrency,
            "target": m.target,
            "round": m.round_,
            "wall_s": m.result.wall_s,
            "cpu_s": m.cpu_s,
            "summary": m.summary.as_dict(),
        }
        for m in measured
    ]
    json_path, png_path = args.out_dir / f"{args.name}.json", args.out_dir / f"{args.name}.png"
    write_json(json_path, pooled, extra={"meta": meta, "comparison": rows, "rounds": runs})
    plot(png_path, plan, pooled, rows, measured)
    print()
    print(markdown(rows))
    busiest = max(measured, key=lambda m: m.cpu_s["other"] / m.result.wall_s)
    if busiest.cpu_s["other"] / busiest.result.wall_s > 0.2:
        print(
            f"\nnote: other processes used up to {busiest.cpu_s['other'] / busiest.result.wall_s:.2f} cores "
            f"during a run ({busiest.target} x{busiest.concurrency}); on a shared machine that disturbs "
            "the numbers, so compare them with the 'other load' column and rerun when it is quiet."
        )
    print(f"\nwrote {json_path} and {png_path} in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
