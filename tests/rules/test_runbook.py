"""Every alert's runbook_url leads to a section of docs/operations.md written for it."""

from __future__ import annotations

import re

from tests.chart.render import ROOT
from tests.support.promql import load_rules

OPERATIONS = ROOT / "docs" / "operations.md"


def test_every_alert_has_its_runbook_section() -> None:
    headings = re.findall(r"^### (\S+)\n\n(.+?)(?=^##|\Z)", OPERATIONS.read_text(), re.MULTILINE | re.DOTALL)
    sections = {name: body for name, body in headings}
    alerts = [rule for rule in load_rules() if "alert" in rule]
    assert len(alerts) >= 8
    for rule in alerts:
        name = rule["alert"]
        assert name in sections, f"docs/operations.md has no '### {name}' section"
        assert len(sections[name].split()) >= 30, f"the {name} runbook says too little"
        anchor = rule["annotations"]["runbook_url"].rsplit("#", 1)[1]
        assert anchor == name.lower(), f"{name}: runbook_url anchor {anchor!r} is not the heading's"
    assert set(sections) - {rule["alert"] for rule in alerts} == set(), "a runbook for no alert"
