"""guidellm as an outside load client: ChatFleet's gateway measured by a tool ChatFleet did not write.

One run: install guidellm in its own venv (``~/.cache/chatfleet/peers/guidellm-<version>``; a no-op
once there), start ``chatfleet engine-sim --profile llama-3-8b-l4`` and a gateway (``chatfleet
serve``) in front of it on free 127.0.0.1 ports, then send one closed-loop workload (fixed prompt
and answer lengths, answers exactly that long through ``ignore_eos``) at each concurrency level,
three ways: guidellm straight to the engine, guidellm through the gateway, and ChatFleet's own load
client (``chatfleet bench``'s ``run_load``) through the gateway. Prints one table (req/s, output
tok/s, TTFT p50/p95, ITL p50, errors per level and client) and the gateway/direct ratios, and writes
``docs/benchmarks/guidellm.json`` with the numbers, versions, settings and the machine's load.

Offline on purpose (``HF_HUB_OFFLINE=1``): guidellm's tokenizer is the tiny local Llama's
(``scripts/make_tiny_llama.py``, made with the guidellm venv's Python when missing) and its data is
``synthetic_text`` with fixed token counts. Without a local tokenizer guidellm would look the served
model name up on the Hugging Face hub.

Definitions, so the two clients' columns mean the same thing: req/s is successful requests per
second of the sending window; output tok/s counts every token received in it (those of requests cut
off at its end too); ITL p50 is the median over requests of each one's mean gap between tokens,
(last - first) / (tokens - 1), which is guidellm's ITL and ``chatfleet bench``'s TPOT. guidellm
takes percentiles as nearest rank, ``chatfleet bench`` interpolates: at 1 stream (about a dozen
requests) a p95 is close to the maximum either way. guidellm cancels requests in flight when a
level's time is up; ``chatfleet bench`` lets them finish outside its window.

Usage: python bench/peers/guidellm/run.py [--quick]   (about 4.5 minutes; --quick about 1.5)
   or: python -m bench.peers.guidellm.run [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[3]
if str(REPO) not in sys.path:  # run as a script: tests.support lives at the repository root
    sys.path.insert(0, str(REPO))

import chatfleet
from chatfleet.bench.loadgen import LoadConfig, run_event_loop, run_load
from chatfleet.bench.report import summarize
from chatfleet.bench.workload import FixedLengths, closed_loop
from tests.support.metrics import value
from tests.support.procs import LOCALHOST, ManagedProcess, free_port
from tests.support.vllm_cpu import MAKE_MODEL_SCRIPT, default_model_dir

VERSION = "0.8.1"
"""The newest guidellm 0.8.x on PyPI when this was written."""
PINS = ("torch==2.13.0", f"guidellm=={VERSION}")
"""Installed in this order: with the CPU torch already there, guidellm does not pull a 6 GB CUDA one."""
VENV = Path.home() / ".cache" / "chatfleet" / "peers" / f"guidellm-{VERSION}"
PROFILE = "llama-3-8b-l4"
MODEL = f"chatfleet-sim/{PROFILE}"
OUT = REPO / "docs" / "benchmarks" / "guidellm.json"
GUIDELLM_ENV = {"HF_HUB_OFFLINE": "1", "GUIDELLM__MAX_WORKER_PROCESSES": str(os.cpu_count() or 1)}
"""Offline, and one worker process per core: guidellm's default of 10 spawned workers (each importing
torch) on two cores took 10-20 s to start each level and competed with the servers it measures."""
GUIDELLM_DIRECT, GUIDELLM_GATEWAY, CHATFLEET_GATEWAY = (
    "guidellm direct",
    "guidellm via gateway",
    "chatfleet bench via gateway",
)


@dataclass(frozen=True, kw_only=True)
class Plan:
    levels: tuple[int, ...]
    """Concurrent streams (closed loop), one timed run each."""
    seconds_per_level: float
    prompt_tokens: int
    output_tokens: int

    @property
    def max_num_seqs(self) -> int:
        """Twice the top level: the engine batches every stream at once and never queues one, so
        its step time, not its admission, is what it contributes to the bound."""
        return 2 * max(self.levels)


FULL = Plan(levels=(1, 8, 32), seconds_per_level=20.0, prompt_tokens=32, output_tokens=32)
"""Short prompts: each client counts 32 prompt tokens its own way (guidellm with the tiny Llama's
tokenizer, ``chatfleet bench`` as 32 four-character words) and engine-sim counts four characters a
token, so the engine sees different lengths (phases[].engine_prompt_tokens_per_request); short, that
difference costs little prefill. At 128 tokens, 32 streams starting at once needed three chunked
prefill steps for ``chatfleet bench``'s prompts and two for guidellm's, a TTFT gap of the workload's
making, not the clients'."""
QUICK = dataclasses.replace(FULL, levels=(1, 32), seconds_per_level=4.0)
"""A smoke run: guidellm's own start-up (about 20 s a run, 8 s a level on two busy cores) dominates."""


