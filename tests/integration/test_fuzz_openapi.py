"""Schemathesis fuzzes every operation in the gateway's own /openapi.json against a real gateway.

One gateway process (engine-sim upstream for chat and embeddings, local knowledge-base store in a
fresh directory) answers every path and method the schema lists, multipart upload and SSE routes
included: no route is excluded. Per operation: schemathesis' coverage cases (boundary values,
missing and wrongly typed fields, malformed content types, and every HTTP method the path does
not declare), then ``FUZZ_EXAMPLES`` Hypothesis cases, drawn valid and invalid. Each response
must pass

- ``not_a_server_error``: no status >= 500 (the engine-sim upstream is healthy, so none is due);
- ``status_code_conformance``: the status is one the operation declares;
- ``content_type_conformance``: so is the media type (SSE routes declare text/event-stream);
- ``response_schema_conformance``: the body matches the schema declared for that status and media
  type, the JSON of every SSE event included;
- ``response_headers_conformance``: declared headers (Retry-After) are present and well formed.

A request with a method the path does not declare must get 405 (the checks above skip those
probes: they are no operation's answers).

To reach past the first checks, a drawn half of the generated cases gets the served model as
``model``, and a drawn half ``samples`` (the name the schema's examples use) as knowledge-base name
(``knowledge_base_name``, ``kb_name``, the KB chat route's ``{param}`` with ``{mode}`` local_kb) and
``test.txt`` as ``file_name``; coverage cases get the served model. Only non-empty strings are
replaced: an empty, wrongly typed or missing value is the point of its case. The knowledge base is
re-created with its two files before each operation (the fuzzed delete routes remove them). Chat
bodies without ``max_tokens`` (null, or 0 on Chatchat's routes, mean the default) get one of 1-16,
so that no answer runs on to the engine's context length: output length is not what this test is
about, and the gateway's ``limits.max_tokens`` is 16 here, so larger asks are refused anyway.

Coverage cases are deterministic and generation is derandomized, so a failure reproduces on the
next run; each failure is reported with its curl command.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import (
    SIM_MODEL,
    Server,
    start_engine_sim,
    start_gateway,
    upstream_env,
)

FUZZ_EXAMPLES = 60
"""Hypothesis cases per operation, after its coverage cases."""
MIN_CASES = 2000
"""The run must send at least this many cases in all."""
KB = "samples"
"""The knowledge base the schema's examples name."""
KB_FILES = {"file_name.md": b"# Queue\n\nThe admission queue holds requests beyond the slots.\n",
            "test.txt": "vLLM batches requests continuously; 知识库 text too.".encode()}
"""Its files: the names the schema's examples use for delete_docs and update_docs."""
KB_FILE = "test.txt"
"""The file a pinned ``file_name`` names (download_doc, search_docs)."""
EMBED_MODEL = "chatfleet-sim/hashed-embedding"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, response_headers_conformance]
KB_NAME_FIELDS = ("knowledge_base_name", "kb_name")


