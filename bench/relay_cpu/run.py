"""Relay CPU per token: what each gateway spends, in CPU seconds, to relay a streamed answer.

The issue 13 baseline. One upstream stub (``stub.py``: OpenAI chunks paced 20 ms apart per stream, as
an engine's decode steps, with a different word in every chunk), one load client (``client.py``,
aiohttp) and the gateways under test, each its own process (tree) on 127.0.0.1, each relaying to the
same stub:

- ``chatfleet``: ``python -m chatfleet serve`` from this checkout (``CHATFLEET_ENGINE__KIND=openai``,
  engine slots and queue larger than the most streams, log level warning), one uvicorn process;
- ``python-floor``: ``floor_relay.py``, a raw ASGI app on the same uvicorn and aiohttp that forwards
  the upstream's bytes and does nothing else: the floor of a relay on ChatFleet's Python stack;
- ``vllm-router``: the production-stack's Rust router (PyPI ``vllm-router``, ``--policy round_robin``,
  the stub its one worker), from its venv ``~/.cache/chatfleet/peers/vllm-router``;
- ``litellm``: LiteLLM's proxy (``litellm[proxy]``, one model ``openai/<stub model>`` at the stub,
  one worker), from ``~/.cache/chatfleet/peers/litellm``.

A peer whose venv is missing is skipped (``--install`` creates it). The measure is CPU time, not
wall time: utime + stime (+ reaped children's) of every process of a gateway's tree, walked in /proc,
read just before the client starts its streams and just after the last one ends; the stub's and the
client's CPU are reported apart. Workload per run: N concurrent streams of T tokens, all started at
once; 64 and 256 streams x 32- and 256-token answers. Rounds are interleaved: within each round each
(N, T) runs every gateway in turn, the order rotated each round. Per gateway and N, CPU per request
(median and min over rounds) is fitted to ``fixed + per_token x T`` through the two answer lengths,
and compared with vllm-router's.

Every run checks that all N streams answered 200 and ended with ``data: [DONE]`` and that N x T tokens
arrived; a run that fails is recorded, not fitted. Writes ``docs/benchmarks/relay-cpu.json`` and
``relay-cpu.png`` (``--quick``: a temporary directory unless ``--out`` is given).

Usage: python bench/relay_cpu/run.py [--quick | --smoke] [--gateways chatfleet,vllm-router,litellm]
       [--install] [--out DIR] [--before SRC]
  --before SRC: also run ``chatfleet-before``, ChatFleet from another checkout's ``src`` directory
  (e.g. ``git archive main src | tar -x -C /tmp/before``), interleaved with the rest: before and
  after in the same run.
  full: 3 rounds, about 4.5 minutes on two cores (LiteLLM's runs most of it; a run's client
  timeout is 30 s + 4 ms a token, and no run starts after 9 minutes: the JSON says "truncated");
  --quick: 1 round of 64 streams x 32/128 tokens, about 30 s; --smoke: 8 streams x 8/32 tokens,
  ChatFleet alone by default, about 5 s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import signal
import socket
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx

from chatfleet.bench.process_cpu import tree_cpu_s

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PEERS = Path.home() / ".cache" / "chatfleet" / "peers"
HOST = "127.0.0.1"
MODEL = "relay-stub"
ALL_GATEWAYS = ("chatfleet", "chatfleet-before", "python-floor", "vllm-router", "litellm")
REFERENCE = "vllm-router"
LITELLM_KEY = "sk-" + secrets.token_hex(32)
"""LiteLLM's proxy refuses to start without a master key; the client sends it (from the
environment, not argv) to every gateway: ChatFleet and vllm-router run without keys and ignore it."""
VENVS = {"vllm-router": ("vllm-router", "vllm-router"), "litellm": ("litellm", "litellm[proxy]")}
"""Peer -> (venv directory under PEERS, pip requirement)."""


@dataclass(frozen=True)
class Plan:
    levels: tuple[int, ...]
    lengths: tuple[int, int]
    rounds: int
    budget_s: float = 540.0
    """No run starts after this many seconds; a run's client gives up 30 s past it."""
    pace_ms: float = 20.0


