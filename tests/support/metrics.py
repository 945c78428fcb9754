"""Read Prometheus text exposition in tests: one sample's value, by name and labels."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


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
