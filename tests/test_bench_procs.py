"""bench/procs.py's `pinned`: every thread of a process tree goes to the CPUs asked for, and back after."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from bench.procs import pinned

# A parent with a thread of its own, and a child process: the tree `pinned` walks. A line on its stdin
# starts one more thread, which inherits the affinity it is started with.
_TREE = """
import subprocess, sys, threading, time
threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(child.pid, flush=True)
sys.stdin.readline()
threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
print("started", flush=True)
time.sleep(60)
"""


def _threads(pids: list[int]) -> dict[int, set[int]]:
    return {int(t): os.sched_getaffinity(int(t)) for pid in pids for t in os.listdir(f"/proc/{pid}/task")}


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning needs two CPUs")
def test_every_thread_of_the_tree_is_pinned_then_let_go() -> None:
    everywhere = os.sched_getaffinity(0)
    one = {min(everywhere)}
    parent = subprocess.Popen([sys.executable, "-c", _TREE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    child = 0
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        time.sleep(0.2)
        tree = [parent.pid, child]
        assert len(_threads([parent.pid])) >= 2  # the thread is there
        with pinned([parent.pid], one):
            before_start = _threads(tree)
            assert parent.stdin is not None
            parent.stdin.write("go\n")
            parent.stdin.flush()
            assert parent.stdout.readline() == "started\n"
            inside = _threads(tree)
        after = _threads(tree)
        assert len(inside) == len(before_start) + 1  # the thread started inside the block
        assert all(cpus == one for cpus in inside.values()), inside
        # Every thread goes back, the new one included: to what its process's main thread had.
        assert after.keys() == inside.keys() and all(cpus == everywhere for cpus in after.values()), after
        with pinned([parent.pid], None):  # nothing asked: nothing changes
            assert all(cpus == everywhere for cpus in _threads(tree).values())
    finally:
        if child:
            os.kill(child, signal.SIGKILL)
        parent.kill()
        parent.wait()