FULL = Plan(levels=(64, 256), lengths=(32, 256), rounds=3)
QUICK = Plan(levels=(64,), lengths=(32, 128), rounds=1, budget_s=90.0)
SMOKE = Plan(levels=(8,), lengths=(8, 32), rounds=1, budget_s=30.0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


# --- processes ----------------------------------------------------------------------------------


class Proc:
    """A server in its own process group, logging to a file; killed with its group."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log = log_dir / f"{name}.log"
        with self.log.open("wb") as log:
            self.popen = subprocess.Popen(args, env={**os.environ, **env}, stdin=subprocess.DEVNULL,
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, url: str, timeout_s: float, ok: Callable[[httpx.Response], bool] = lambda r: True) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                break
            try:
                response = httpx.get(url, timeout=2.0)
                if response.status_code == 200 and ok(response):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"{self.name} not ready at {url} within {timeout_s:.0f}s "
                           f"(exit {self.popen.poll()}); log {self.log}:\n{tail}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                pass
            except ProcessLookupError:
                pass
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.popen.wait()


def start_stub(log_dir: Path, pace_ms: float | None = None) -> tuple[Proc, str]:
    """The relay stub (``stub.py``) on a free port, ready, and its base URL; stopped again if it
    does not become ready. ``pace_ms``: between a stream's chunks (the stub's default: 20)."""
    port = free_port()
    args = [sys.executable, str(HERE / "stub.py"), "--port", str(port), "--model", MODEL]
    if pace_ms is not None:
        args += ["--pace-ms", str(pace_ms)]
    stub = Proc("stub", args, {}, log_dir)
    url = f"http://{HOST}:{port}"
    try:
        stub.wait_ready(f"{url}/health", 30)
    except BaseException:
        stub.stop()
        raise
    return stub, url


T = TypeVar("T")


def rotated(items: list[T], round_: int) -> list[T]:
    """``items`` starting at round ``round_``'s place: interleaved rounds run them in turn first."""
    shift = round_ % len(items)
    return items[shift:] + items[:shift]


def peer_bin(name: str, exe: str) -> Path:
    return PEERS / VENVS[name][0] / "bin" / exe


def install_peer(name: str) -> None:
    venv = PEERS / VENVS[name][0]
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", VENVS[name][1]], check=True, timeout=900)


def peer_version(name: str) -> str | None:
    dist = {"vllm-router": "vllm-router", "litellm": "litellm"}[name]
    out = subprocess.run([str(peer_bin(name, "python")), "-c",
                          f"import importlib.metadata as m; print(m.version({dist!r}))"],
                         capture_output=True, text=True, timeout=60)
    return out.stdout.strip() or None


def start_gateway(name: str, stub_url: str, top: int, log_dir: Path,
                  before_src: Path | None = None, workers: int = 1) -> tuple[Proc, str]:
    """Start one gateway relaying to the stub; returns it and its OpenAI base URL once ready.
    ``workers``: ChatFleet's worker processes (``server.workers``)."""
    port = free_port()
    base = f"http://{HOST}:{port}"
    if name in ("chatfleet", "chatfleet-before"):
        src = before_src if name == "chatfleet-before" else REPO / "src"
        if src is None:
            raise ValueError("chatfleet-before needs --before SRC")
        env = {
            "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]),
            "CHATFLEET_ENGINE__KIND": "openai",
            "CHATFLEET_ENGINE__URL": f"{stub_url}/v1",
            "CHATFLEET_ENGINE__MODEL": MODEL,
            "CHATFLEET_ADMISSION__ENGINE_SLOTS": str(top),
            "CHATFLEET_ADMISSION__MAX_QUEUE": str(top),
            "CHATFLEET_ENGINE__MAX_CONNECTIONS": str(2 * top + 16),
            "CHATFLEET_SERVER__HOST": HOST,
            "CHATFLEET_SERVER__PORT": str(port),
            "CHATFLEET_SERVER__LOG_LEVEL": "warning",
            "CHATFLEET_SERVER__WORKERS": str(workers),
            "CHATFLEET_KB__DATA_DIR": str(log_dir / f"kb-{name}"),  # never ./data of the cwd
        }
        proc = Proc(name, [sys.executable, "-m", "chatfleet", "serve"], env, log_dir)
        proc.wait_ready(f"{base}/readyz", 60)
    elif name == "python-floor":
        proc = Proc(name, [sys.executable, str(HERE / "floor_relay.py"), "--port", str(port),
                           "--upstream", stub_url], {}, log_dir)
        proc.wait_ready(f"{base}/health", 60)
    elif name == "vllm-router":
        proc = Proc(name, [str(peer_bin(name, "vllm-router")), "--host", HOST, "--port", str(port),
                           "--worker-urls", stub_url, "--policy", "round_robin", "--log-level", "warning",
                           "--max-concurrent-requests", str(4 * top), "--queue-size", str(top)],
                    {}, log_dir)
        proc.wait_ready(f"{base}/v1/models", 90)
    elif name == "litellm":
        config = log_dir / "litellm.yaml"
        config.write_text(
            "model_list:\n"
            f"  - model_name: {MODEL}\n"
            "    litellm_params:\n"
            f"      model: openai/{MODEL}\n"
            f"      api_base: {stub_url}/v1\n"
            "      api_key: none\n"
            "litellm_settings:\n"
            "  telemetry: false\n"
            "  drop_params: true\n"
        )
        env = {"LITELLM_MASTER_KEY": LITELLM_KEY, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
               "LITELLM_TELEMETRY": "False", "NO_DOCS": "True"}
        proc = Proc(name, [str(peer_bin(name, "litellm")), "--config", str(config), "--host", HOST,
                           "--port", str(port), "--num_workers", "1"], env, log_dir)
        proc.wait_ready(f"{base}/health/liveliness", 180)
    else:
        raise ValueError(name)
    return proc, f"{base}/v1"


