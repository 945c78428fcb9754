"""The gateway image and the laptop stack (docker/), checked with the real tools.

hadolint lints docker/Dockerfile; Compose v2's own loader (``docker-compose config``, no daemon
needed) validates and normalises docker/compose.yaml; promtool checks the Prometheus config as the
container sees it (the files laid out where compose mounts them); and the real Prometheus, with
compose's scrape config, scrapes a gateway and an engine-sim started with compose's settings and
the image's command, then evaluates the chart's rules on what it scraped. Images are not built
here (no daemon, no registry): the Dockerfile's contract with the chart (user, entrypoint, port,
probe) is read from it, and its healthcheck command is run against a live gateway.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from chatfleet.engines.engine_model import load_profile
from tests.support.procs import ManagedProcess, free_port, wait_until
from tests.support.prometheus import start_prometheus
from tests.support.tools import tool_path

ROOT = Path(__file__).parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE_FILE = ROOT / "docker" / "compose.yaml"
CHART_VALUES = ROOT / "charts" / "chatfleet" / "values.yaml"
CHATFLEET_SERVICES = ("gateway", "engine-sim")


def run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False, **kwargs)


# --- docker/Dockerfile -------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def dockerfile_stages(text: str) -> list[list[Instruction]]:
    """Instructions per build stage: continuation lines joined, comments dropped (as Docker does)."""
    stages: list[list[Instruction]] = []
    logical = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        logical += stripped[:-1] + " " if stripped.endswith("\\") else stripped
        if stripped.endswith("\\"):
            continue
        keyword, _, args = logical.partition(" ")
        logical = ""
        if keyword.upper() == "FROM":
            stages.append([])
        stages[-1].append(Instruction(keyword.upper(), args.strip()))
    return stages


def only(stage: list[Instruction], keyword: str) -> str:
    found = [i.args for i in stage if i.keyword == keyword]
    assert len(found) == 1, f"the final stage should have one {keyword}, has {found}"
    return found[0]


def exec_form(args: str) -> list[str]:
    """JSON (exec) form, so chatfleet is PID 1 and gets SIGTERM to drain; shell form would not."""
    parsed = json.loads(args)
    assert isinstance(parsed, list) and all(isinstance(a, str) for a in parsed), args
    return parsed


@pytest.fixture(scope="module")
def final_stage() -> list[Instruction]:
    return dockerfile_stages(DOCKERFILE.read_text())[-1]


@pytest.fixture(scope="module")
def chart_values() -> dict[str, Any]:
    return yaml.safe_load(CHART_VALUES.read_text())


def image_cmd(final_stage: list[Instruction]) -> list[str]:
    return exec_form(only(final_stage, "CMD"))


def healthcheck_cmd(final_stage: list[Instruction]) -> list[str]:
    options, _, command = only(final_stage, "HEALTHCHECK").partition("CMD ")
    assert options.strip().startswith("--"), "HEALTHCHECK takes options, then CMD [...]"
    return exec_form(command)


def test_hadolint_finds_nothing_in_the_dockerfile(tmp_path: Path) -> None:
    # A config file (./.hadolint.yaml, ~/.config/hadolint.yaml) could switch rules off: run where
    # there is none, failing on every level down to style.
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)}
    result = run([tool_path("hadolint"), "--no-color", "--failure-threshold", "style",
                  "--format", "json", str(DOCKERFILE)], cwd=tmp_path, env=env)
    findings = json.loads(result.stdout or "[]")
    assert result.returncode == 0 and findings == [], json.dumps(findings, indent=2) + result.stderr


def test_image_runs_as_the_charts_non_root_user(final_stage: list[Instruction],
                                                chart_values: dict[str, Any]) -> None:
    pod = chart_values["podSecurityContext"]
    # Numeric: Kubernetes' runAsNonRoot rejects a named user it cannot resolve.
    assert only(final_stage, "USER") == f"{pod['runAsUser']}:{pod['runAsGroup']}"


def test_image_serves_the_gateway_on_the_charts_port(final_stage: list[Instruction],
                                                     chart_values: dict[str, Any]) -> None:
    port = str(chart_values["gateway"]["port"])
    # The chart sets only args (serve ... / engine-sim ...): the entrypoint must be the CLI.
    assert exec_form(only(final_stage, "ENTRYPOINT")) == ["chatfleet"]
    assert image_cmd(final_stage) == ["serve", "--host", "0.0.0.0", "--port", port]
    assert only(final_stage, "EXPOSE") == port
    assert f"http://127.0.0.1:{port}/livez" in " ".join(healthcheck_cmd(final_stage))
    # The CLI parses the image's command (unknown options would fail here, before any cluster).
    cli = run([sys.executable, "-m", "chatfleet", *image_cmd(final_stage), "--help"])
    assert cli.returncode == 0, cli.stdout + cli.stderr


def test_image_copies_only_what_the_build_context_has() -> None:
    stages = dockerfile_stages(DOCKERFILE.read_text())
    copies = [i.args.split() for stage in stages for i in stage
              if i.keyword == "COPY" and "--from=" not in i.args]
    assert copies, "the builder stage copies the package from the context"
    for *sources, _target in copies:
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the build context {ROOT}"


# --- docker/compose.yaml -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The compose file as Compose v2 loads it: validated, paths absolute, ports normalised."""
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")}
    result = run([tool_path("docker-compose"), "--file", str(COMPOSE_FILE), "config",
                  "--format", "json"], env=env)
    assert result.returncode == 0, f"docker-compose rejects {COMPOSE_FILE}:\n{result.stderr}"
    return json.loads(result.stdout)


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def option(argv: list[str], name: str) -> str:
    assert name in argv, f"{name} missing from {argv}"
    return argv[argv.index(name) + 1]


