#!/usr/bin/env python
"""The price of writing the store, measured robustly on a noisy machine: one process
extracts the same sweep to a zarr store and to nowhere (the null store), alternating, and
reports each pair of runs' overhead and the median. Model loading and imports happen once,
before timing.

    python scripts/bench_store.py --max-user 12 --reps 4
    python scripts/bench_store.py --max-user 12 --reps 4 --page-cache   # also zarr without O_DIRECT

With ``--page-cache`` a third mode writes the zarr store through the page cache
(``PROMPTSHIFT_DIRECT_IO=0``), in the same alternation, to price direct I/O side by side.
With ``--padded`` another mode extracts to nowhere with padded batches
(``ExtractConfig(packing=False)``), to price packed batches the same way.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sweep", default="default")
    ap.add_argument("--max-user", type=int, default=12)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--tmp", default=None, help="directory for the temporary store")
    ap.add_argument("--page-cache", action="store_true", help="add zarr written through the page cache")
    ap.add_argument("--padded", action="store_true", help="add nowhere with padded (not packed) batches")
    ap.add_argument("--nowhere-only", action="store_true", help="leave out the zarr mode (with --padded)")
    args = ap.parse_args(argv)

    import zarr  # noqa: F401 -- a one-time cost per process, not per extraction

    from promptshift.extract.worker import ExtractConfig, fill_shard
    from promptshift.models import load_model
    from promptshift.sweep.config import load_sweep
    from promptshift.sweep.plan import load_plan_inputs

    s = load_sweep(args.sweep, max_new_tokens=0)
    s.user_prompts = s.user_prompts[: args.max_user]
    s.__post_init__()
    tok, _ = load_plan_inputs(s)
    model = load_model(s.model)
    with tempfile.TemporaryDirectory(dir=args.tmp) as d:
        path = Path(d) / "bench.zarr"
        cfg = {"nowhere": lambda: ExtractConfig(store=None, format="null", progress=False, selfcheck=False),
               "zarr": lambda: ExtractConfig(store=str(path), overwrite=True, progress=False, selfcheck=False)}
        modes = ["nowhere"] if args.nowhere_only else ["nowhere", "zarr"]
        if args.padded:
            cfg["nowhere (padded)"] = lambda: ExtractConfig(store=None, format="null", progress=False,
                                                            selfcheck=False, packing=False)
            modes.append("nowhere (padded)")
        if args.page_cache:
            cfg["zarr (page cache)"] = cfg["zarr"]
            modes.append("zarr (page cache)")
        fill_shard(s, cfg["nowhere"](), model=model, tok=tok)  # warm-up
        times = {k: [] for k in modes}
        for r in range(args.reps):
            for k in modes if r % 2 == 0 else modes[::-1]:
                os.environ["PROMPTSHIFT_DIRECT_IO"] = "0" if k == "zarr (page cache)" else "1"
                t = time.perf_counter()
                fill_shard(s, cfg[k](), model=model, tok=tok)
                times[k].append(time.perf_counter() - t)
                shutil.rmtree(path, ignore_errors=True)
        os.environ.pop("PROMPTSHIFT_DIRECT_IO", None)
    pairs = len(s.system_prompts) * len(s.user_prompts)
    print(f"{pairs} pairs, {args.reps} runs each, alternating")
    for k, v in times.items():
        print(f"{k}: median {statistics.median(v):.2f} s  runs {[round(x, 2) for x in v]}")
    for k in modes[1:]:
        over = [z / n - 1 for z, n in zip(times[k], times["nowhere"])]
        print(f"{k} vs nowhere, per pair of runs: {[f'{100 * x:+.1f}%' for x in over]}; "
              f"median {100 * statistics.median(over):+.1f}%")


if __name__ == "__main__":
    main()
