"""The rules file passes promtool's checks and unit tests, and the unit tests cover every rule.

The unit tests are promtool's own (tests/rules/*_test.yaml): input series, then the recorded
samples and the alerts (labels and rendered annotations) Prometheus would produce.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.support.promql import RULES_FILE, load_rules, metric_names
from tests.support.tools import tool_path

HERE = Path(__file__).parent
UNIT_TESTS = sorted(HERE.glob("*_test.yaml"))
RUNBOOK = "https://github.com/chatfleet/chatfleet/blob/main/docs/operations.md"
"""Where alerts' runbook_url points: docs/operations.md on the chart's home (Chart.yaml)."""
SEVERITIES = {"critical", "warning"}


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool_path("promtool"), *map(str, args)], capture_output=True,
                          text=True, timeout=120, check=False, cwd=HERE)


def alerts() -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for rule in load_rules() if "alert" in rule}


def records() -> set[str]:
    return {rule["record"] for rule in load_rules() if "record" in rule}


def unit_test_cases() -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = []
    for path in UNIT_TESTS:
        content = yaml.safe_load(path.read_text())
        assert content["rule_files"] == ["../../charts/chatfleet/rules/chatfleet-rules.yaml"], path
        cases += content["tests"]
    return cases


def test_promtool_check_rules_finds_nothing_to_report() -> None:
    result = promtool("check", "rules", RULES_FILE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""
    lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    assert lines == [f"Checking {RULES_FILE}", f"SUCCESS: {len(load_rules())} rules found"]


def test_rules_file_is_a_bare_groups_document() -> None:
    """The chart's PrometheusRule embeds the file as its spec, which holds only ``groups``."""
    content = yaml.safe_load(RULES_FILE.read_text())
    assert list(content) == ["groups"]
    assert [group["name"] for group in content["groups"]] == [
        "chatfleet.recording", "chatfleet.slo", "chatfleet.alerts"]


def test_promtool_unit_tests_pass() -> None:
    assert len(UNIT_TESTS) >= 3, f"unit test files not found in {HERE}"
    result = promtool("test", "rules", *(path.name for path in UNIT_TESTS))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert output.count("SUCCESS") == len(UNIT_TESTS), output


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    firing: set[str] = set()
    silent: set[str] = set()
    for case in unit_test_cases():
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    names = set(alerts())
    assert len(names) >= 8
    assert names - firing == set(), "alerts never tested firing"
    assert names - silent == set(), "alerts never tested not firing"
    assert (firing | silent) - names == set(), "tests of alerts the rules file does not have"


def test_every_recording_rule_is_tested_with_expected_samples() -> None:
    tested: set[str] = set()
    for case in unit_test_cases():
        for check in case.get("promql_expr_test", []):
            if check.get("exp_samples"):
                tested |= metric_names(check["expr"])
    assert len(records()) >= 10
    assert records() - tested == set(), "recording rules no unit test evaluates"


def test_recording_rules_are_named_level_metric_operations() -> None:
    for name in records():
        level, metric, operations = name.split(":")
        assert re.fullmatch(r"[a-z]+(_[a-z]+)*", level), name
        assert re.fullmatch(r"[a-z][a-z0-9_]*", metric), name
        assert re.fullmatch(r"[a-z][a-z0-9_]*", operations), name


def test_alerts_carry_severity_summary_description_and_runbook() -> None:
    for name, rule in alerts().items():
        assert re.fullmatch(r"ChatFleet[A-Za-z0-9]+", name), name
        assert rule["labels"]["severity"] in SEVERITIES, name
        annotations = rule["annotations"]
        assert set(annotations) == {"summary", "description", "runbook_url"}, name
        assert annotations["runbook_url"] == f"{RUNBOOK}#{name.lower()}"
        assert annotations["summary"].endswith(".") and annotations["description"].endswith("."), name