def rebind(argv: list[str], port: int) -> list[str]:
    """``argv`` with its --host and --port values replaced: 127.0.0.1 and a free port."""
    out = list(argv)
    out[out.index("--host") + 1] = "127.0.0.1"
    out[out.index("--port") + 1] = str(port)
    return out


def bind_mounts(service: dict[str, Any]) -> list[dict[str, Any]]:
    return [v for v in service.get("volumes", []) if v["type"] == "bind"]


def test_compose_builds_chatfleet_from_the_dockerfile(compose: dict[str, Any]) -> None:
    for name in CHATFLEET_SERVICES:
        build = services(compose)[name]["build"]
        dockerfile = Path(build["context"]) / build["dockerfile"]
        assert Path(build["context"]).resolve() == ROOT.resolve(), f"{name}: context is not the repo root"
        assert dockerfile.resolve() == DOCKERFILE.resolve(), f"{name} builds {dockerfile}"
    images = {services(compose)[name]["image"] for name in CHATFLEET_SERVICES}
    assert len(images) == 1, f"gateway and engine-sim should share one image, not {images}"


def test_compose_mounts_only_files_that_exist(compose: dict[str, Any]) -> None:
    mounts = [(name, m) for name, svc in services(compose).items() for m in bind_mounts(svc)]
    assert mounts, "Prometheus and Grafana mount their config from the repository"
    for name, mount in mounts:
        assert Path(mount["source"]).exists(), f"{name} mounts {mount['source']}, which is missing"
        # Else Docker answers a missing file by creating an empty directory in its place.
        assert mount.get("bind", {}).get("create_host_path") is not True, (name, mount)


def test_compose_publishes_ports_on_localhost_only(compose: dict[str, Any]) -> None:
    published = [(name, p) for name, svc in services(compose).items() for p in svc.get("ports", [])]
    assert {name for name, _ in published} == {"gateway", "prometheus", "grafana"}
    for name, port in published:
        assert port.get("host_ip") == "127.0.0.1", f"{name} publishes {port} beyond this machine"


