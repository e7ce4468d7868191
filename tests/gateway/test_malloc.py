"""gateway/malloc.py in a fresh interpreter: after a large free has raised glibc's thresholds, large blocks
interleaved with small ones that outlive them are given back once freed, with the fix; they stay without."""

from __future__ import annotations

import subprocess
import sys

import pytest

_SCENARIO = """
import sys
from gateway.malloc import fix_thresholds

fixed = fix_thresholds() if sys.argv[1] == "fix" else None

def rss_mb():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 1e6

spike = bytearray(4 << 20)  # a large block freed: glibc raises its thresholds to its size
del spike
large, small = [], []
for _ in range(100):  # 50 MB in large blocks, each followed by a small one that outlives it
    large.append(bytearray(500_000))
    small.append(bytearray(2_000))
busy = rss_mb()
large.clear()
print(fixed, round(busy - rss_mb(), 1))
"""


def _freed_mb(mode: str) -> tuple[str, float]:
    done = subprocess.run([sys.executable, "-c", _SCENARIO, mode], capture_output=True, text=True, check=True)
    fixed, freed = done.stdout.split()
    return fixed, float(freed)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_large_blocks_go_back_to_the_system_once_freed() -> None:
    fixed, freed = _freed_mb("fix")
    if fixed != "True":
        pytest.skip("this libc does not take mallopt's thresholds (not glibc)")
    assert freed > 40, f"only {freed} MB of 50 went back"
    # The same without the fix keeps them: what the fix is for (glibc's dynamic threshold).
    _, kept = _freed_mb("none")
    assert kept < 10, f"{kept} MB went back without the fix: glibc no longer raises its thresholds"
