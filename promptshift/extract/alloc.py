"""glibc allocator settings for extraction on the CPU.

A forward pass on the CPU allocates and frees many temporaries of 1-30 MB (MLP
activations, attention probabilities, logit-lens chunks). With glibc's defaults the free
top of the heap is handed back to the kernel as soon as it exceeds twice the (adaptive)
mmap threshold, so the next pass faults the same pages in again and the kernel zeroes
them: ~400,000 page faults (1.6 GB) per extraction of the default sweep's first 4 user
prompts. Raising the mmap threshold to its largest value (32 MiB), growing the heap in
steps of 256 MiB and keeping up to 2 GiB of free heap makes those temporaries reuse
memory already mapped: the faults drop to almost none and extraction runs ~10% faster
(docs/BENCHMARKS.md, "Allocator"). The cost is that freed memory stays with the process
until it exits. Any process gets the same with glibc's own environment variables
(MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, MALLOC_TOP_PAD_); when the user sets
one of them, or PROMPTSHIFT_MALLOC=0, the allocator is left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
SETTINGS = (
    (_M_MMAP_THRESHOLD, 32 << 20),  # glibc's upper limit for this setting on 64-bit systems
    (_M_TOP_PAD, 256 << 20),
    (_M_TRIM_THRESHOLD, (1 << 31) - 1),  # mallopt takes an int
)
_USER_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")

_state: bool | None = None


def tune_glibc_malloc() -> bool:
    """Apply the settings once per process; True when they are in effect. Does nothing
    (False) off Linux, without glibc's mallopt, when the user set glibc's own variables,
    or with PROMPTSHIFT_MALLOC=0."""
    global _state
    if _state is not None:
        return _state
    _state = False
    if not sys.platform.startswith("linux") or os.environ.get("PROMPTSHIFT_MALLOC", "1") == "0":
        return False
    if any(k in os.environ for k in _USER_VARS):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _state = all(mallopt(param, value) == 1 for param, value in SETTINGS)
    return _state
