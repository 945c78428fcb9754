"""The results table of docs/autoscaling.md: `chatfleet simulate` on both traces at three cold starts.

Each case runs the real command (its JSON report lands in docs/autoscaling/, plots for the 120 s
cold starts), then this prints the Markdown table the doc carries. Seeds are fixed (0), so a rerun
on the same code gives the same numbers.

    python scripts/autoscaling_table.py            # about 6 minutes on 2 cores
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRACES = ROOT.parent / "shared" / "traces"
OUT = ROOT / "docs" / "autoscaling"
CASES = (  # trace, speed, GPU profile: a speed at which the trace needs 8-30 replicas
    ("azure2023_conv.csv", 1.5, "llama-3-8b-l4"),
    ("azure2023_code.csv", 1.0, "llama-3-8b-a100"),
)
COLD_STARTS = (45, 120, 300)
LABELS = {"static": "static at peak", "hpa": "HPA on queue (chart defaults)",
          "keda": "KEDA, pending discount", "operator": "HPA + operator floor", "oracle": "oracle"}


def run_case(trace: Path, speed: float, profile: str, cold_start: int) -> dict:
    report = OUT / f"{trace.stem}-cold{cold_start}.json"
    command = [sys.executable, "-c", "from chatfleet.cli import app; app(prog_name='chatfleet')",
               "simulate", "--trace", str(trace), "--speed", f"{speed:g}", "--cold-start",
               str(cold_start), "--profile", profile, "--seed", "0", "--report", str(report)]
    if cold_start == 120:
        command += ["--plots", str(OUT / f"{trace.stem}-cold{cold_start}")]
    subprocess.run(command, check=True)
    return json.loads(report.read_text())


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def main() -> None:
    print("| trace | cold start | policy | SLO | GPU-s | vs oracle | 429s | overshoot | "
          "reversals/h | reaction s | recovery s |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    rows = []
    for name, speed, profile in CASES:
        for cold_start in COLD_STARTS:
            data = run_case(TRACES / name, speed, profile, cold_start)
            for policy, label in LABELS.items():
                r = data["policies"][policy]
                rows.append(
                    f"| {Path(name).stem.split('_')[1]} x{speed:g} | {cold_start} s | {label} | "
                    f"{r['slo_attainment']:.1%} | {r['gpu_seconds']:,.0f} | "
                    f"{r['gpu_seconds_vs_oracle']:.2f}x | {r['rejected']} | {r['peak_overshoot']} | "
                    f"{r['reversals_per_hour']:.1f} | {seconds(r['reaction_s'])} | "
                    f"{seconds(r['recovery_s'])} |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
