"""Keep big buffers mapped across steps (train.keep_heap): glibc malloc tuning, once per process.

glibc serves every allocation of at least M_MMAP_THRESHOLD from its own mmap and unmaps it
on free, so a buffer of tens of MB allocated every step is page-faulted in afresh every
step (on a 2-core VM about 14 ms per 32 MB). Raising the threshold cannot help: glibc caps
it at 32 MiB on 64-bit (HEAP_MAX / 2). Instead M_MMAP_MAX = 0 forbids mmap'd chunks
altogether, so big buffers come from the heap (brk / arenas) and are reused, and a trim
threshold of 2 GiB - 1 keeps freed heap pages mapped instead of returning them to the
kernel at every free. The cost is resident memory: freed pages stay with the process
(peak RSS is what the process needed at its peak; benchmarks/moe_layer.py measures both).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

__all__ = ["keep_heap", "keep_heap_status"]

# From glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # an int: mallopt takes one

_status: str | None = None  # what keep_heap did in this process (None: not asked)


def keep_heap() -> str:
    """Apply the malloc settings once in this process; return "on" or why not (a
    one-line note: no glibc, or mallopt refused). Later calls return the first outcome."""
    global _status
    if _status is not None:
        return _status
    libc_name, _ = platform.libc_ver()
    if libc_name != "glibc":
        _status = f"unavailable: not glibc ({libc_name or platform.system()}); buffers are mapped per use"
        return _status
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError) as e:
        _status = f"unavailable: cannot load glibc's mallopt ({e})"
        return _status
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # Trim threshold first: setting it also pins glibc's dynamic mmap threshold.
    ok = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and mallopt(M_MMAP_MAX, 0) == 1
    _status = "on" if ok else "unavailable: mallopt refused M_TRIM_THRESHOLD / M_MMAP_MAX"
    return _status


def keep_heap_status() -> str:
    """"on", "off" (never asked in this process) or the note keep_heap returned."""
    return _status or "off"
