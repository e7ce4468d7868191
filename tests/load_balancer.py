"""Debian's nginx as a real load balancer in front of gateway replicas: started from a temp prefix on a free
loopback port (with the benchmark's Nginx), its access log read back to see which replica served what."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from bench.upstream import Nginx
from tests.harness import free_port

TEMPLATE = Path(__file__).with_name("load_balancer.conf.template")
# A replica that failed is left alone this long, then tried with one request again.
FAIL_TIMEOUT = 10


@dataclass(frozen=True)
class Served:
    """One line of the access log: the status the client got, and each replica tried, with its answer."""

    at: float  # the Unix time the request ended
    status: int
    tried: tuple[str, ...]  # "127.0.0.1:port", in order
    answers: tuple[str, ...]  # each one's status, or "502" for a connection that failed
    uri: str


class LoadBalancer(Nginx):
    def __init__(self, prefix: Path, ports: list[int]) -> None:
        super().__init__(prefix, free_port(), None)
        self.ports = ports

    @property
    def base_url(self) -> str:
        return self.base

    def render(self) -> Path:
        self.prefix.mkdir(parents=True, exist_ok=True)
        servers = "\n".join(
            f"        server 127.0.0.1:{port} max_fails=1 fail_timeout={FAIL_TIMEOUT}s;" for port in self.ports
        )
        values = {"user": "user root;" if os.geteuid() == 0 else "", "prefix": str(self.prefix), "port": str(self.port)}
        return self._write(TEMPLATE, {**values, "servers": servers})

    def served(self) -> list[Served]:
        lines = []
        path = self.prefix / "access.log"
        for line in path.read_text().splitlines() if path.exists() else []:
            at, status, tried, answers, uri = line.split("|", 4)
            lines.append(Served(float(at), int(status), _split(tried), _split(answers), uri))
        return lines


def _split(field: str) -> tuple[str, ...]:
    # nginx separates the servers tried with ", " (and a switch to another upstream group with " : ").
    return tuple(part.strip() for part in field.replace(" : ", ", ").split(", ") if part.strip())
