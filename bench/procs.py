"""Process helpers: ports, CPU pinning, and CPU time and RSS of a process tree read from /proc."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pin(cpus: set[int] | None) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)


def _threads(roots: list[int]) -> Iterator[tuple[int, int]]:
    """(pid, thread id) of every thread of the process trees under `roots`, as they are now."""
    for root in roots:
        for pid in descendants(root):
            with contextlib.suppress(OSError):  # a process that has ended meanwhile
                for tid in os.listdir(f"/proc/{pid}/task"):
                    yield pid, int(tid)


@contextlib.contextmanager
def pinned(roots: list[int], cpus: set[int] | None) -> Iterator[None]:
    """Every thread of the process trees under `roots` on `cpus` for the block, then back on the CPUs each
    had (threads started meanwhile inherit their creator's). None or empty: nothing changes."""
    if not cpus:
        yield
        return
    before: dict[int, set[int]] = {}
    for _, tid in _threads(roots):
        with contextlib.suppress(OSError):  # a thread that has ended meanwhile
            before[tid] = os.sched_getaffinity(tid)
            os.sched_setaffinity(tid, cpus)
    try:
        yield
    finally:
        # Threads started inside the block (grpc's EventEngine pool grows on demand, the ledger's writer
        # starts with the first record) inherited `cpus`: they go back to what their process's main
        # thread had, or later scenarios would run with them still beside the load generator.
        for pid, tid in _threads(roots):
            had = before.get(tid, before.get(pid))
            if had is not None:
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(tid, had)


def wait_port(port: int, process: subprocess.Popen[bytes], log: Path | None = None, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log is not None and log.exists() else ""
            raise RuntimeError(f"{process.args!r} exited with {process.returncode} before listening:\n{tail}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout:.0f}s: {process.args!r}")


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def descendants(root: int) -> list[int]:
    """`root` and every live process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        if _stat(pid) is not None:
            tree.append(pid)
            todo.extend(children.get(pid, ()))
    return sorted(tree)


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, all its threads, in seconds (0 once it is gone)."""
    fields = _stat(pid)
    if fields is None:
        return 0.0
    # After the ')' split: index 11 is utime, 12 stime (fields 14 and 15 of proc(5)).
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_mb(pid: int) -> float:
    try:
        resident = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except OSError:
        return 0.0
    return resident * PAGE / 1e6


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


@dataclass
class CpuSample:
    """CPU seconds per pid of a set of process trees at one moment."""

    per_pid: dict[int, float]

    @classmethod
    def take(cls, roots: list[int]) -> CpuSample:
        return cls({pid: cpu_seconds(pid) for root in roots for pid in descendants(root)})

    def since(self, before: CpuSample) -> float:
        """CPU seconds spent between two samples; a process that appeared in between counts from zero."""
        return sum(max(0.0, now - before.per_pid.get(pid, 0.0)) for pid, now in self.per_pid.items())


def rss_table(roots: list[int]) -> list[dict[str, object]]:
    return [
        {"pid": pid, "rss_mb": round(rss_mb(pid), 1), "cmd": cmdline(pid)[-80:]}
        for root in roots
        for pid in descendants(root)
    ]