@dataclass(frozen=True, kw_only=True)
class Row:
    level: int
    client: str
    requests_per_s: float
    output_tokens_per_s: float
    ttft_p50_ms: float
    ttft_p95_ms: float
    itl_p50_ms: float
    completed: int
    """Successful requests that finished inside the sending window (what req/s counts)."""
    errors: int
    client_warnings: tuple[str, ...] = ()
    """What the client says about its own measurement (guidellm's warnings: e.g. that generating its
    requests, not the server, held it back)."""


def install(venv: Path = VENV) -> Path:
    """The venv's python, installing torch (CPU) and then guidellm first if missing (about 2 min, 1.5 GB)."""
    python = venv / "bin" / "python"
    marker = venv / ".chatfleet-installed"
    if marker.exists() and marker.read_text().split() == list(PINS):
        return python
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    for pin in PINS:
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", pin], check=True
        )
    marker.write_text(" ".join(PINS) + "\n")
    return python


def installed_versions(python: Path) -> dict[str, str]:
    """Versions of guidellm and what it measures with, as installed in its venv."""
    code = (
        "import importlib.metadata as m, json; "
        "print(json.dumps({n: m.version(n) for n in ('guidellm', 'torch', 'transformers', 'httpx')}))"
    )
    out = subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def chatfleet_revision() -> str:
    """The commit of the ChatFleet that ran (the servers import the same one as this process), with
    "+dirty" when its src/ had uncommitted changes."""
    checkout = Path(chatfleet.__file__).resolve().parents[2]

    def git(*args: str) -> str:
        out = subprocess.run(["git", "-C", str(checkout), *args], check=True, capture_output=True, text=True)
        return out.stdout.strip()

    return git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain", "src") else "")


def ensure_tokenizer(python: Path, model_dir: Path) -> Path:
    """The tiny Llama's directory (made here when missing: the guidellm venv has transformers)."""
    args = [str(python), str(MAKE_MODEL_SCRIPT), str(model_dir)]
    made = subprocess.run(args, check=False, capture_output=True, text=True)
    if made.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited with {made.returncode}:\n{made.stderr[-2000:]}")
    return model_dir


def scenario(plan: Plan, *, target: str, health_route: str, tokenizer: Path, report: Path) -> dict[str, Any]:
    """A guidellm scenario file: one ``concurrent`` sub-benchmark per level of the plan, each bounded
    by ``max_duration``. ``health_route`` is where guidellm's pre-run check goes: it asks for
    ``/health``, which engine-sim has and the gateway calls ``/readyz``."""
    return {
        "spec": {
            "backend": {
                "kind": "openai_http",
                "target": target,
                "model": MODEL,
                "request_format": "/v1/chat/completions",
                "api_routes": {"/health": health_route},
                "http2": False,
            },
            "profile": {"kind": "concurrent"},
            "constraints": [{"kind": "max_duration", "seconds": plan.seconds_per_level}],
            "tokenizer": {"kind": "huggingface_auto", "model": str(tokenizer)},
            "data": [
                {
                    "kind": "synthetic_text",
                    "prompt_tokens": plan.prompt_tokens,
                    "output_tokens": plan.output_tokens,
                }
            ],
            "metrics": {"kind": "generative", "sample_size": 0},
            "outputs": [{"kind": "json", "path": str(report)}],
        },
        "benchmarks": [{"profile.streams": level} for level in plan.levels],
    }