def test_compose_gateway_talks_to_engine_sim(compose: dict[str, Any]) -> None:
    env = services(compose)["gateway"]["environment"]
    sim_cmd = services(compose)["engine-sim"]["command"]
    assert sim_cmd[0] == "engine-sim"
    url = urlsplit(env["CHATFLEET_ENGINE__URL"])
    assert env["CHATFLEET_ENGINE__KIND"] == "openai"
    assert (url.scheme, url.hostname, url.path) == ("http", "engine-sim", "/v1")
    assert str(url.port) == option(sim_cmd, "--port")
    assert str(url.port) in services(compose)["engine-sim"].get("expose", [])
    profile = option(sim_cmd, "--profile")
    load_profile(profile)  # a profile chatfleet ships
    assert env["CHATFLEET_ENGINE__MODEL"] == f"chatfleet-sim/{profile}"
    assert env["CHATFLEET_ADMISSION__ENGINE_SLOTS"] == option(sim_cmd, "--max-num-seqs")


def test_compose_waits_on_healthchecks_that_probe_the_served_port(
        compose: dict[str, Any], final_stage: list[Instruction]) -> None:
    svcs = services(compose)
    image_port = option(image_cmd(final_stage), "--port")
    for name, svc in svcs.items():
        for dependency, how in svc.get("depends_on", {}).items():
            assert how["condition"] == "service_healthy", f"{name} starts before {dependency} works"
            dep = svcs[dependency]
            if dependency in CHATFLEET_SERVICES and dep.get("command") is None:
                # The image's HEALTHCHECK applies, and it probes the image's own port.
                assert f":{image_port}/" in " ".join(healthcheck_cmd(final_stage))
            else:
                assert "healthcheck" in dep, f"{name} waits for {dependency}, which has no healthcheck"
    sim = svcs["engine-sim"]
    assert f":{option(sim['command'], '--port')}/health" in " ".join(sim["healthcheck"]["test"])


def test_compose_locks_chatfleet_containers_down_like_the_chart(compose: dict[str, Any]) -> None:
    for name in CHATFLEET_SERVICES:
        svc = services(compose)[name]
        assert svc.get("read_only") is True, f"{name}: root filesystem should be read-only"
        assert "/tmp" in svc.get("tmpfs", []), f"{name}: /tmp is the one writable place"
        assert svc.get("cap_drop") == ["ALL"], name


# --- Prometheus and Grafana, as compose mounts them -------------------------------------------


def mount_tree(service: dict[str, Any], root: Path) -> None:
    """Copy each bind mount of ``service`` to ``root`` + its path inside the container."""
    for mount in bind_mounts(service):
        source, target = Path(mount["source"]), root / mount["target"].lstrip("/")
        assert source.exists(), f"{source} is mounted at {mount['target']} but does not exist"
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy(source, target)


def prometheus_config_path(compose: dict[str, Any]) -> str:
    flags = [a for a in services(compose)["prometheus"]["command"] if a.startswith("--config.file=")]
    assert len(flags) == 1, "compose starts Prometheus with an explicit --config.file"
    return flags[0].removeprefix("--config.file=")


def test_promtool_accepts_the_prometheus_config_as_mounted(compose: dict[str, Any],
                                                           tmp_path: Path) -> None:
    mount_tree(services(compose)["prometheus"], tmp_path)
    config = tmp_path / prometheus_config_path(compose).lstrip("/")
    result = run([tool_path("promtool"), "check", "config", str(config)])
    assert result.returncode == 0, result.stdout + result.stderr
    # promtool skips rule_files patterns that match nothing: the chart's rules must be among those checked.
    rule_files = yaml.safe_load(config.read_text())["rule_files"]
    assert rule_files, "compose's Prometheus loads the chart's rules"
    for pattern in rule_files:
        assert list(config.parent.glob(pattern)), f"rule_files {pattern} matches no mounted file"
    assert f"SUCCESS: {len(rule_files)} rule files found" in result.stdout, result.stdout


