"""What a user sees when a ``chatfleet`` command fails: the message (what happened, what to type
next) and the exit code (docs/cli.md, "Exit codes": 1 refused or partly done, 2 usage or
configuration, 3 unreachable). ``chatfleet kb`` runs in-process against real gateways on
127.0.0.1; serve, engine-sim, config, simulate and bench run as processes, as a shell runs them.
"""

from __future__ import annotations

import shlex
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from chatfleet.cli import app
from tests.conftest import Server, start_gateway
from tests.support.procs import free_port

FIXTURE_TRACE = Path(__file__).resolve().parents[1] / "fixtures" / "azure2023_conv_head200.csv"
UPLOAD_LIMIT = 2048


def said(result: Result | subprocess.CompletedProcess[str]) -> str:
    """stderr with whitespace collapsed (typer's error box wraps long lines)."""
    text = result.stderr
    return " ".join(text.replace("│", " ").split())


@pytest.fixture(scope="module")
def gw() -> Iterator[Server]:
    server = start_gateway({"CHATFLEET_KB__MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT)})
    yield server
    server.proc.terminate()


def kb(gateway: Server | str, *args: str, env: dict[str, str] | None = None) -> Result:
    """``chatfleet kb ARGS --url URL``, with no API key unless ``env`` gives one."""
    url = gateway if isinstance(gateway, str) else gateway.url
    return CliRunner().invoke(app, ["kb", *args, "--url", url],
                              env={"CHATFLEET_API_KEY": None, **(env or {})})


def test_creating_a_name_that_exists_fails_and_says_how_to_use_or_replace_it(gw: Server) -> None:
    created = kb(gw, "create", "dup")
    assert created.exit_code == 0
    assert "created knowledge base 'dup': add files with `chatfleet kb upload dup FILE...`" in created.stdout
    again = kb(gw, "create", "dup")
    assert again.exit_code == 1, "nothing was created"
    assert said(again) == ("knowledge base 'dup' already exists: upload into it with `chatfleet kb "
                           "upload dup FILE...`, or delete it first with `chatfleet kb delete dup`")


@pytest.mark.parametrize("command", [["files", "nope"], ["search", "nope", "anything"],
                                     ["delete", "nope"], ["upload", "nope", "README.md"]])
def test_a_knowledge_base_that_does_not_exist_is_named_with_how_to_create_it(
        gw: Server, command: list[str]) -> None:
    result = kb(gw, *command)
    assert result.exit_code == 1
    assert said(result) == ("knowledge base 'nope' does not exist: create it with `chatfleet kb "
                            "create nope`, or see the ones there are with `chatfleet kb list`")


def test_a_partial_upload_names_each_refused_file_and_prints_the_command_that_replaces(
        gw: Server, tmp_path: Path) -> None:
    old, new, tool = tmp_path / "old.md", tmp_path / "new.md", tmp_path / "tool.exe"
    old.write_text("# Old\n\nThe first version.")
    new.write_text("# New\n\nA new file.")
    tool.write_bytes(b"MZ")
    big = tmp_path / "big.md"
    big.write_text("word " * UPLOAD_LIMIT)
    assert kb(gw, "create", "part").exit_code == 0
    assert kb(gw, "upload", "part", str(old)).exit_code == 0

    result = kb(gw, "upload", "part", str(old), str(big), str(new), str(tool))
    assert result.exit_code == 1
    assert "new.md: stored" in result.stdout
    lines = result.stderr.splitlines()
    assert lines[0] == "old.md: not stored: 'part' already has a file of that name: add --override to replace it"
    assert lines[1].startswith("big.md: not stored: the gateway refused the request (code 413)")
    assert lines[2].startswith("tool.exe: not stored:") and "not supported" in lines[2]
    replace = f"chatfleet kb upload part --override {shlex.quote(str(old))}"
    assert lines[3] == f"1 of 4 files stored in 'part'; to replace the existing ones: `{replace}`"

    typed = kb(gw, *shlex.split(replace)[2:])
    assert typed.exit_code == 0 and "old.md: stored" in typed.stdout, "the hint is what to type"


def test_without_a_gateway_it_says_how_to_start_one_or_point_at_it() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for command in (["list"], ["create", "x"], ["search", "x", "q"]):
        result = kb(url, *command)
        assert result.exit_code == 3, command
        assert said(result).startswith(f"cannot reach the gateway at {url} (")
        assert "start one with `chatfleet serve`, or point at yours with --url URL" in said(result)


def test_a_url_that_is_not_the_gateways_base_url_is_named(gw: Server) -> None:
    no_scheme = kb(f"127.0.0.1:{gw.port}", "list")
    assert no_scheme.exit_code == 2
    assert "give the gateway's base URL, like http://127.0.0.1:8000" in said(no_scheme)
    with_v1 = kb(gw.v1, "list")
    assert with_v1.exit_code == 1
    assert said(with_v1) == (f"{gw.v1} has no /knowledge_base/list_knowledge_bases (HTTP 404): is "
                             "--url the gateway's base URL, like http://127.0.0.1:8000, without /v1?")


@pytest.fixture(scope="module")
def keyed() -> Iterator[Server]:
    """API keys "key-a" and "key-b", one request each and no refill to speak of."""
    server = start_gateway({"CHATFLEET_API_KEYS": "key-a,key-b", "CHATFLEET_AUTH__RATE_LIMIT_RPS": "0.001",
                            "CHATFLEET_AUTH__RATE_LIMIT_BURST": "1"})
    yield server
    server.proc.terminate()


def test_a_missing_or_wrong_api_key_says_where_the_key_goes(keyed: Server) -> None:
    missing = kb(keyed, "list")
    assert missing.exit_code == 1
    assert said(missing) == (f"the gateway at {keyed.url} needs an API key, sent as Authorization: "
                             "Bearer: set CHATFLEET_API_KEY=KEY, or type `chatfleet kb --api-key KEY` "
                             "before the command")
    wrong = kb(keyed, "list", env={"CHATFLEET_API_KEY": "not-a-key"})
    assert wrong.exit_code == 1
    assert said(wrong) == (f"the gateway at {keyed.url} did not accept the API key: check "
                           "CHATFLEET_API_KEY or --api-key")


def test_an_upload_stopped_midway_prints_the_command_that_sends_the_rest(
        keyed: Server, tmp_path: Path) -> None:
    """key-b's one request stores the first file; the second gets 429: the rest is to send later."""
    files = [tmp_path / name for name in ("a.md", "b.md", "c.md")]
    for path in files:
        path.write_text(f"# {path.stem}\n\nText.")
    assert kb(keyed, "create", "limited", env={"CHATFLEET_API_KEY": "key-a"}).exit_code == 0
    result = kb(keyed, "upload", "limited", *map(str, files), env={"CHATFLEET_API_KEY": "key-b"})
    assert result.exit_code == 1
    assert result.stdout == "a.md: stored\n"
    first, second = result.stderr.splitlines()
    assert first.startswith("the gateway is busy (") and " try again in " in first
    rest = shlex.join(["chatfleet", "kb", "upload", "limited", *map(str, files[1:])])
    assert second == f"1 of 3 files were stored before; to upload the rest: `{rest}`"


def chatfleet(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "chatfleet", *args], capture_output=True, text=True,
                          timeout=120, check=False, env=env)


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize("command", ["serve", "engine-sim"])
def test_a_port_in_use_is_a_usage_error_that_names_another(taken_port: int, command: str) -> None:
    result = chatfleet(command, "--port", str(taken_port))
    assert result.returncode == 2
    assert said(result).startswith(f"cannot listen on 127.0.0.1:{taken_port}: another process "
                                   f"listens there: stop it, or pick another port with --port "
                                   f"{taken_port + 1}")


def test_invalid_configuration_names_each_variable_and_never_its_value() -> None:
    env = {"PATH": "/usr/bin:/bin", "CHATFLEET_SERVER__PORT": "99999",
           "CHATFLEET_ENGINE__API_KEY": "sk-secret", "CHATFLEET_ENGINE__KIND": "nonsense"}
    for command in ("serve", "config"):
        result = chatfleet(command, env=env)
        assert result.returncode == 2, command
        lines = result.stderr.splitlines()
        assert lines[0] == "invalid configuration, nothing started:"
        assert "  server.port (CHATFLEET_SERVER__PORT): Input should be less than or equal to 65535" in lines
        assert any(line.startswith("  engine.kind (CHATFLEET_ENGINE__KIND): Input should be")
                   for line in lines)
        assert "nonsense" not in result.stderr and "sk-secret" not in result.stderr
    section = chatfleet("config", env={"PATH": "/usr/bin:/bin", "CHATFLEET_ENGINE": "openai"})
    assert section.returncode == 2
    assert "set each key on its own, e.g. CHATFLEET_ENGINE__KIND=openai" in said(section)


def test_an_upstream_url_that_cannot_be_used_is_a_configuration_error_without_its_password() -> None:
    password = "pw-" + "x7Kq2"
    env = {"PATH": "/usr/bin:/bin", "CHATFLEET_ENGINE__KIND": "openai",
           "CHATFLEET_ENGINE__MODEL": "m",
           "CHATFLEET_ENGINE__URL": f"http://user:{password}@127.0.0.1:99999/v1",
           "CHATFLEET_KB__EMBEDDINGS__URL": f"ftp://user:{password}@127.0.0.1/v1",
           "CHATFLEET_KB__EMBEDDINGS__MODEL": "e"}
    for command in ("serve", "config"):
        result = chatfleet(command, env=env)
        assert result.returncode == 2, (command, result.stderr)
        lines = result.stderr.splitlines()
        assert lines[0] == "invalid configuration, nothing started:"
        assert ("  engine.url (CHATFLEET_ENGINE__URL): its port is not a number from 1 to 65535: "
                "give an http(s) base URL including /v1, e.g. http://127.0.0.1:8001/v1") in lines
        assert any(line.startswith("  kb.embeddings.url (CHATFLEET_KB__EMBEDDINGS__URL): its "
                                   "scheme is not http:// or https://") for line in lines)
        assert password not in result.stderr + result.stdout and "Traceback" not in result.stderr


@pytest.mark.parametrize(("aliases", "reason"), [
    ("[1]", "Input should be a valid string"),
    ('["glm4-chat", "qwen,7b"]', "an alias cannot contain a comma: the variable is a "
                                 "comma-separated list"),
])
def test_a_model_alias_that_is_no_name_is_a_configuration_error(aliases: str, reason: str) -> None:
    result = chatfleet("config", env={"PATH": "/usr/bin:/bin",
                                      "CHATFLEET_ENGINE": f'{{"model_aliases": {aliases}}}'})
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert any(line.startswith(f"  engine.model_aliases (CHATFLEET_ENGINE__MODEL_ALIASES): {reason}")
               for line in result.stderr.splitlines()), result.stderr


@pytest.fixture
def without_matplotlib(tmp_path: Path) -> dict[str, str]:
    """An environment in which ``import matplotlib`` fails as when it is not installed."""
    shadow = tmp_path / "shadow" / "matplotlib"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'matplotlib'\", name='matplotlib')\n")
    return {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(shadow.parent)}