def run_guidellm(
    python: Path, spec: dict[str, Any], *, work_dir: Path, name: str, timeout_s: float
) -> dict[str, Any]:
    """Run ``guidellm run --scenario`` in its own process group (killed with it whatever happens);
    return the report it wrote."""
    scenario_path = work_dir / f"{name}.scenario.json"
    scenario_path.write_text(json.dumps(spec, indent=2))
    report_path = Path(spec["spec"]["outputs"][0]["path"])
    args = [python.parent / "guidellm", "run", "--scenario", scenario_path, "--disable-progress"]
    proc = ManagedProcess(
        args, env=GUIDELLM_ENV, log_path=work_dir / f"{name}.log", name=f"guidellm-{name}"
    ).start()
    try:
        returncode = proc.popen.wait(timeout_s)
    finally:
        proc.terminate()
    if returncode != 0 or not report_path.exists():
        raise RuntimeError(
            f"guidellm ({name}) exited with {returncode}; log {proc.log_path}:\n{proc.log_tail(40)}"
        )
    return json.loads(report_path.read_text())


def parse_report(report: Mapping[str, Any], client: str) -> list[Row]:
    """One row per benchmark (concurrency level) of a guidellm JSON report, in the report's order."""
    rows = []
    for benchmark in report["benchmarks"]:
        strategy = benchmark["config"]["strategy"]
        if strategy["type_"] != "concurrent":
            raise ValueError(f"expected guidellm's concurrent profile, got a {strategy['type_']!r} benchmark")
        metrics = benchmark["metrics"]
        ttft = metrics["time_to_first_token_ms"]["successful"]
        rows.append(
            Row(
                level=strategy["streams"],
                client=client,
                requests_per_s=metrics["requests_per_second"]["successful"]["mean"],
                # "total": tokens of the requests cut off at the end count too, as in chatfleet bench.
                output_tokens_per_s=metrics["output_tokens_per_second"]["total"]["mean"],
                ttft_p50_ms=_percentile(ttft, "p50"),
                ttft_p95_ms=_percentile(ttft, "p95"),
                itl_p50_ms=_percentile(metrics["inter_token_latency_ms"]["successful"], "p50"),
                completed=metrics["request_totals"]["successful"],
                errors=metrics["request_totals"]["errored"],
                client_warnings=tuple(warning["message"] for warning in benchmark["warnings"]),
            )
        )
    return rows


def _percentile(distribution: Mapping[str, Any], name: str) -> float:
    """guidellm reports 0.0 for the percentiles of an empty distribution; NaN says "none" instead."""
    return distribution["percentiles"][name] if distribution["count"] else float("nan")


def chatfleet_bench(plan: Plan, level: int, url: str) -> Row:
    """``chatfleet bench run --concurrency level --duration S`` in process, reduced to a row (TTFT
    p95 from its records: its summary stops at p90 and p99)."""
    workload = closed_loop(concurrency=level, lengths=FixedLengths(plan.prompt_tokens, plan.output_tokens))
    config = LoadConfig(url=url, model=MODEL, duration_s=plan.seconds_per_level)
    result = run_event_loop(run_load(workload, config, label=f"{CHATFLEET_GATEWAY} x{level}"))
    summary = summarize(result)
    ttfts = [record.ttft_s for record in result.records if record.ok and record.ttft_s is not None]
    return Row(
        level=level,
        client=CHATFLEET_GATEWAY,
        requests_per_s=summary.request_throughput,
        output_tokens_per_s=summary.output_throughput,
        ttft_p50_ms=_ms(summary.ttft_s.p50 if summary.ttft_s else None),
        ttft_p95_ms=_ms(float(np.percentile(ttfts, 95)) if ttfts else None),
        itl_p50_ms=_ms(summary.tpot_s.p50 if summary.tpot_s else None),
        completed=round(summary.request_throughput * summary.window_s),
        errors=sum(summary.errors.values()),
    )


