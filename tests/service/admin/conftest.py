"""The ledger tests' databases (SQLite in a file, a real PostgreSQL) and the tenancy tests' real Redis."""

from tests.service.ledger.conftest import ledger_url, postgres, postgres_url
from tests.service.tenancy.conftest import redis_server

__all__ = ["ledger_url", "postgres", "postgres_url", "redis_server"]