def test_plots_without_matplotlib_say_how_to_install_it_before_any_work(
        without_matplotlib: dict[str, str], tmp_path: Path) -> None:
    install = ("plots need matplotlib (No module named 'matplotlib'), which ChatFleet's bench extra "
               "installs: `python3 -m pip install -e '.[bench]'` in a ChatFleet checkout")
    simulate = chatfleet("simulate", "--trace", str(FIXTURE_TRACE), "--plots", str(tmp_path / "p"),
                         env=without_matplotlib)
    assert simulate.returncode == 2 and install in said(simulate) and "leave out --plots" in said(simulate)
    bench = chatfleet("bench", "run", "--url", f"http://127.0.0.1:{free_port()}/v1", "--model", "m",
                      "--max-requests", "1", "--concurrency", "1", "--plot", str(tmp_path / "b.png"),
                      env=without_matplotlib)
    assert bench.returncode == 2 and install in said(bench)
    assert not (tmp_path / "p").exists()


def test_a_trace_that_is_not_a_trace_csv_names_its_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0.5,100,20\n1.0,many,20\n2.0,7\n")
    result = chatfleet("simulate", "--trace", str(bad))
    assert result.returncode == 2
    assert f"Invalid value for --trace: {bad}, line 3:" in said(result)
    missing = chatfleet("simulate", "--trace", str(tmp_path / "none.csv"))
    assert missing.returncode == 2 and "does not exist" in said(missing)


def test_bench_without_a_server_exits_3() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    discover = chatfleet("bench", "run", "--url", url, "--concurrency", "1", "--max-requests", "1")
    assert discover.returncode == 3
    assert said(discover).startswith(f"cannot reach {url} to list its models (")
    given = chatfleet("bench", "run", "--url", url, "--model", "m", "--concurrency", "1",
                      "--max-requests", "2")
    assert given.returncode == 3
    assert said(given) == f"no request reached {url} (ConnectError): start the server, or point at it with --url"


def test_help_lists_the_exit_codes() -> None:
    result = chatfleet("--help")
    assert result.returncode == 0
    assert "Exit codes: 0 done; 1 the server refused" in " ".join(result.stdout.replace("│", " ").split())