def _ms(seconds: float | None) -> float:
    return float("nan") if seconds is None else seconds * 1000


def machine_busy_seconds() -> float:
    """CPU seconds every process on this machine has used so far (/proc/stat)."""
    user, nice, system, _idle, _iowait, irq, softirq = map(int, Path("/proc/stat").read_text().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def client_cpu_seconds() -> float:
    """This process's CPU time plus that of its finished children (guidellm and its workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def engine_counters(engine_url: str) -> tuple[float, float]:
    """(prompt tokens, requests finished) as the engine counts them, from its /metrics."""
    text = httpx.get(f"{engine_url}/metrics", timeout=10.0).text
    return value(text, "vllm:prompt_tokens_total"), value(text, "vllm:request_success_total")


T = TypeVar("T")


def measured(
    name: str, pids: Mapping[str, int], engine_url: str, work: Callable[[], T]
) -> tuple[T, dict[str, Any]]:
    """Run ``work`` and note what it cost: CPU cores used by the engine, the gateway, the client and
    everything else on the machine ("other": someone else's work, which disturbs the numbers), the
    load average around it, and the prompt length the engine saw (the clients' tokenizers differ)."""

    def snapshot() -> dict[str, float]:
        own = {label: cpu_seconds(pid) for label, pid in pids.items()}
        return own | {
            "client": client_cpu_seconds(),
            "machine": machine_busy_seconds(),
            "wall": time.monotonic(),
        }

    load_before, counters_before, before = os.getloadavg(), engine_counters(engine_url), snapshot()
    result = work()
    after, counters_after, load_after = snapshot(), engine_counters(engine_url), os.getloadavg()
    used = {label: after[label] - before[label] for label in before}
    wall_s, machine = used.pop("wall"), used.pop("machine")
    used["other"] = max(0.0, machine - sum(used.values()))
    prompt_tokens, requests = (a - b for a, b in zip(counters_after, counters_before, strict=True))
    return result, {
        "phase": name,
        "wall_s": round(wall_s, 1),
        "cpu_cores": {label: round(seconds / wall_s, 3) for label, seconds in used.items()},
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "engine_prompt_tokens_per_request": round(prompt_tokens / requests, 1) if requests else None,
    }


@contextmanager
def servers(plan: Plan, log_dir: Path) -> Iterator[tuple[str, str, dict[str, int], dict[str, str]]]:
    """engine-sim, then a gateway in front of it; yields (engine URL, gateway URL, pids, gateway
    environment) and stops both process groups on the way out, however it is left."""
    started: list[ManagedProcess] = []
    try:
        engine_port, gateway_port = free_port(), free_port()
        engine = ManagedProcess(
            [sys.executable, "-m", "chatfleet", "engine-sim", "--host", LOCALHOST, "--port", str(engine_port),
             "--profile", PROFILE, "--max-num-seqs", str(plan.max_num_seqs), "--log-level", "warning"],
            log_path=log_dir / "engine-sim.log", name="engine-sim",
        ).start()  # fmt: skip
        started.append(engine)
        engine_url = f"http://{LOCALHOST}:{engine_port}"
        engine.wait_http(f"{engine_url}/health", timeout=60)
        gateway_env = {
            "CHATFLEET_ENGINE__KIND": "openai",
            "CHATFLEET_ENGINE__URL": f"{engine_url}/v1",
            "CHATFLEET_ENGINE__MODEL": MODEL,
            "CHATFLEET_ADMISSION__ENGINE_SLOTS": str(plan.max_num_seqs),
            "CHATFLEET_ADMISSION__MAX_QUEUE": str(plan.max_num_seqs),
            "CHATFLEET_SERVER__LOG_LEVEL": "warning",
            "CHATFLEET_KB__DATA_DIR": str(log_dir / "kb"),
        }
        gateway = ManagedProcess(
            [sys.executable, "-m", "chatfleet", "serve", "--host", LOCALHOST, "--port", str(gateway_port)],
            env=gateway_env, log_path=log_dir / "gateway.log", name="gateway",
        ).start()  # fmt: skip
        started.append(gateway)
        gateway_url = f"http://{LOCALHOST}:{gateway_port}"
        gateway.wait_http(f"{gateway_url}/readyz", timeout=60)
        yield engine_url, gateway_url, {"engine": engine.pid, "gateway": gateway.pid}, gateway_env
    finally:
        for proc in reversed(started):
            proc.terminate()


def ratios(rows: list[Row]) -> list[dict[str, Any]]:
    """Per level: guidellm through the gateway over guidellm direct, and ChatFleet's client over
    guidellm, both through the gateway."""
    by_key = {(row.level, row.client): row for row in rows}
    out = []
    for level in sorted({row.level for row in rows}):
        direct, gateway = by_key[level, GUIDELLM_DIRECT], by_key[level, GUIDELLM_GATEWAY]
        own = by_key[level, CHATFLEET_GATEWAY]
        out.append(
            {
                "level": level,
                "gateway_over_direct_requests_per_s": gateway.requests_per_s / direct.requests_per_s,
                "gateway_over_direct_output_tokens_per_s": gateway.output_tokens_per_s
                / direct.output_tokens_per_s,
                "gateway_added_ttft_p50_ms": gateway.ttft_p50_ms - direct.ttft_p50_ms,
                "gateway_added_ttft_p95_ms": gateway.ttft_p95_ms - direct.ttft_p95_ms,
                "gateway_added_itl_p50_ms": gateway.itl_p50_ms - direct.itl_p50_ms,
                "chatfleet_over_guidellm_output_tokens_per_s": own.output_tokens_per_s
                / gateway.output_tokens_per_s,
                "chatfleet_minus_guidellm_ttft_p50_ms": own.ttft_p50_ms - gateway.ttft_p50_ms,
            }
        )
    return out


def markdown(rows: list[Row], ratio_rows: list[dict[str, Any]]) -> str:
    """The results table, then the ratios table, as Markdown."""
    lines = [
        "| streams | client | req/s | output tok/s | TTFT p50 | TTFT p95 | ITL p50 | completed | errors |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r.level} | {r.client} | {r.requests_per_s:.2f} | {r.output_tokens_per_s:.0f} | {r.ttft_p50_ms:.1f} ms "
        f"| {r.ttft_p95_ms:.1f} ms | {r.itl_p50_ms:.1f} ms | {r.completed} | {r.errors} |"
        for r in sorted(rows, key=lambda r: r.level)
    ]
    lines += [
        "",
        (
            "| streams | gateway/direct req/s | gateway/direct tok/s | added TTFT p50 | added TTFT p95 "
            "| added ITL p50 | chatfleet bench/guidellm tok/s (via gateway) |"
        ),
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {q['level']} | {q['gateway_over_direct_requests_per_s']:.3f} "
        f"| {q['gateway_over_direct_output_tokens_per_s']:.3f} | {q['gateway_added_ttft_p50_ms']:+.1f} ms "
        f"| {q['gateway_added_ttft_p95_ms']:+.1f} ms | {q['gateway_added_itl_p50_ms']:+.2f} ms "
        f"| {q['chatfleet_over_guidellm_output_tokens_per_s']:.3f} |"
        for q in ratio_rows
    ]
    return "\n".join(lines)


def measure(
    plan: Plan, python: Path, tokenizer: Path, work_dir: Path
) -> tuple[list[Row], list[dict[str, Any]], dict[str, str]]:
    """Every run of the plan against one engine-sim and gateway: guidellm direct (all levels), guidellm
    via the gateway, then ``chatfleet bench`` via the gateway level by level. Returns the rows, what
    each phase cost, and the gateway's environment."""
    rows: list[Row] = []
    phases: list[dict[str, Any]] = []
    timeout_s = 120 + 3 * plan.seconds_per_level * len(plan.levels)
    with servers(plan, work_dir) as (engine_url, gateway_url, pids, gateway_env):
        # Unrecorded: opens the gateway's upstream connections and warms both processes.
        prime = closed_loop(concurrency=8, lengths=FixedLengths(plan.prompt_tokens, plan.output_tokens))
        run_event_loop(run_load(prime, LoadConfig(url=f"{gateway_url}/v1", model=MODEL, max_requests=16)))
        for client, target, health in (
            (GUIDELLM_DIRECT, engine_url, "health"),
            (GUIDELLM_GATEWAY, gateway_url, "readyz"),
        ):
            name = client.replace(" ", "-")
            report_path = work_dir / f"{name}.report.json"
            spec = scenario(plan, target=target, health_route=health, tokenizer=tokenizer, report=report_path)
            run = partial(run_guidellm, python, spec, work_dir=work_dir, name=name, timeout_s=timeout_s)
            report, phase = measured(client, pids, engine_url, run)
            rows += parse_report(report, client)
            phases.append(phase)
            print(f"{client}: {phase['wall_s']:.0f} s, report {report_path}", flush=True)
        for level in plan.levels:
            run_own = partial(chatfleet_bench, plan, level, f"{gateway_url}/v1")
            row, phase = measured(f"{CHATFLEET_GATEWAY} x{level}", pids, engine_url, run_own)
            rows.append(row)
            phases.append(phase)
    return rows, phases, gateway_env


def noise_note(phases: list[dict[str, Any]]) -> str | None:
    """A warning when other processes took more than a fifth of a core during some phase."""
    busiest = max(phases, key=lambda phase: phase["cpu_cores"]["other"])
    if busiest["cpu_cores"]["other"] <= 0.2:
        return None
    return (
        f"note: other processes used up to {busiest['cpu_cores']['other']:.2f} cores (during "
        f"{busiest['phase']}); on a shared machine that disturbs the numbers: rerun when it is quiet."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: levels 1 and 32, 4 s each")
    parser.add_argument(
        "--out", type=Path, default=OUT, help=f"JSON results (default {OUT.relative_to(REPO)})"
    )
    parser.add_argument(
        "--work-dir", type=Path, help="guidellm's scenarios, reports and logs (default: a new temp dir)"
    )
    args = parser.parse_args()
    # SIGTERM as an exception, so that the finally blocks stop guidellm and the servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    plan = QUICK if args.quick else FULL
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="chatfleet-guidellm-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    started, load_before = time.time(), os.getloadavg()

    python = install()
    tokenizer = ensure_tokenizer(python, default_model_dir())
    rows, phases, gateway_env = measure(plan, python, tokenizer, work_dir)
    load_after = os.getloadavg()
    ratio_rows = ratios(rows)
    document = {
        "meta": {
            "started_at_unix": started,
            "elapsed_s": round(time.time() - started, 1),
            "quick": args.quick,
            "versions": installed_versions(python)
            | {"python": platform.python_version(), "chatfleet": chatfleet_revision()},
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "loadavg_before": load_before,
                "loadavg_after": load_after,
            },
        },
        "settings": {
            "plan": dataclasses.asdict(plan),
            "engine_sim": {"profile": PROFILE, "max_num_seqs": plan.max_num_seqs},
            "gateway_env": {key: val for key, val in gateway_env.items() if key != "CHATFLEET_KB__DATA_DIR"},
            "guidellm_env": GUIDELLM_ENV,
            "guidellm_scenario": scenario(
                plan,
                target="<engine-sim or gateway>",
                health_route="<health or readyz>",
                tokenizer=Path("<tiny-llama dir>"),
                report=Path("<report>"),
            ),
        },
        "rows": [dataclasses.asdict(row) for row in rows],
        "ratios": ratio_rows,
        "phases": phases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print()
    print(markdown(rows, ratio_rows))
    for row in rows:
        for warning in row.client_warnings:
            print(f"{row.client} x{row.level}: {warning}")
    print(f"\nload average (1, 5, 15 min) before {load_before}, after {load_after}; {os.cpu_count()} CPUs")
    if note := noise_note(phases):
        print(note)
    print(f"wrote {args.out} in {time.time() - started:.0f} s; guidellm reports and logs in {work_dir}")


if __name__ == "__main__":
    main()
