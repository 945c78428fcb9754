"""Every knowledge-store kind, made for one test: the ``store`` fixture (tests/integration/conftest.py)
runs a test on each, and tests that need a second instance of a kind call the factory."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from chatfleet.rag.stores.base import KnowledgeStore
from chatfleet.rag.stores.local import LocalStore
from chatfleet.rag.stores.pgvector import PgVectorStore

__all__ = ["STORES", "StoreFactory"]

StoreFactory = Callable[[pytest.FixtureRequest], KnowledgeStore]

STORES: dict[str, StoreFactory] = {
    "pgvector": lambda request: PgVectorStore(request.getfixturevalue("pg_dsn")),
    "local": lambda request: LocalStore(request.getfixturevalue("tmp_path") / "kb"),
}
"""pgvector on a database of its own on the session's PostgreSQL (``pg_dsn``); local in tmp_path."""