@dataclass
class FuzzReport:
    """What a run sent and got: statuses of the operations' answers (undeclared-method probes
    apart), and each failed check with its curl command."""

    cases: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    by_operation: dict[str, Counter[int]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    method_probes: Counter[int] = field(default_factory=Counter)
    seconds: float = 0.0

    def summary(self) -> str:
        statuses = " ".join(f"{code}:{n}" for code, n in sorted(self.statuses.items()))
        return (f"schemathesis fuzz: {self.cases} cases over {len(self.by_operation)} operations "
                f"in {self.seconds:.0f} s; statuses {statuses}; 405 for undeclared methods: "
                f"{self.method_probes[405]}/{sum(self.method_probes.values())}; "
                f"failures: {len(self.failures)}")


@dataclass(frozen=True, kw_only=True)
class Pins:
    """Which generated values a case gets replaced with the served ones."""

    model: bool
    kb: bool
    max_tokens: int


COVERAGE_PINS = Pins(model=True, kb=False, max_tokens=4)
"""Coverage cases vary one value at a time around a valid case: the model is the served one, the
knowledge-base names stay as varied (their base value is the schema's example, ``samples``)."""


def _named(value: object) -> bool:
    """Whether a generated name may be replaced: a non-empty string (an empty, wrongly typed or
    missing name is the point of its case)."""
    return isinstance(value, str) and value != ""


def _pin(case: schemathesis.Case, pins: Pins) -> None:
    """Give the case served names where ``pins`` say so, and a small ``max_tokens``."""
    path = case.path_parameters or {}
    if pins.kb and _named(path.get("param")):
        case.path_parameters = {**path, "mode": "local_kb", "param": KB}
    query = case.query if isinstance(case.query, dict) else {}
    if pins.kb and _named(query.get("knowledge_base_name")):
        query["knowledge_base_name"] = KB
    if pins.kb and _named(query.get("file_name")):
        query["file_name"] = KB_FILE
    body = case.body
    if isinstance(body, str) and case.operation.path == "/knowledge_base/delete_knowledge_base":
        if pins.kb and _named(body):
            case.body = KB
        return
    if not isinstance(body, dict):
        return
    if pins.model and _named(body.get("model")):
        body["model"] = EMBED_MODEL if case.operation.path == "/v1/embeddings" else SIM_MODEL
    for name in KB_NAME_FIELDS:
        if pins.kb and _named(body.get(name)):
            body[name] = KB
    if pins.kb and _named(body.get("file_name")):
        body["file_name"] = KB_FILE
    asked = body.get("max_tokens")
    default = asked is None or (asked == 0 and type(asked) is int  # 0: the default on Chatchat's
                                and not case.operation.path.startswith("/v1/"))
    if ("max_tokens" in _body_properties(case.operation) and default
            and body.get("max_completion_tokens") is None):
        body["max_tokens"] = pins.max_tokens


def _body_properties(operation: schemathesis.APIOperation) -> set[str]:
    names: set[str] = set()
    for body in operation.body:
        schema = body.resolved_schema or {}
        names |= set(schema.get("properties", {}))
    return names


def _seed_kb(base_url: str) -> None:
    """Create the examples' knowledge base with its files, if a fuzzed delete removed them."""
    with httpx.Client(base_url=base_url, timeout=60) as api:
        api.post("/knowledge_base/create_knowledge_base", json={"knowledge_base_name": KB})
        listed = api.get("/knowledge_base/list_files", params={"knowledge_base_name": KB}).json()
        have = {record["file_name"] for record in listed.get("data") or []}
        missing = [(name, content) for name, content in KB_FILES.items() if name not in have]
        if missing:
            answer = api.post("/knowledge_base/upload_docs", data={"knowledge_base_name": KB},
                              files=[("files", item) for item in missing]).json()
            assert answer["code"] == 200 and not answer["data"]["failed_files"], answer


class _Fuzzer:
    """Sends cases to the gateway and records what came back (``report``)."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.schema = schemathesis.openapi.from_url(base_url + "/openapi.json",
                                                    config=schemathesis.Config())
        self.schema.config.update(base_url=base_url)
        self.session = requests.Session()
        self.report = FuzzReport()

    def run(self, case: schemathesis.Case, operation: schemathesis.APIOperation) -> None:
        response = case.call(session=self.session, timeout=60)
        report = self.report
        report.cases += 1
        if case.method.upper() != operation.method.upper():  # a coverage probe: undeclared method
            report.method_probes[response.status_code] += 1
            if response.status_code != 405:
                report.failures.append(f"{case.method} {case.formatted_path}: "
                                       f"{response.status_code}, not 405, for an undeclared method")
            return
        report.statuses[response.status_code] += 1
        report.by_operation.setdefault(operation.label, Counter())[response.status_code] += 1
        try:
            case.validate_response(response, checks=CHECKS)
        except FailureGroup as exc:
            report.failures.append(f"{operation.label}:\n{exc}")

    def coverage(self, operation: schemathesis.APIOperation) -> None:
        """Schemathesis' deterministic coverage cases, valid and invalid."""
        config = self.schema.config.generation_for(operation=operation, phase="coverage")
        for case in self.schema.iter_coverage_cases(
                operation, generation_modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                generation_config=config):
            _pin(case, COVERAGE_PINS)
            self.run(case, operation)

    def generated(self, operation: schemathesis.APIOperation, examples: int) -> None:
        """``examples`` Hypothesis cases, derandomized: valid ones and (where the operation takes
        any input) invalid ones, each with drawn pins."""
        modes = [GenerationMode.POSITIVE]
        if operation.body or any(True for _ in operation.iter_parameters()):
            modes.append(GenerationMode.NEGATIVE)
        cases = st.one_of([operation.as_strategy(generation_mode=mode) for mode in modes])
        pins = st.builds(Pins, model=st.booleans(), kb=st.booleans(),
                         max_tokens=st.integers(min_value=1, max_value=16))

        @settings(max_examples=examples, derandomize=True, database=None, deadline=None,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=cases, pinned=pins)
        def send(case: schemathesis.Case, pinned: Pins) -> None:
            _pin(case, pinned)
            self.run(case, operation)

        send()


def fuzz(base_url: str, *, examples: int = FUZZ_EXAMPLES) -> FuzzReport:
    """Run every operation's coverage and generated cases against the gateway at ``base_url``."""
    fuzzer = _Fuzzer(base_url)
    started = time.perf_counter()
    for result in fuzzer.schema.get_all_operations():
        operation = result.ok()
        _seed_kb(base_url)
        fuzzer.coverage(operation)
        fuzzer.generated(operation, examples)
    fuzzer.report.seconds = time.perf_counter() - started
    return fuzzer.report


@pytest.fixture(scope="module")
def fuzzed_gateway() -> Iterator[Server]:
    sim = start_engine_sim()
    # Small body limits, so that large generated bodies meet the 413s too. start_gateway puts the
    # knowledge bases in a fresh temporary directory.
    gateway = start_gateway({
        **upstream_env(sim), "CHATFLEET_KB__EMBEDDINGS__URL": sim.v1,
        "CHATFLEET_KB__EMBEDDINGS__MODEL": EMBED_MODEL, "CHATFLEET_LIMITS__MAX_TOKENS": "16",
        "CHATFLEET_LIMITS__MAX_BODY_BYTES": str(64 << 10),
        "CHATFLEET_KB__MAX_UPLOAD_BYTES": str(256 << 10)})
    yield gateway
    gateway.proc.terminate()
    sim.proc.terminate()


def test_every_operation_answers_generated_requests_as_its_schema_declares(
        fuzzed_gateway: Server) -> None:
    report = fuzz(fuzzed_gateway.url)
    print(report.summary())
    assert report.cases >= MIN_CASES, report.summary()
    server_errors = {code: n for code, n in report.statuses.items() if code >= 500}
    assert not server_errors, report.summary()
    assert not report.failures, "\n\n".join(report.failures[:20]) + "\n\n" + report.summary()
