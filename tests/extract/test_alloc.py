"""The CPU allocator settings: freed temporaries are reused instead of faulted in again."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc allocator settings")

_CHILD = r"""
import resource, sys
import numpy as np
from promptshift.extract.alloc import tune_glibc_malloc
on = tune_glibc_malloc()
def round_():  # like one forward pass: several 8 MB temporaries alive together, then freed
    xs = [np.ones(1 << 20) for _ in range(6)]
    return sum(float(x[-1]) for x in xs)
round_()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    round_()
print(on, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def _child(**env):
    e = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "PROMPTSHIFT_MALLOC"}
    e.update(env)
    out = subprocess.run([sys.executable, "-c", _CHILD], env=e, capture_output=True, text=True, check=True).stdout
    on, faults = out.split()
    return on == "True", int(faults)


def test_tuned_allocator_reuses_freed_memory():
    on, tuned = _child()
    off, default = _child(PROMPTSHIFT_MALLOC="0")
    assert on and not off
    # 10 rounds x 6 x 8 MB = 480 MB of temporaries: 2,048 pages each if faulted in again
    assert default > 10 * 2048, default  # glibc's defaults hand the heap back and fault it in again
    assert tuned < default / 20, (tuned, default)


def test_user_settings_are_left_alone():
    on, _ = _child(MALLOC_TRIM_THRESHOLD_="131072")
    assert not on
