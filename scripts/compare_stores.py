"""Are two stores byte-identical, array by array? (e.g. one made before a refactor, one after)

    python scripts/compare_stores.py STORE_A STORE_B

Compares every array of both stores (activations, attention statistics, logits, the plan,
completion records, causal results): same names, shapes, dtypes and bytes. Attributes that
describe a run rather than its results (times, library versions, host) are not compared;
the plan's content is, through its arrays. Prints one line per array that differs and a
summary; exit status 1 when anything differs.
"""

from __future__ import annotations

import sys

import numpy as np

from promptshift.store import open_store


def compare(a_path: str, b_path: str) -> int:
    a, b = open_store(a_path), open_store(b_path)
    na, nb = set(a.backend.names()), set(b.backend.names())
    bad = 0
    for name in sorted(na ^ nb):
        print(f"{name}: only in {'A' if name in na else 'B'}")
        bad += 1
    same = total = 0
    for name in sorted(na & nb):
        x, y = np.asarray(a.backend.array(name)[...]), np.asarray(b.backend.array(name)[...])
        total += x.nbytes
        if x.dtype != y.dtype or x.shape != y.shape:
            print(f"{name}: {x.dtype}{x.shape} vs {y.dtype}{y.shape}")
            bad += 1
        elif x.tobytes() != y.tobytes():
            diff = np.frombuffer(x.tobytes(), np.uint8) != np.frombuffer(y.tobytes(), np.uint8)
            print(f"{name}: {int(diff.sum())} of {x.nbytes} bytes differ")
            bad += 1
        else:
            same += 1
    print(f"{same} of {len(na | nb)} arrays byte-identical ({total / 2**20:.1f} MiB compared)")
    return 1 if bad else 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(compare(sys.argv[1], sys.argv[2]))