def test_prometheus_scrapes_both_gateway_paths(compose: dict[str, Any]) -> None:
    config = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())
    gateway_port = services(compose)["gateway"]["ports"][0]["target"]
    paths = set()
    for job in config["scrape_configs"]:
        paths.add(job.get("metrics_path", "/metrics"))
        for group in job["static_configs"]:
            assert group["targets"] == [f"gateway:{gateway_port}"], job["job_name"]
            assert {k: group["labels"][k] for k in ("job", "namespace", "pod")} == {
                "job": "chatfleet", "namespace": "compose", "pod": "gateway"}
    assert paths == {"/metrics", "/metrics/engine"}


def datasource_refs(node: Any) -> Iterator[Any]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                yield value
            yield from datasource_refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from datasource_refs(item)


def test_grafana_provisions_prometheus_and_the_charts_dashboards(compose: dict[str, Any],
                                                                 tmp_path: Path) -> None:
    svcs = services(compose)
    mount_tree(svcs["grafana"], tmp_path)
    provisioning = tmp_path / "etc" / "grafana" / "provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())[
        "datasources"]
    prometheus_port = svcs["prometheus"]["ports"][0]["target"]
    assert source["url"] == f"http://prometheus:{prometheus_port}" and source["isDefault"] is True
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "chatfleet.yaml").read_text())[
        "providers"]
    dashboards = sorted((tmp_path / provider["options"]["path"].lstrip("/")).glob("*.json"))
    assert dashboards, f"no dashboard at {provider['options']['path']}: is the chart's mounted?"
    for path in dashboards:
        board = json.loads(path.read_text())
        # "Export for sharing" inputs are filled in by the UI's import only, never by provisioning.
        assert "__inputs" not in board, f"{path.name} needs __inputs, which provisioning leaves unset"
        for ref in datasource_refs(board):
            uid = ref.get("uid") if isinstance(ref, dict) else ref
            kind = ref.get("type", "prometheus") if isinstance(ref, dict) else "prometheus"
            if uid is None or kind in ("grafana", "datasource") or str(uid).startswith("$"):
                continue
            assert uid in (source["uid"], source["name"]), f"{path.name} uses datasource {ref}"


# --- the stack, run for real (without Docker) --------------------------------------------------


@dataclass(frozen=True)
class Stack:
    sim_port: int
    gateway_port: int
    prometheus: str


