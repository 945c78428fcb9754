"""``chatfleet simulate`` as a user runs it: a trace CSV in, a table, a JSON report and a plot out."""

from __future__ import annotations

import csv
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

POLICIES = ("static", "hpa", "keda", "operator", "oracle")


def write_trace(path: Path) -> Path:
    """Six minutes: 1 req/s, then 6 req/s from minute two (a step), 400-token prompts."""
    rng = random.Random(7)
    rows, at = [], 0.0
    while at < 360:
        at += rng.expovariate(1.0 if at < 120 else 6.0)
        rows.append((round(at, 3), rng.randint(200, 600), rng.randint(20, 80)))
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["arrived_at", "num_prefill_tokens", "num_decode_tokens"])
        writer.writerows(rows)
    return path


def simulate(*args: str | Path) -> subprocess.CompletedProcess[str]:
    command = "from chatfleet.cli import app; app(prog_name='chatfleet')"
    return subprocess.run([sys.executable, "-c", command, "simulate", *map(str, args)],
                          capture_output=True, text=True, timeout=300, check=False)


def test_simulate_compares_every_policy_and_writes_its_report_and_plot(tmp_path: Path) -> None:
    trace = write_trace(tmp_path / "step.csv")
    report, plots = tmp_path / "out" / "report.json", tmp_path / "plots"
    run = simulate("--trace", trace, "--speed", "1", "--cold-start", "60", "--profile",
                   "llama-3-8b-l4", "--engine-slots", "16", "--report", report, "--plots", plots)
    assert run.returncode == 0, run.stderr
    for policy in POLICIES:
        assert policy in run.stdout
    data = json.loads(report.read_text())
    assert set(data["policies"]) == set(POLICIES)
    assert data["engine_slots"] == 16 and data["replica_capacity"] > 0
    assert data["policies"]["oracle"]["gpu_seconds_vs_oracle"] == pytest.approx(1.0)
    for policy in POLICIES:
        row = data["policies"][policy]
        assert set(row) >= {"slo_attainment", "gpu_seconds", "gpu_seconds_vs_oracle", "rejected",
                            "peak_overshoot", "reversals_per_hour", "reaction_s", "recovery_s"}
        assert 0 <= row["slo_attainment"] <= 1 and row["gpu_seconds"] > 0
    # Static-at-peak holds its replicas from the start; the reactive policies add pods after the
    # step, the oracle before it.
    assert data["policies"]["static"]["reversals_per_hour"] == 0
    assert data["policies"]["hpa"]["peak_replicas"] > 1
    assert data["policies"]["oracle"]["reaction_s"] <= 0
    assert (plots / "replicas-queue-ttft.png").stat().st_size > 10_000


def test_simulate_routes_through_the_endpoint_picker_with_routing_epp(tmp_path: Path) -> None:
    trace = write_trace(tmp_path / "step.csv")
    reports = {}
    for routing in ("random", "epp"):
        report = tmp_path / f"{routing}.json"
        run = simulate("--trace", trace, "--cold-start", "60", "--profile", "llama-3-8b-l4",
                       "--engine-slots", "16", "--policies", "static", "--routing", routing,
                       "--poll-interval", "0.1", "--report", report)
        assert run.returncode == 0, run.stderr
        assert f"{routing} routing" in " ".join(run.stdout.split())
        reports[routing] = json.loads(report.read_text())
    assert reports["epp"]["routing"] == {"kind": "epp", "poll_interval_s": 0.1,
                                         "prefix_affinity": False, "kv_poll_interval_s": 0.5}
    assert reports["random"]["routing"]["kind"] == "random"
    random_row, epp_row = (reports[r]["policies"]["static"] for r in ("random", "epp"))
    # The same fleet (static at peak), so the same GPUs; the picker queues less than chance.
    assert epp_row["gpu_seconds"] == pytest.approx(random_row["gpu_seconds"], rel=0.02)
    assert epp_row["slo_attainment"] >= random_row["slo_attainment"]
    assert 0 < epp_row["ttft_p99_s"] <= random_row["ttft_p99_s"]


@pytest.mark.parametrize(("args", "message"), [
    (("--policies", "hpa,magic"), "unknown policies ['magic']"),
    (("--routing", "magic"), "unknown routing 'magic'"),
    (("--routing", "epp", "--poll-interval", "0"), "--poll-interval"),
    (("--profile", "gpt-5"), "unknown engine profile 'gpt-5'"),
    (("--duration", "1", "--speed", "0.01"), "no requests left"),
])
def test_bad_arguments_are_refused_with_what_to_fix(tmp_path: Path, args: tuple[str, ...],
                                                    message: str) -> None:
    run = simulate("--trace", write_trace(tmp_path / "t.csv"), *args)
    assert run.returncode == 2
    assert message in " ".join(run.stderr.split())


def test_a_trace_without_the_columns_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("time,tokens\n0.0,5\n")
    run = simulate("--trace", bad)
    assert run.returncode == 2
    assert "arrived_at" in run.stderr
