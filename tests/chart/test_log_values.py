"""Logs (values gateway.log.*): the chart's gateway logs JSON lines with an access log by default
(clusters ship logs to a collector), either can be changed, and the variables are the gateway's
own settings."""

from __future__ import annotations

import os
from typing import Any

import pytest

from chatfleet.settings import Settings
from tests.chart.render import CHART, containers, env, helm, render, set_args
from tests.chart.test_chart import SIM


def log_env(values: dict[str, Any]) -> dict[str, str]:
    gateway = env(containers(render({**SIM, **values}))["gateway"])
    return {k: v for k, v in gateway.items() if k.startswith("CHATFLEET_LOG__")}


def test_by_default_the_gateway_logs_json_with_an_access_line_per_request() -> None:
    assert log_env({}) == {"CHATFLEET_LOG__FORMAT": "json", "CHATFLEET_LOG__ACCESS": "true"}


def test_text_lines_and_no_access_log_when_asked() -> None:
    assert log_env({"gateway.log.format": "text", "gateway.log.access": False}) == {
        "CHATFLEET_LOG__FORMAT": "text", "CHATFLEET_LOG__ACCESS": "false"}


@pytest.mark.parametrize("values", [{}, {"gateway.log.format": "text", "gateway.log.access": False}],
                         ids=["defaults", "text-no-access"])
def test_the_gateway_reads_the_log_variables_the_chart_sets(values: dict[str, Any],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("CHATFLEET_")]:
        monkeypatch.delenv(key)
    rendered = log_env(values)
    for name, value in rendered.items():
        monkeypatch.setenv(name, value)
    log = Settings().log
    assert log.format == rendered["CHATFLEET_LOG__FORMAT"]
    assert log.access is (rendered["CHATFLEET_LOG__ACCESS"] == "true")


@pytest.mark.parametrize(("values", "message"), [
    ({"gateway.log.format": "logfmt"}, "/gateway/log/format"),
    ({"gateway.log.access": "yes"}, "/gateway/log/access"),
    ({"gateway.log.level": "debug"}, "level"),
], ids=["format", "access", "unknown-key"])
def test_bad_log_values_are_refused_with_the_path_to_fix(values: dict[str, Any], message: str) -> None:
    result = helm("template", "x", str(CHART), *set_args(values))
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
