"""Compare the causal results of two stores made from the same extraction (e.g. one by the
previous commit, one by this one), array by array.

    python scripts/compare_causal.py OLD_STORE NEW_STORE

Prints, per analysis and array, the largest absolute difference, the largest difference
relative to the array's largest magnitude (the convention of scripts/bench_extract.py),
and for KL arrays the largest difference relative to the value itself where it exceeds
1e-4 nats; the text metadata (phrases, tokens, users, replies) must match exactly. Exit
status 1 when shapes or metadata differ.
"""

from __future__ import annotations

import sys

import numpy as np

from promptshift.store import open_store

# meta keys that describe a run rather than its results
_RUN_KEYS = {"seconds", "weights_sha256"}


def compare(a_path: str, b_path: str) -> int:
    a, b = open_store(a_path), open_store(b_path)
    bad = 0
    names = sorted(set(a.causal_analyses()) | set(b.causal_analyses()))
    print(f"{'analysis':<10} {'array':<14} {'shape':<16} {'max |diff|':>11} {'max rel':>9} {'max rel (KL>1e-4)':>18}")
    for name in names:
        if name not in a.causal_analyses() or name not in b.causal_analyses():
            print(f"{name}: only in one store")
            bad = 1
            continue
        xa, ma = a.read_causal(name)
        xb, mb = b.read_causal(name)
        ma = {k: v for k, v in ma.items() if k not in _RUN_KEYS}
        mb = {k: v for k, v in mb.items() if k not in _RUN_KEYS}
        if ma != mb:
            keys = [k for k in sorted(set(ma) | set(mb)) if ma.get(k) != mb.get(k)]
            print(f"{name}: metadata differs in {keys}")
            bad = 1
        for arr in sorted(set(xa) | set(xb)):
            x, y = xa.get(arr), xb.get(arr)
            if x is None or y is None or x.shape != y.shape:
                print(f"{name:<10} {arr:<14} shapes differ: {getattr(x, 'shape', None)} vs {getattr(y, 'shape', None)}")
                bad = 1
                continue
            x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
            if not np.array_equal(np.isnan(x), np.isnan(y)):
                print(f"{name:<10} {arr:<14} NaN in different places")
                bad = 1
                continue
            d = np.nan_to_num(np.abs(x - y))
            scale = float(np.nanmax(np.abs(y))) if y.size and not np.isnan(y).all() else 0.0
            big = np.abs(y) > 1e-4
            rel_kl = (float(np.max(d[big] / np.abs(y[big]))) if arr.startswith("kl") and big.any() else float("nan"))
            print(f"{name:<10} {arr:<14} {str(x.shape):<16} {d.max() if d.size else 0:>11.3g} "
                  f"{(d.max() / scale) if scale else 0:>9.3g} {rel_kl:>18.3g}")
    return bad


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(compare(sys.argv[1], sys.argv[2]))
