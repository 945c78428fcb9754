"""Integration fixtures: one real vLLM (CPU) server per test session; PostgreSQL; knowledge stores.

Tests that use ``vllm_server`` are marked ``vllm`` automatically, so ``-m "not vllm"`` skips
them (and the ~40 s start and ~3 GB it costs).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from chatfleet.rag.stores.base import KnowledgeStore
from tests.support.postgres import PostgresServer, running_postgres
from tests.support.stores import STORES
from tests.support.vllm_cpu import VLLMServer, ensure_vllm_env


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if {"vllm_server", "vllm_env"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.vllm)


@pytest.fixture(scope="session")
def vllm_env() -> tuple[Path, Path]:
    """``(python, model_dir)`` for starting further VLLMServers (e.g. one that is not ready yet)."""
    return ensure_vllm_env()


@pytest.fixture(scope="session")
def vllm_server(vllm_env: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLMServer]:
    """A started vLLM serving "tiny", shared by the session; terminated at its end.

    It runs at most 4 requests at once (``max_num_seqs``) so gateway tests can show the engine bound.
    """
    python, model_dir = vllm_env
    log_path = tmp_path_factory.mktemp("vllm") / "vllm.log"
    with VLLMServer(python, model_dir, max_num_seqs=4, log_path=log_path) as server:
        yield server


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A started PostgreSQL with pgvector on 127.0.0.1, shared by the session; stopped at its end."""
    with running_postgres() as server:
        yield server


@pytest.fixture
def pg_dsn(postgres_server: PostgresServer) -> Iterator[str]:
    """The DSN of a new, empty database, dropped after the test (open connections and all)."""
    name = f"test_{uuid.uuid4().hex[:16]}"
    yield postgres_server.create_database(name)
    postgres_server.drop_database(name)


@pytest.fixture(params=list(STORES))
async def store(request: pytest.FixtureRequest) -> AsyncIterator[KnowledgeStore]:
    """A started, empty store of each kind (pgvector on a database of its own); closed after."""
    instance = STORES[request.param](request)
    await instance.start()
    yield instance
    await instance.aclose()
