"""A gateway of several worker processes, in either process mode, with signals sent by hand.

"inprocess": one `--workers N` process, gRPC service and facade in each worker;
"remote":    a `--grpc-only --workers N` service and a `--grpc-target` `--workers N` facade.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.harness import GatewayProcess

MODES = ("inprocess", "remote")


@dataclass
class WorkerStack:
    mode: str
    workers: int
    facade: GatewayProcess  # serves REST
    service: GatewayProcess  # serves gRPC (the same process in-process)

    @property
    def processes(self) -> list[GatewayProcess]:
        return [self.service] if self.facade is self.service else [self.service, self.facade]

    @property
    def base_url(self) -> str:
        return self.facade.base_url

    def signal(self, signum: int = signal.SIGTERM) -> None:
        """The signal to every process at once, as Kubernetes sends it to every container of a pod."""
        for process in self.processes:
            assert process.process is not None
            process.process.send_signal(signum)

    def wait(self, timeout: float = 60) -> list[int]:
        codes = []
        for process in self.processes:
            assert process.process is not None
            codes.append(process.process.wait(timeout))
        return codes

    def count_logs(self, msg: str) -> int:
        return sum(line.get("msg") == msg for p in self.processes for line in p.log_lines())

    def wait_logs(self, msg: str, count: int, timeout: float = 20) -> None:
        """Until `count` lines say `msg`, over every process of the stack."""
        self.facade.wait_log(lambda _: self.count_logs(msg) >= count, timeout)

    def health(self, service: str = "") -> int:
        with grpc.insecure_channel(self.service.grpc_address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return int(reply.status)

    def kill(self) -> None:
        for process in self.processes:
            if process.process is not None and process.process.poll() is None:
                process.process.kill()
                process.process.wait(5)


def start_workers(
    mode: str, config: dict[str, Any] | None, workdir: Path, workers: int = 2, config_file: Path | None = None
) -> WorkerStack:
    """Start the stack and wait until every worker of every process listens. With `config_file`, every
    process reads that one file (as containers mounting one ConfigMap), else each gets a copy of `config`."""
    many = ("--workers", str(workers), *(("--config", str(config_file)) if config_file is not None else ()))
    if mode == "inprocess":
        both = GatewayProcess(config, workdir, args=many).start()
        stack = WorkerStack(mode, workers, both, both)
    else:
        service = GatewayProcess(config, workdir, args=("--grpc-only", *many)).start()
        try:
            facade = GatewayProcess(config, workdir, args=("--grpc-target", service.grpc_address, *many))
            facade.start(wait_grpc=False)
        except BaseException:
            service.stop()
            raise
        stack = WorkerStack(mode, workers, facade, service)
    try:
        stack.wait_logs("grpc listening", workers)
        stack.wait_logs("rest listening", workers)
    except BaseException:
        stack.kill()
        raise
    return stack
