"""Scaling runs for scripts/bench_extract.py (``--scaling 50,500,5000``): promptshift
``extract`` into a zarr store on N synthetic prompt pairs, each N in its own process, to
see whether time per pair and peak memory stay flat as the sweep grows.

Synthetic sweeps keep the mix of work constant across sizes: 10 system prompts (fewer for
N < 10) x N/10 user prompts, so every size has the same share of baselines (one per user
prompt) and of shared system prefixes; texts are drawn with a fixed seed from a small
vocabulary, system prompts 12-60 words, user prompts 6-30 words.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time
from pathlib import Path

_WORDS = (
    "the a an of to in for on with as by at from about into over after before under between through during "
    "answer question explain describe list compare summarize write translate calculate estimate suggest review "
    "clear short long formal friendly careful precise detailed simple polite direct honest helpful expert "
    "history science music cooking travel money health law code data river mountain city planet language "
    "always never only every each many few some most several first last next best worst other same "
    "user assistant reply response tone style format sentence paragraph word number example step reason "
    "because although unless while when where which who how what why is are was were be been will would"
).split()


def _text(rng: random.Random, lo: int, hi: int, end: str) -> str:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(lo, hi))]
    return " ".join(words).capitalize() + end


def synthetic_sweep(n_pairs: int, model=None, seed: int = 0):
    from promptshift.sweep.config import SweepConfig, SystemPrompt, UserPrompt

    rng = random.Random(seed)
    n_sys = min(10, n_pairs)
    n_user = max(1, n_pairs // n_sys)
    systems = [SystemPrompt(name=f"sys{i:03d}", text="You are " + _text(rng, 12, 60, ".")) for i in range(n_sys)]
    users = [UserPrompt(id=f"u{j:05d}", text=_text(rng, 6, 30, "?"), category=f"cat{j % 5}") for j in range(n_user)]
    return SweepConfig(name=f"synthetic{n_pairs}", model=model, system_prompts=systems, user_prompts=users,
                       max_new_tokens=0)


def worker_scale(args) -> dict:
    from promptshift.extract.run import ExtractConfig, extract
    from promptshift.models import load_model
    from promptshift.sweep.plan import load_plan_inputs

    s = synthetic_sweep(args.n_pairs, args.model)
    tok, _ = load_plan_inputs(s)
    model = load_model(s.model)
    with tempfile.TemporaryDirectory(dir=args.tmp) as d:
        path = str(Path(d) / "scale.zarr")
        t0 = time.perf_counter()
        st = extract(s, ExtractConfig(store=path, format="zarr", progress=False, selfcheck=False), model=model, tok=tok)
        el = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
        plan = st.plan
        n = plan.prompts.n_tokens
        pair_tokens = int(sum(n[r.variant] + n[r.baseline] for r in plan.pairs.itertuples()))
        return {"pairs": len(plan.pairs), "prompts": len(plan.prompts), "tokens": pair_tokens, "seconds": el,
                "bytes": size, "computed_tokens": st.run_stats["tokens"], "blocks": st.run_stats["blocks"]}


def run_scaling(args, run_worker) -> None:
    sizes = [int(x) for x in args.scaling.split(",") if x]
    results = {}
    for n in sizes:
        print(f"scaling: {n} pairs ...", file=sys.stderr, flush=True)
        t = time.perf_counter()
        results[n] = r = run_worker("scale", args, None, ["--n-pairs", str(n)])
        print(f"  done in {time.perf_counter() - t:.0f} s: {json.dumps(r)}", file=sys.stderr, flush=True)
    print("| pairs | prompts | computed tokens | seconds | ms/pair | pairs/s | peak RSS MB | store MB |")
    print("|---|---|---|---|---|---|---|---|")
    for n, r in results.items():
        if "error" in r:
            print(f"| {n} | failed: {r['error']} | | | | | | |")
            continue
        r["ms_per_pair"] = 1000 * r["seconds"] / r["pairs"]
        print(f"| {r['pairs']} | {r['prompts']} | {r['computed_tokens']} | {r['seconds']:.1f} | {r['ms_per_pair']:.0f} | "
              f"{r['pairs'] / r['seconds']:.2f} | {r['peak_rss_mb']:.0f} | {r['bytes'] / 1e6:.1f} |")
    ok = [r for r in results.values() if "error" not in r]
    for a, b in zip(ok, ok[1:]):
        print(f"{a['pairs']} -> {b['pairs']} pairs: peak RSS {100 * (b['peak_rss_mb'] / a['peak_rss_mb'] - 1):+.1f}%, "
              f"time/pair {100 * (b['ms_per_pair'] / a['ms_per_pair'] - 1):+.1f}%")
    if args.json:
        Path(args.json).write_text(json.dumps({str(k): v for k, v in results.items()}, indent=1))
