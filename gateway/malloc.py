"""glibc's malloc, set once per worker to give large freed blocks back to the system.

glibc serves a block of 128 KiB or more with its own mmap, returned to the system when freed, but
the first such free raises that threshold to the block's size (up to 32 MiB), and the heap's trim
threshold to twice it. From then on a worker's large buffers (an embeddings response is megabytes of
JSON) come from the heap, where one small object allocated after them keeps the whole span from
being trimmed: a worker's RSS then stays at its busiest moment (bench: +5 MB after a pass of
embeddings at c=32). Setting both thresholds fixes them at glibc's defaults, which also turns the
raising off (mallopt(3)); the cost is an mmap and a munmap per large block.
"""

from __future__ import annotations

import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
THRESHOLD = 128 * 1024  # glibc's default for both


def fix_thresholds() -> bool:
    """True when glibc took both settings; False elsewhere (another libc, another system)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes  # 0.2 MB, once

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, THRESHOLD))