@pytest.fixture(scope="module")
def stack(compose: dict[str, Any], final_stage: list[Instruction],
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """engine-sim with compose's command, the gateway with the image's command and compose's
    environment (its engine URL pointed at that engine-sim), and Prometheus with compose's config
    and rules, its targets pointed at that gateway and its intervals cut to 1 s."""
    svcs = services(compose)
    sim_port, gateway_port = free_port(), free_port()
    tree = tmp_path_factory.mktemp("prometheus")
    mount_tree(svcs["prometheus"], tree)
    config_path = tree / prometheus_config_path(compose).lstrip("/")
    config = yaml.safe_load(config_path.read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    for job in config["scrape_configs"]:
        for group in job["static_configs"]:
            group["targets"] = [f"127.0.0.1:{gateway_port}"]
    config_path.write_text(yaml.safe_dump(config))
    env = dict(svcs["gateway"]["environment"])
    env["CHATFLEET_ENGINE__URL"] = f"http://127.0.0.1:{sim_port}/v1"
    with ExitStack() as procs:
        sim = procs.enter_context(ManagedProcess(
            [sys.executable, "-m", "chatfleet", *rebind(svcs["engine-sim"]["command"], sim_port)],
            name="compose-engine-sim"))
        sim.wait_http(f"http://127.0.0.1:{sim_port}/health", timeout=30)
        gateway = procs.enter_context(ManagedProcess(
            [sys.executable, "-m", "chatfleet", *rebind(image_cmd(final_stage), gateway_port)],
            env=env, name="compose-gateway"))
        # Ready only once engine-sim lists the model compose names: the two agree.
        gateway.wait_http(f"http://127.0.0.1:{gateway_port}/readyz", timeout=30)
        prometheus, prometheus_url = start_prometheus(tree, config_path)
        procs.callback(prometheus.terminate)
        yield Stack(sim_port, gateway_port, prometheus_url)


def query(stack: Stack, promql: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{stack.prometheus}/api/v1/query", params={"query": promql}, timeout=5)
    response.raise_for_status()
    return response.json()["data"]["result"]


def healthcheck(argv: list[str], port: int, served: int) -> subprocess.CompletedProcess[str]:
    """Run a container healthcheck here: its python is ours, its port the one actually served."""
    args = [a.replace(f"127.0.0.1:{port}/", f"127.0.0.1:{served}/") for a in argv]
    assert args[0] == "python", argv
    return run([sys.executable, *args[1:]])


def test_healthchecks_pass_on_live_servers_and_fail_without(
        stack: Stack, compose: dict[str, Any], final_stage: list[Instruction]) -> None:
    image_port = int(option(image_cmd(final_stage), "--port"))
    assert healthcheck(healthcheck_cmd(final_stage), image_port, stack.gateway_port).returncode == 0
    assert healthcheck(healthcheck_cmd(final_stage), image_port, free_port()).returncode != 0
    sim = services(compose)["engine-sim"]
    sim_check = sim["healthcheck"]["test"]
    assert sim_check[0] == "CMD"
    sim_port = int(option(sim["command"], "--port"))
    assert healthcheck(sim_check[1:], sim_port, stack.sim_port).returncode == 0
    assert healthcheck(sim_check[1:], sim_port, free_port()).returncode != 0


def test_prometheus_gets_both_paths_with_the_charts_labels(stack: Stack,
                                                           compose: dict[str, Any]) -> None:
    pod = '{job="chatfleet", namespace="compose", pod="gateway"}'

    def both_up() -> bool:
        paths = sorted(s["metric"].get("metrics_path", "") for s in query(stack, f"up{pod} == 1"))
        return paths == ["/metrics", "/metrics/engine"]

    wait_until(both_up, timeout=20,
               message=f"up{pod} == 1 for both paths, told apart by a metrics_path label")
    slots = query(stack, f"chatfleet_engine_slots{pod}")
    expected = services(compose)["gateway"]["environment"]["CHATFLEET_ADMISSION__ENGINE_SLOTS"]
    assert [s["value"][1] for s in slots] == [expected]
    assert query(stack, f"vllm:num_requests_running{pod}"), "the engine's names reach Prometheus"


def test_the_charts_rules_evaluate_on_what_compose_scrapes(stack: Stack) -> None:
    def rules() -> list[dict[str, Any]]:
        groups = httpx.get(f"{stack.prometheus}/api/v1/rules", timeout=5).json()["data"]["groups"]
        return [rule for group in groups for rule in group["rules"]]

    def all_evaluated() -> bool:
        return all(not r["lastEvaluation"].startswith("0001-") for r in rules())

    assert rules(), "Prometheus loaded no rule from the chart's rules file"
    wait_until(all_evaluated, timeout=20, message="every rule evaluated once")
    failing = {r["name"]: r.get("lastError") for r in rules() if r["health"] != "ok"}
    assert not failing, failing
    names = "|".join(sorted({r["name"] for r in rules() if r["type"] == "recording"}))

    def recorded() -> bool:
        return bool(query(stack, f'{{__name__=~"{names}", namespace="compose", job="chatfleet"}}'))

    wait_until(recorded, timeout=20, message="a recording rule's series for the compose deployment")
