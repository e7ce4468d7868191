"""A real PostgreSQL server for tests: Debian's binaries, a fresh cluster in a temporary directory, run as an
unprivileged user (postgres refuses to run as root) on a loopback port."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from tests.harness import free_port


def _bin() -> Path:
    """$POSTGRES_BIN, else the newest of Debian's /usr/lib/postgresql/<version>/bin."""
    if os.environ.get("POSTGRES_BIN"):
        return Path(os.environ["POSTGRES_BIN"])
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0
    )
    return versions[-1] if versions else Path("/usr/lib/postgresql/15/bin")


BIN = _bin()
SUPERUSER = "postgres"


def binaries_present() -> bool:
    return (BIN / "initdb").exists() and (BIN / "postgres").exists()


class PostgresServer:
    def __init__(self) -> None:
        if not binaries_present():
            pytest.skip(f"PostgreSQL binaries not found in {BIN} (Debian's postgresql package; .ci/run installs it)")
        self.port = free_port()
        # Not under pytest's tmp_path: its parents are root's, mode 0700, closed to the server's user.
        self.dir = Path(tempfile.mkdtemp(prefix="llm-gateway-pg-"))
        self.data = self.dir / "data"
        self.log_path = self.dir / "postgres.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._user: dict[str, Any] = {}
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            os.chown(self.dir, nobody.pw_uid, nobody.pw_gid)
            self._user = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
        subprocess.run(
            [BIN / "initdb", "-D", self.data, "-U", SUPERUSER, "-A", "trust", "-E", "UTF8", "--no-sync"],
            check=True,
            capture_output=True,
            cwd=self.dir,
            **self._user,
        )

    @property
    def url(self) -> str:
        return self.url_for("postgres")

    def url_for(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def start(self) -> PostgresServer:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [BIN / "postgres", "-D", self.data, "-p", str(self.port), "-k", self.dir, "-h", "127.0.0.1",
             "-c", "fsync=off", "-c", "max_connections=50"],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
            **self._user,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not self._accepts():
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"postgres did not start:\n{self.log()}")
            time.sleep(0.1)
        return self

    def _accepts(self) -> bool:
        done = subprocess.run(
            [BIN / "pg_isready", "-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER, "-t", "1"],
            capture_output=True,
        )
        return done.returncode == 0

    def stop(self) -> None:
        """A fast shutdown: connections are cut, as when the database server goes away."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # PostgreSQL's "fast" shutdown
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None

    def psql(self, sql: str, database: str = "postgres") -> str:
        done = subprocess.run(
            [BIN / "psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER, "-d", database, "-Atc", sql],
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout.strip()

    def create_database(self, name: str) -> str:
        self.psql(f"CREATE DATABASE {name}")
        return self.url_for(name)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
