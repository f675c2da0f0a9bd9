#!/usr/bin/env python
"""The price of keeping every prompt's whole next-token log-probabilities
(``full_logprobs``, the default): the same sweep is extracted to a zarr store with and
without them, alternating; each run's seconds and the stores' bytes are reported, plus the
time metrics spends on the exact KL / JS / logit cosine of every pair. Model loading and
imports happen once, before timing.

    python scripts/bench_full_logprobs.py --sweep quick --max-user 6 --reps 2
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sweep", default="quick")
    ap.add_argument("--max-user", type=int, default=6)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--tmp", default=None, help="directory for the temporary stores")
    args = ap.parse_args(argv)

    import numpy as np
    import zarr  # noqa: F401 -- a one-time cost per process, not per extraction

    from promptshift.extract.worker import ExtractConfig, fill_shard
    from promptshift.metrics.output import full_distances
    from promptshift.models import load_model
    from promptshift.sweep.config import load_sweep
    from promptshift.sweep.plan import load_plan_inputs

    base = load_sweep(args.sweep)
    base.user_prompts = base.user_prompts[: args.max_user]
    base.__post_init__()
    tok, _ = load_plan_inputs(base)
    model = load_model(base.model)
    sweeps = {on: dataclasses.replace(base, full_logprobs=on) for on in (True, False)}
    seconds: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory(dir=args.tmp) as d:
        paths = {on: Path(d) / f"full_{on}.zarr" for on in (True, False)}
        for _ in range(args.reps):
            for on in (True, False):
                t0 = time.perf_counter()
                fill_shard(sweeps[on], ExtractConfig(store=str(paths[on]), overwrite=True, progress=False,
                                                     selfcheck=False), model=model, tok=tok)
                seconds[on].append(time.perf_counter() - t0)
        st = __import__("promptshift.store", fromlist=["open"]).open(paths[True])
        full = np.asarray(st.array("logits_logprobs")[...])
        pairs = st.plan.pairs
        t0 = time.perf_counter()
        full_distances(full[pairs["variant"].to_numpy()], full[pairs["baseline"].to_numpy()])
        t_dist = time.perf_counter() - t0
        size = {on: _bytes(paths[on]) for on in (True, False)}
        lp_bytes = _bytes(paths[True] / "logits_logprobs")
        n_prompts, vocab = full.shape
    print(f"sweep {args.sweep}: {n_prompts} prompts, {len(pairs)} pairs, vocabulary {vocab}")
    for on in (True, False):
        print(f"full_logprobs={on!s:5}: extract {statistics.median(seconds[on]):.1f} s (median of "
              f"{args.reps}: {', '.join(f'{x:.1f}' for x in seconds[on])}), store {size[on] / 1e6:.1f} MB")
    print(f"logits_logprobs: {lp_bytes / 1e6:.1f} MB on disk ({lp_bytes / n_prompts / 1e3:.0f} kB per prompt; "
          f"{4 * vocab / 1e3:.0f} kB raw), {100 * (size[True] - size[False]) / size[False]:+.1f}% store size")
    print(f"exact KL/JS/logit cosine of {len(pairs)} pairs: {t_dist:.2f} s")


if __name__ == "__main__":
    main()
