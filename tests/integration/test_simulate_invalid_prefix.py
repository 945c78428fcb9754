"""``chatfleet simulate`` never drops a request silently: requests the engine cannot serve have
their own ``invalid`` count and miss the SLO (unless ``--exclude-invalid``), the per-replica
capacity is measured without them; a Mooncake trace's block ids drive the prefix cache."""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

MAX_MODEL_LEN = 2048
FAST = ("--profile", "llama-3-8b-l4", "--engine-slots", "16", "--cold-start", "30")


def simulate(*args: str | Path) -> subprocess.CompletedProcess[str]:
    command = "from chatfleet.cli import app; app(prog_name='chatfleet')"
    # A wide console: rich's error panel wraps at 80 columns, which splits a long temporary path
    # (pytest's numbered base directory grows with every run on a machine) in the middle of a name.
    return subprocess.run([sys.executable, "-c", command, "simulate", *map(str, args)],
                          capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "COLUMNS": "1000"})


def write_csv(path: Path, rows: list[tuple[float, int, int]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["arrived_at", "num_prefill_tokens", "num_decode_tokens"])
        writer.writerows(rows)
    return path


def report_of(trace: Path, out: Path, *extra: str) -> dict:
    run = simulate("--trace", trace, *FAST, "--policies", "oracle,static", "--report", out, *extra)
    assert run.returncode == 0, run.stderr
    assert "invalid" in run.stdout
    return json.loads(out.read_text())


def test_over_length_requests_are_counted_invalid_and_miss_the_slo(tmp_path: Path) -> None:
    rng = random.Random(3)
    rows, over, at = [], 0, 0.0
    while at < 240:
        at += rng.expovariate(2.0)
        if rng.random() < 0.2:  # prompt + output over --max-model-len
            rows.append((round(at, 3), rng.randint(MAX_MODEL_LEN, 3 * MAX_MODEL_LEN), 50))
            over += 1
        else:
            rows.append((round(at, 3), rng.randint(200, 600), rng.randint(20, 80)))
    assert over > 10
    servable = [row for row in rows if row[1] + row[2] <= MAX_MODEL_LEN]
    mixed = write_csv(tmp_path / "mixed.csv", rows)

    limit = ("--max-model-len", str(MAX_MODEL_LEN))
    counted = report_of(mixed, tmp_path / "counted.json", *limit)
    excluded = report_of(mixed, tmp_path / "excluded.json", *limit, "--exclude-invalid")
    clean = report_of(write_csv(tmp_path / "clean.csv", servable), tmp_path / "clean.json", *limit)

    n = len(rows)
    assert counted["max_model_len"] == MAX_MODEL_LEN and counted["requests"] == n
    assert counted["unservable_share"] == pytest.approx(over / n)
    # The capacity bisection ran on the servable requests only: the same as on a trace without
    # the over-length rows.
    assert counted["replica_capacity"] == pytest.approx(clean["replica_capacity"])
    assert clean["unservable_share"] == 0
    assert counted["slo"]["exclude_invalid"] is False and excluded["slo"]["exclude_invalid"] is True
    for policy in ("oracle", "static"):
        row, without = counted["policies"][policy], excluded["policies"][policy]
        assert row["invalid"] == without["invalid"] == over
        assert clean["policies"][policy]["invalid"] == 0
        assert row["slo_excludes_invalid"] is False and without["slo_excludes_invalid"] is True
        # Counted: each invalid request is a miss; excluded: out of the denominator.
        assert row["slo_attainment"] <= (n - over) / n
        assert row["slo_attainment"] * n == pytest.approx(without["slo_attainment"] * (n - over))
        assert without["slo_attainment"] > row["slo_attainment"]


def test_a_request_over_the_whole_kv_cache_is_invalid_even_within_max_model_len(tmp_path: Path) -> None:
    # llama-3-8b-l4 holds 21,888 tokens of KV: a 30,000-token prompt can never run on it.
    rows = [(i * 0.5, 30_000 if i % 10 == 0 else 300, 20) for i in range(100)]
    data = report_of(write_csv(tmp_path / "kv.csv", rows), tmp_path / "kv.json",
                     "--max-model-len", "65536")
    assert data["max_model_len"] == 65536
    assert data["unservable_share"] == pytest.approx(0.1)
    assert data["policies"]["oracle"]["invalid"] == data["policies"]["static"]["invalid"] == 10


def test_a_profile_that_serves_none_of_the_trace_is_refused(tmp_path: Path) -> None:
    trace = write_csv(tmp_path / "long.csv", [(0.0, 5000, 10), (1.0, 6000, 10)])
    run = simulate("--trace", trace, *FAST, "--max-model-len", "4096")
    assert run.returncode == 2
    assert "can serve none of the 2 requests" in run.stderr and "--max-model-len" in run.stderr


def write_mooncake(path: Path) -> Path:
    """Two minutes of requests that share one of four 3-block system prompts, then own blocks."""
    rng = random.Random(5)
    lines, at_ms, fresh = [], 0, 1000
    while at_ms < 120_000:
        at_ms += int(rng.expovariate(2.0) * 1000)
        shared = rng.randrange(4)
        own = rng.randint(1, 2)
        ids = [shared * 10, shared * 10 + 1, shared * 10 + 2, *range(fresh, fresh + own)]
        fresh += own
        lines.append(json.dumps({"timestamp": at_ms, "input_length": 512 * len(ids) - rng.randint(0, 400),
                                 "output_length": rng.randint(10, 60), "hash_ids": ids}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_mooncake_trace_drives_the_prefix_cache(tmp_path: Path) -> None:
    trace = write_mooncake(tmp_path / "slice.jsonl")
    cached = report_of(trace, tmp_path / "cached.json")
    cold = report_of(trace, tmp_path / "cold.json", "--no-prefix-caching")
    # About 3 of every 4.5 blocks repeat a system prompt, which each pod caches on first sight
    # (random routing spreads the prompts over the pods; the last block is partly empty).
    assert cached["prefix_caching"] is True and 0.2 < cached["prefix_cache_hit_rate"] < 0.67
    assert cold["prefix_caching"] is False and cold["prefix_cache_hit_rate"] == 0
    assert cached["policies"]["oracle"]["invalid"] == 0


@pytest.mark.parametrize(("line", "expected"), [
    ('{"timestamp": 0, "input_length": 100}', "line 2"),
    ('{"timestamp": 0, "input_length": 100, "output_length": 5, "hash_ids": ["a"]}', "line 2"),
    ("not json", "line 2"),
])
def test_a_malformed_mooncake_line_is_refused_with_its_place(tmp_path: Path, line: str,
                                                              expected: str) -> None:
    trace = tmp_path / "bad.jsonl"
    trace.write_text('{"timestamp": 0, "input_length": 100, "output_length": 5, "hash_ids": [1]}\n'
                     + line + "\n")
    run = simulate("--trace", trace, *FAST)
    assert run.returncode == 2
    flat = " ".join(run.stderr.split())
    assert "bad.jsonl" in flat and expected in flat and "hash_ids" in flat


def test_a_per_token_ttft_allowance_scores_long_prompts_by_their_length(tmp_path: Path) -> None:
    # Every third prompt is 48k tokens: about 3 s of prefill on an idle H200, over a flat 2 s TTFT
    # whatever the fleet; with 0.1 s per 1k prompt tokens it has 6.8 s.
    rows = [(i * 2.0, 48_000 if i % 3 == 0 else 1_000, 20) for i in range(60)]
    trace = write_csv(tmp_path / "long.csv", rows)
    h200 = ("--profile", "llama-3.1-8b-h200", "--engine-slots", "8", "--cold-start", "30",
            "--policies", "oracle,static")
    flat = simulate("--trace", trace, *h200, "--report", tmp_path / "flat.json")
    allowed = simulate("--trace", trace, *h200, "--slo-ttft-per-1k-tokens", "0.1",
                       "--report", tmp_path / "allowed.json")
    assert flat.returncode == 0 and allowed.returncode == 0, flat.stderr + allowed.stderr
    assert "+ 0.1 s per 1k prompt tokens" in " ".join(allowed.stdout.split())
    flat_report, allowed_report = (json.loads((tmp_path / name).read_text()) for name in ("flat.json", "allowed.json"))
    assert flat_report["slo"]["ttft_per_1k_prompt_tokens_s"] == 0
    assert allowed_report["slo"]["ttft_per_1k_prompt_tokens_s"] == 0.1
    for policy in ("oracle", "static"):
        assert flat_report["policies"][policy]["slo_attainment"] <= 40 / 60
        assert allowed_report["policies"][policy]["slo_attainment"] > 0.95
    refused = simulate("--trace", trace, *h200, "--slo-ttft-per-1k-tokens", "-1")
    assert refused.returncode == 2 and "--slo-ttft-per-1k-tokens" in refused.stderr


def test_prefix_affinity_is_the_pickers_and_shows_in_the_report(tmp_path: Path) -> None:
    trace = write_mooncake(tmp_path / "slice.jsonl")
    data = report_of(trace, tmp_path / "affinity.json", "--routing", "epp", "--prefix-affinity")
    assert data["routing"]["kind"] == "epp" and data["routing"]["prefix_affinity"] is True
    refused = simulate("--trace", trace, *FAST, "--prefix-affinity")
    assert refused.returncode == 2
    assert "use it with routing epp" in " ".join(refused.stderr.replace("│", " ").split())
