from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service.ledger.postgres_server import PostgresServer

_databases = itertools.count(1)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer().start()
    yield server
    server.remove()


@pytest.fixture
def postgres_url(postgres: PostgresServer) -> str:
    """A fresh, empty database on the session's server."""
    if postgres.process is None:  # a test stopped it and failed before starting it again
        postgres.start()
    return postgres.create_database(f"ledger_{next(_databases)}")


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each backend in turn, empty: the same tests run against both."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/usage.db"
    url: str = request.getfixturevalue("postgres_url")
    return url
