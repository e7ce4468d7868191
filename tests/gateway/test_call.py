"""Generated request ids: uuid4-shaped, and unique within a process and across processes."""

from __future__ import annotations

import re
import subprocess
import sys

from gateway.call import new_request_id

HEX_ID = re.compile(r"[0-9a-f]{32}")


def test_ids_are_32_hex_digits_and_never_repeat_in_a_process() -> None:
    ids = [new_request_id() for _ in range(10_000)]
    assert all(HEX_ID.fullmatch(i) for i in ids)
    assert len(set(ids)) == len(ids)


def test_each_process_draws_its_own_ids() -> None:
    """Workers are separate processes: their ids must not collide even though each counts from 1."""
    script = "from gateway.call import new_request_id; print(new_request_id())"
    firsts = {
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.strip()
        for _ in range(3)
    }
    assert len(firsts) == 3
    assert all(HEX_ID.fullmatch(i) for i in firsts)
