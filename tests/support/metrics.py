"""Read Prometheus text exposition in tests: one sample's value, by name and labels."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

METRICS_DOC = Path(__file__).parents[2] / "docs" / "metrics.md"
_ROW = re.compile(r"\| `((?:chatfleet_|vllm:)[a-z0-9_:]+)` \|\s*(\w+)\s*\|([^|]*)\|")


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels`` (0 if none)."""
    wanted = set(labels.items())
    return sum(v for (n, lab), v in samples(text).items() if n == name and wanted <= lab)


def families(text: str) -> dict[str, set[str]]:
    """Family name -> the label names its samples carry (le and quantile excluded)."""
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        names = out.setdefault(family.name, set())
        for sample in family.samples:
            names.update(k for k in sample.labels if k not in ("le", "quantile"))
    return out


def documented(section: str, doc: Path = METRICS_DOC) -> dict[str, set[str]]:
    """Metric name -> documented labels, from the tables of the section of docs/metrics.md whose
    ``## `` heading starts with ``section``: each process (gateway, engine-sim, operator) has its
    own section, and its /metrics is compared with that section only."""
    out: dict[str, set[str]] = {}
    inside = False
    for line in doc.read_text().splitlines():
        if line.startswith("## "):
            inside = line.removeprefix("## ").startswith(section)
            continue
        match = _ROW.match(line) if inside else None
        if match:
            out[match.group(1)] = {x.strip() for x in match.group(3).split(",") if x.strip()}
    return out


def family_name(doc_name: str) -> str:
    """The parser names a counter's family without ``_total``."""
    return doc_name.removesuffix("_total")