# --- one run ------------------------------------------------------------------------------------


def run_client(gateway: Proc, stub: Proc, url: str, streams: int, tokens: int, timeout_s: float) -> dict[str, Any]:
    """One workload through one gateway: the client's result and the CPU each side spent."""
    client = subprocess.Popen(
        [sys.executable, str(HERE / "client.py"), "--url", url, "--model", MODEL, "--streams",
         str(streams), "--tokens", str(tokens), "--timeout", str(timeout_s), "--api-key-env",
         "RELAY_CPU_KEY"],
        env={**os.environ, "RELAY_CPU_KEY": LITELLM_KEY}, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert client.stdin is not None and client.stdout is not None
    try:
        if client.stdout.readline().strip() != "ready":
            raise RuntimeError("the client did not start")
        gw0, stub0 = tree_cpu_s(gateway.popen.pid), tree_cpu_s(stub.popen.pid)
        client.stdin.write("go\n")
        client.stdin.flush()
        line = client.stdout.readline()
        gw1, stub1 = tree_cpu_s(gateway.popen.pid), tree_cpu_s(stub.popen.pid)
        client.wait(30)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    result = json.loads(line)
    ok = (result["done"] == streams and not result["errors"]
          and result["tokens_received"] == streams * tokens)
    return {**result, "ok": ok, "gateway_cpu_s": round(gw1[0] - gw0[0], 3), "gateway_processes": gw1[1],
            "stub_cpu_s": round(stub1[0] - stub0[0], 3)}


# --- the fit ------------------------------------------------------------------------------------


def fit(per_request_ms: dict[int, float]) -> dict[str, float]:
    """fixed (ms) + per_token (µs) x T through the two answer lengths' CPU per request."""
    (t1, c1), (t2, c2) = sorted(per_request_ms.items())
    per_token_ms = (c2 - c1) / (t2 - t1)
    return {"per_token_us": round(per_token_ms * 1000, 1), "fixed_ms": round(c1 - per_token_ms * t1, 3)}


def summarize(runs: list[dict[str, Any]], plan: Plan, gateways: list[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for gateway in gateways:
        for level in plan.levels:
            cells: dict[str, Any] = {}
            per_request: dict[str, dict[int, float]] = {"median": {}, "min": {}}
            for tokens in plan.lengths:
                mine = [r for r in runs if (r["gateway"], r["streams"], r["tokens_asked"]) == (gateway, level, tokens)]
                good = [r for r in mine if r["ok"]]
                cpu_ms = [1000 * r["gateway_cpu_s"] / level for r in good]
                cells[str(tokens)] = {
                    "runs": len(mine), "ok_runs": len(good),
                    "gateway_cpu_ms_per_request": sorted(round(c, 3) for c in cpu_ms),
                    "gateway_us_per_token_all_in": round(1000 * statistics.median(cpu_ms) / tokens, 1) if good else None,
                    "stub_us_per_token": round(1e6 * statistics.median(r["stub_cpu_s"] for r in good) / (level * tokens), 1) if good else None,
                    "client_us_per_token": round(1e6 * statistics.median(r["client_cpu_s"] for r in good) / (level * tokens), 1) if good else None,
                    "wall_s_median": round(statistics.median(r["wall_s"] for r in good), 2) if good else None,
                }
                if good:
                    per_request["median"][tokens] = statistics.median(cpu_ms)
                    per_request["min"][tokens] = min(cpu_ms)
            entry: dict[str, Any] = {"by_length": cells}
            for stat in ("median", "min"):
                if len(per_request[stat]) == 2:
                    entry[stat] = fit(per_request[stat])
            summary.setdefault(gateway, {})[str(level)] = entry
    reference = summary.get(REFERENCE)
    if reference:
        for gateway, levels in summary.items():
            for level, entry in levels.items():
                ref = reference[level].get("median")
                if ref and entry.get("median"):
                    entry["ratio_to_vllm_router"] = {
                        "per_token": round(entry["median"]["per_token_us"] / ref["per_token_us"], 2) if ref["per_token_us"] > 0 else None,
                        "fixed": round(entry["median"]["fixed_ms"] / ref["fixed_ms"], 1) if ref["fixed_ms"] > 0 else None,
                    }
    return summary


def plot(summary: dict[str, Any], plan: Plan, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gateways = list(summary)
    colors = {"chatfleet": "tab:blue", "chatfleet-before": "tab:gray", "python-floor": "tab:olive",
              "vllm-router": "tab:green", "litellm": "tab:red"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / max(1, len(gateways))
    for ax, key, label in ((axes[0], "per_token_us", "CPU per relayed token (µs)"),
                           (axes[1], "fixed_ms", "fixed CPU per request (ms)")):
        for g, gateway in enumerate(gateways):
            xs, ys, lows = [], [], []
            for i, level in enumerate(plan.levels):
                entry = summary[gateway][str(level)]
                if "median" in entry:
                    xs.append(i + (g - (len(gateways) - 1) / 2) * width)
                    ys.append(max(entry["median"][key], 1e-3))
                    lows.append(max(entry["min"][key], 1e-3))
            bars = ax.bar(xs, ys, width, label=gateway, color=colors.get(gateway))
            ax.scatter(xs, lows, color="black", marker="_", s=120, zorder=3)
            for bar, y in zip(bars, ys):
                ax.annotate(f"{y:.3g}", (bar.get_x() + bar.get_width() / 2, y), ha="center",
                            va="bottom", fontsize=8)
        ax.set_xticks(range(len(plan.levels)), [f"{n} streams" for n in plan.levels])
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"Relay CPU: fixed + per-token fit from {plan.lengths[0]}- and {plan.lengths[1]}-token "
                 f"answers, {plan.pace_ms:g} ms pacing (bars median of {plan.rounds}, ticks min)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- main ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true")
    mode.add_argument("--smoke", action="store_true")
    parser.add_argument("--gateways", default=None, help="comma-separated; default: all installed "
                        "(--smoke: chatfleet)")
    parser.add_argument("--install", action="store_true", help="pip-install missing peers into their venvs")
    parser.add_argument("--out", type=Path, default=None, help="directory for relay-cpu.json and .png")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--before", type=Path, default=None, help="another checkout's src directory: "
                        "also run it as chatfleet-before")
    args = parser.parse_args()
    plan = SMOKE if args.smoke else QUICK if args.quick else FULL
    out = args.out or (REPO / "docs" / "benchmarks" if plan is FULL else Path(tempfile.mkdtemp(prefix="relay-cpu-")))
    if args.rounds:
        plan = dataclasses.replace(plan, rounds=args.rounds)
    out.mkdir(parents=True, exist_ok=True)
    wanted = args.gateways.split(",") if args.gateways else (
        ["chatfleet"] if args.smoke else [g for g in ALL_GATEWAYS if g != "chatfleet-before"])
    if args.before is not None and "chatfleet-before" not in wanted:
        wanted.insert(1, "chatfleet-before")
    skipped: dict[str, str] = {}
    gateways: list[str] = []
    for name in wanted:
        if name not in ALL_GATEWAYS:
            parser.error(f"unknown gateway {name!r}")
        if name in VENVS and not peer_bin(name, "python").exists():
            if args.install:
                install_peer(name)
            else:
                skipped[name] = f"no venv at {PEERS / VENVS[name][0]} (run with --install)"
                continue
        gateways.append(name)

    top = max(plan.levels)
    log_dir = Path(tempfile.mkdtemp(prefix="relay-cpu-logs-"))
    started = time.monotonic()
    procs: list[Proc] = []
    runs: list[dict[str, Any]] = []
    versions: dict[str, str | None] = {}
    truncated = False
    try:
        stub, stub_url = start_stub(log_dir, plan.pace_ms)
        procs.append(stub)
        urls: dict[str, str] = {}
        by_name: dict[str, Proc] = {}
        for name in list(gateways):
            try:
                proc, url = start_gateway(name, stub_url, top, log_dir,
                                          args.before.resolve() if args.before else None)
            except RuntimeError as exc:
                skipped[name] = f"did not start: {str(exc).splitlines()[0]}"
                print(exc, file=sys.stderr)
                gateways.remove(name)
                continue
            procs.append(proc)
            urls[name], by_name[name] = url, proc
            versions[name] = (peer_version(name) if name in VENVS else "floor_relay.py" if name == "python-floor" else
                              _chatfleet_version(args.before.resolve() if name == "chatfleet-before" and args.before
                                                 else REPO / "src"))
            # Warm up: first requests import lazily (LiteLLM) and open the upstream pool.
            for _ in range(2):
                run_client(proc, stub, url, 8, 8, 60)
            print(f"{name} ready ({time.monotonic() - started:.0f}s)", file=sys.stderr)
        for round_ in range(plan.rounds):
            order = rotated(gateways, round_)
            for level in plan.levels:
                for tokens in plan.lengths:
                    for name in order:
                        left = started + plan.budget_s - time.monotonic()
                        if left <= 0:
                            truncated = True
                            continue
                        timeout = min(30 + level * tokens * 0.004, left + 30)  # LiteLLM ~0.7 ms a token
                        result = run_client(by_name[name], stub, urls[name], level, tokens, timeout)
                        result.update(gateway=name, round=round_)
                        runs.append(result)
                        print(f"round {round_} {name:12s} {level:4d} x {tokens:4d}: gateway "
                              f"{result['gateway_cpu_s']:7.2f} s CPU ({1e6 * result['gateway_cpu_s'] / (level * tokens):6.1f} µs/token "
                              f"all-in), stub {result['stub_cpu_s']:.2f}, client {result['client_cpu_s']:.2f}, "
                              f"wall {result['wall_s']:.1f} s{'' if result['ok'] else ' FAILED ' + json.dumps(result['errors'])}",
                              file=sys.stderr)
        stub_stats = httpx.get(f"{stub_url}/stats", timeout=5).json()
    finally:
        for proc in reversed(procs):
            proc.stop()

    summary = summarize(runs, plan, gateways)
    report = {
        "benchmark": "relay-cpu",
        "mode": "smoke" if args.smoke else "quick" if args.quick else "full",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": _git_commit(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_after": os.getloadavg()},
        "plan": dataclasses.asdict(plan),
        "method": ("CPU = utime+stime(+reaped children) of every process of each gateway's tree from /proc, "
                   "read just before and after each run; CPU per request fitted as fixed + per_token x T "
                   "through the two answer lengths (median and min over rounds)"),
        "gateways": gateways,
        "versions": versions,
        "skipped": skipped,
        "stub_stats": stub_stats,
        "elapsed_s": round(time.monotonic() - started, 1),
        "truncated": truncated,
        "summary": summary,
        "runs": runs,
    }
    (out / "relay-cpu.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(summary, plan, out / "relay-cpu.png")
    print(_table(summary, plan))
    print(f"wrote {out / 'relay-cpu.json'} and {out / 'relay-cpu.png'} ({report['elapsed_s']} s); logs in {log_dir}")
    if any(not r["ok"] for r in runs):
        sys.exit(1)


def _table(summary: dict[str, Any], plan: Plan) -> str:
    lines = ["| gateway | streams | per token µs (median / min) | fixed ms per request (median / min) | "
             "per token vs vllm-router | fixed vs vllm-router |", "|---|---|---|---|---|---|"]
    for gateway, levels in summary.items():
        for level, entry in levels.items():
            if "median" not in entry:
                lines.append(f"| {gateway} | {level} | failed | failed | | |")
                continue
            ratio = entry.get("ratio_to_vllm_router", {})
            lines.append(f"| {gateway} | {level} | {entry['median']['per_token_us']} / {entry['min']['per_token_us']} | "
                         f"{entry['median']['fixed_ms']} / {entry['min']['fixed_ms']} | "
                         f"{ratio.get('per_token', '')} | {ratio.get('fixed', '')} |")
    return "\n".join(lines)


def _git_commit() -> str | None:
    out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or None


def _chatfleet_version(src: Path) -> str | None:
    out = subprocess.run([sys.executable, "-c", "import chatfleet; print(chatfleet.__version__)"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(src)})
    return out.stdout.strip() or None


if __name__ == "__main__":
    main()
