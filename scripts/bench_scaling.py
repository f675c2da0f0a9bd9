"""Scaling runs.

Extraction, from scripts/bench_extract.py (``--scaling 50,500,5000``): promptshift
``extract`` into a zarr store on N synthetic prompt pairs, each N in its own process, to
see whether time per pair and peak memory stay flat as the sweep grows.

Plans and metrics at cluster scale, run directly (each size in its own process):

    python scripts/bench_scaling.py --plan 10000,100000,1000000   # the plan job: plan, store creation
    python scripts/bench_scaling.py --metrics 10000,100000        # metrics driver memory, synthetic store

Extraction's synthetic sweeps keep the mix of work constant across sizes: 10 system prompts
(fewer for N < 10) x N/10 user prompts, so every size has the same share of baselines (one per user
prompt) and of shared system prefixes; texts are drawn with a fixed seed from a small
vocabulary, system prompts 12-60 words, user prompts 6-30 words. Plans and metrics use a
crossed grid of the same texts, about sqrt(N) system x sqrt(N) user prompts (:func:`grid_sweep`).
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import subprocess
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
    from promptshift.extract.worker import ExtractConfig, fill_shard
    from promptshift.models import load_model
    from promptshift.sweep.plan import load_plan_inputs

    s = synthetic_sweep(args.n_pairs, args.model)
    tok, _ = load_plan_inputs(s)
    model = load_model(s.model)
    with tempfile.TemporaryDirectory(dir=args.tmp) as d:
        path = str(Path(d) / "scale.zarr")
        t0 = time.perf_counter()
        st = fill_shard(s, ExtractConfig(store=path, format="zarr", progress=False, selfcheck=False), model=model,
                        tok=tok)
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


# --- plans and metrics at cluster scale (issue 20): `python scripts/bench_scaling.py --plan ...` -----------------
def grid_sweep(n_pairs: int, model=None, seed: int = 0, keep: str = "suffix", max_new_tokens: int = 32,
               full_logprobs: bool = True):
    """A crossed synthetic sweep of about ``n_pairs`` pairs: S system prompts x U user prompts
    with S = floor(sqrt(n_pairs)) and U = n_pairs // S (1000 x 1000 at 1,000,000; 316 x 316 =
    99,856 at 100,000; 100 x 100 at 10,000), texts as in :func:`synthetic_sweep`."""
    import math

    from promptshift.sweep.config import SweepConfig, SystemPrompt, UserPrompt

    rng = random.Random(seed)
    n_sys = max(1, math.isqrt(n_pairs))
    n_user = max(1, n_pairs // n_sys)
    systems = [SystemPrompt(name=f"sys{i:04d}", text="You are " + _text(rng, 12, 60, ".")) for i in range(n_sys)]
    users = [UserPrompt(id=f"u{j:06d}", text=_text(rng, 6, 30, "?"), category=f"cat{j % 5}") for j in range(n_user)]
    return SweepConfig(name=f"grid{n_pairs}", model=model, system_prompts=systems, user_prompts=users, keep=keep,
                       max_new_tokens=max_new_tokens, full_logprobs=full_logprobs)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_plan(n_pairs: int, tmp: str | None) -> dict:
    """The plan job of a SLURM chain on a synthetic grid sweep, phase by phase: build the plan
    (what `promptshift plan` does), create the store from it (what `extract --init-only`
    does after loading the model), and read the stored plan back (what every extract task
    and `metrics` does first). Peak RSS after each phase (it only grows)."""
    from promptshift.store.core import Store, open_store
    from promptshift.sweep.plan import build_plan, load_plan_inputs

    s = grid_sweep(n_pairs)
    t0 = time.perf_counter()
    tok, dims = load_plan_inputs(s)
    out = {"systems": len(s.system_prompts), "users": len(s.user_prompts), "load_s": time.perf_counter() - t0,
           "load_peak_mb": _peak_mb(), "loadavg_start": os.getloadavg()[0]}
    t0 = time.perf_counter()
    plan = build_plan(s, tok, dims)
    out.update(plan_s=time.perf_counter() - t0, plan_peak_mb=_peak_mb(), pairs=len(plan.pairs),
               prompts=plan.n_prompts, tokens=int(len(plan.token_ids)))
    with tempfile.TemporaryDirectory(dir=tmp) as d:
        path = Path(d) / "plan.zarr"
        t0 = time.perf_counter()
        Store.create(path, plan, provenance={"model_id": "embedded (plan benchmark)"}, fmt="zarr")
        out.update(store_s=time.perf_counter() - t0, store_peak_mb=_peak_mb())
        del plan
        t0 = time.perf_counter()
        read = open_store(path).plan
        out.update(read_s=time.perf_counter() - t0, read_peak_mb=_peak_mb(), read_prompts=read.n_prompts)
        out["plan_bytes"] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and "plan" in str(f))
    out["loadavg_end"] = os.getloadavg()[0]
    return out


# Dimensions of the synthetic metrics store: small, so that 100,000 pairs fit on a laptop disk
# (~1 GB), with every array the metrics read present at its real shape.
SYNTH_DIMS = dict(n_layers=4, hidden=64, n_heads=2, vocab=49152, max_positions=None)


def synthetic_store(path: str | Path, n_pairs: int, *, keep: str = "last", max_new_tokens: int = 8, seed: int = 0,
                    progress: bool = False):
    """A complete store for a grid sweep of about ``n_pairs`` pairs, built without a model: the
    real plan (embedded tokenizer and chat template) with :data:`SYNTH_DIMS`, every block
    filled through the store API (``empty_block`` / ``write_block``) with deterministic
    synthetic values of the right form (attention rows and region masses that sum to 1,
    descending top-k log-probabilities of distinct ids, continuations)."""
    import numpy as np

    from promptshift.store.core import Store, empty_block, stored_name
    from promptshift.sweep.plan import ModelDims, build_plan, load_plan_inputs
    from promptshift.vocabulary import REGIONS

    # top-k log-probs only: whole next-token log-probs are 4 x vocab bytes a prompt (20 GB of
    # NaN at 100,000 pairs with this vocabulary, read back by every output task) and are
    # read per block by the workers, never by the driver whose memory this measures
    s = grid_sweep(n_pairs, keep=keep, max_new_tokens=max_new_tokens, full_logprobs=False)
    tok, _ = load_plan_inputs(s)
    dims = ModelDims(**SYNTH_DIMS)
    plan = build_plan(s, tok, dims)
    st = Store.create(path, plan, provenance={"model_id": "synthetic (metrics benchmark)",
                                              "storage_dtype": s.storage_dtype}, fmt="zarr", overwrite=True)
    L, H, NH, V, R = dims.n_layers, dims.hidden, dims.n_heads, dims.vocab, len(REGIONS)
    pr = plan.prompts
    ntok = pr["n_tokens"].to_numpy(np.int64)
    kst = pr["key_start"].to_numpy(np.int64)
    # (P, R) tokens per region of each prompt: which query regions exist
    counts = np.zeros((plan.n_prompts, R), np.int64)
    np.add.at(counts, (np.repeat(np.arange(plan.n_prompts), ntok), plan.token_region.astype(np.int64)), 1)
    direction = np.random.default_rng(seed).normal(size=(L, H)) * 3.0  # shared offset (anisotropy)

    def logprobs(rng, shape, k):  # descending log-probs of the top k of k + 1 buckets (one is the rest)
        x = rng.normal(0.0, 2.0, size=(*shape, k + 1))
        x -= np.log(np.exp(x).sum(-1, keepdims=True))
        return -np.sort(-x[..., :k], axis=-1)

    def ids(rng, shape, k):  # k distinct ids per row
        base = rng.integers(0, V, size=(*shape, 1))
        return ((base + np.arange(k) * 7919) % V).astype(np.int32)

    for b in range(plan.n_blocks):
        blk = plan.blocks.iloc[b]
        p0, p1 = int(blk.prompt_start), int(blk.prompt_end)
        n = p1 - p0
        rng = np.random.default_rng([seed, b])
        data = empty_block(plan, b)
        for c in s.components:
            name = stored_name(plan, c)
            x = rng.normal(size=data[name].shape)
            data[name][...] = (x + (direction if x.ndim == 3 else direction[0])).astype(data[name].dtype)
        has = counts[p0:p1] > 0  # (n, R)
        rm = rng.random((n, L, NH, R, R)) * has[:, None, None, None, :]
        rm /= rm.sum(-1, keepdims=True)
        rm[~np.broadcast_to(has[:, None, None, :, None], rm.shape)] = np.nan
        data["attn_region_mass"][...] = rm
        ent = rng.random((n, L, NH, R)) * 3.0
        ent[~np.broadcast_to(has[:, None, None, :], ent.shape)] = np.nan
        data["attn_entropy"][...] = ent
        data["attn_sink"][...] = rng.random((n, L, NH))
        k0 = int(blk.key_start)
        last = data["attn_last"]
        rows = rng.random((int(kst[p1 - 1] + ntok[p1 - 1] - k0), L, NH))
        starts = kst[p0:p1] - k0
        sums = np.add.reduceat(rows, starts, axis=0)  # (n, L, NH) per prompt
        rows /= np.repeat(sums, ntok[p0:p1], axis=0)
        last[: len(rows)] = rows.astype(last.dtype)
        data["logits_topk_ids"][...] = ids(rng, (n,), s.top_k)
        data["logits_topk_logprobs"][...] = logprobs(rng, (n,), s.top_k)
        data["logits_entropy"][...] = rng.random(n) * 4.0
        data["logits_lse"][...] = rng.normal(size=n)
        data["lens_topk_ids"][...] = ids(rng, (n, L), s.lens_top_k)
        lp = logprobs(rng, (n, L), s.lens_top_k)
        data["lens_topk_logprobs"][...] = lp
        data["lens_entropy"][...] = rng.random((n, L)) * 6.0
        data["lens_final_top1_logprob"][...] = lp[..., 0]
        if max_new_tokens:
            glen = rng.integers(0, max_new_tokens + 1, size=n)
            g = rng.integers(0, 50, size=(n, max_new_tokens)).astype(np.int32)  # few ids: continuations overlap
            g[np.arange(max_new_tokens)[None, :] >= glen[:, None]] = -1
            data["gen_ids"][...] = g
            data["gen_len"][...] = glen
            data["gen_text"][...] = [" ".join(f"t{t}" for t in row[row >= 0]) for row in g]
        st.write_block(b, data)
        if progress and b % 200 == 0:
            print(f"  synthetic store: block {b}/{plan.n_blocks}", file=sys.stderr, flush=True)
    return st


def worker_synth(n_pairs: int, path: str) -> dict:
    t0 = time.perf_counter()
    st = synthetic_store(path, n_pairs, progress=True)
    size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    return {"pairs": len(st.plan.pairs), "prompts": st.plan.n_prompts, "build_s": time.perf_counter() - t0,
            "store_bytes": size}


def worker_metrics(path: str, out: str, workers: int | None) -> dict:
    """`promptshift metrics` on a store, default settings but ``workers``; the driver's peak
    RSS (this process) and the workers' (its child processes) separately."""
    from promptshift.metrics import compute

    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    compute(path, out, workers=workers, progress=False)
    el = time.perf_counter() - t0
    peak = _peak_mb()  # before anything reads the tables back
    import pyarrow.parquet as pq

    return {"metrics_s": el, "driver_peak_mb": peak,
            "workers_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            "rows": {f.stem: pq.ParquetFile(f).metadata.num_rows for f in sorted(Path(out).glob("*.parquet"))},
            "out_bytes": sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file()),
            "loadavg_start": load0, "loadavg_end": os.getloadavg()[0]}


def _child(args: list[str]) -> dict:
    """Run one worker of this script in its own process (its peak RSS is its own)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.stderr.write(r.stderr[-3000:])
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def _sizes(text: str) -> list[int]:
    return [int(float(x)) for x in text.split(",") if x]


def run_plan(sizes: list[int], tmp: str | None) -> dict:
    res = {}
    for n in sizes:
        print(f"plan: {n} pairs ...", file=sys.stderr, flush=True)
        res[n] = r = _child(["--worker", "plan", "--n-pairs", str(n)] + (["--tmp", tmp] if tmp else []))
        print(f"  {json.dumps(r)}", file=sys.stderr, flush=True)
    print("| pairs | systems x users | prompts | tokens | plan s | plan peak RSS MB | + store s | peak RSS MB "
          "| read plan s | stored plan MB | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n, r in res.items():
        if "error" in r:
            print(f"| {n} | failed: {r['error']} | | | | | | | | | |")
            continue
        print(f"| {r['pairs']:,} | {r['systems']} x {r['users']} | {r['prompts']:,} | {r['tokens']:,} | "
              f"{r['plan_s']:.1f} | {r['plan_peak_mb']:.0f} | {r['store_s']:.1f} | {r['read_peak_mb']:.0f} | "
              f"{r['read_s']:.1f} | {r['plan_bytes'] / 1e6:.1f} | {r['loadavg_start']:.1f}-{r['loadavg_end']:.1f} |")
    return res


def run_metrics(sizes: list[int], tmp: str | None, workers: int | None, keep_store: bool = False) -> dict:
    res = {}
    for n in sizes:
        d = tempfile.mkdtemp(dir=tmp, prefix=f"metrics{n}-")
        try:
            path, out = str(Path(d) / "synth.zarr"), str(Path(d) / "results")
            print(f"metrics: {n} pairs: building the synthetic store ...", file=sys.stderr, flush=True)
            built = _child(["--worker", "synth", "--n-pairs", str(n), "--store", path])
            print(f"  {json.dumps(built)}", file=sys.stderr, flush=True)
            if "error" in built:
                res[n] = built
                continue
            print(f"metrics: {n} pairs: promptshift metrics ...", file=sys.stderr, flush=True)
            r = _child(["--worker", "metrics", "--store", path, "--out", out]
                       + (["--workers", str(workers)] if workers is not None else []))
            res[n] = {**built, **r}
            print(f"  {json.dumps(r)}", file=sys.stderr, flush=True)
        finally:
            if not keep_store:
                shutil.rmtree(d, ignore_errors=True)
    print("| pairs | prompts | store MB | metrics s | driver peak RSS MB | worker peak RSS MB | results MB "
          "| load avg |")
    print("|---|---|---|---|---|---|---|---|")
    ok = []
    for n, r in res.items():
        if "error" in r:
            print(f"| {n} | failed: {r['error']} | | | | | | |")
            continue
        ok.append(r)
        print(f"| {r['pairs']:,} | {r['prompts']:,} | {r['store_bytes'] / 1e6:.0f} | {r['metrics_s']:.1f} | "
              f"{r['driver_peak_mb']:.0f} | {r['workers_peak_mb']:.0f} | {r['out_bytes'] / 1e6:.0f} | "
              f"{r['loadavg_start']:.1f}-{r['loadavg_end']:.1f} |")
    for a, b in zip(ok, ok[1:]):
        print(f"{a['pairs']} -> {b['pairs']} pairs: driver peak RSS "
              f"{100 * (b['driver_peak_mb'] / a['driver_peak_mb'] - 1):+.1f}%")
    return res


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Plans and metrics at cluster scale (each size in its own process).")
    ap.add_argument("--plan", default=None, help="plan the synthetic grid sweep at these sizes, e.g. "
                    "10000,100000,1000000")
    ap.add_argument("--metrics", default=None, help="build a synthetic store (keep: last) at these sizes and run "
                    "`promptshift metrics` on it, e.g. 10000,100000")
    ap.add_argument("--workers", type=int, default=None, help="metrics: local dask workers (default: metrics' own)")
    ap.add_argument("--tmp", default=None, help="directory for the temporary stores")
    ap.add_argument("--keep-stores", action="store_true", help="metrics: leave the synthetic stores in --tmp")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--n-pairs", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--store", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        if args.worker == "plan":
            r = worker_plan(args.n_pairs, args.tmp)
        elif args.worker == "synth":
            r = worker_synth(args.n_pairs, args.store)
        elif args.worker == "metrics":
            r = worker_metrics(args.store, args.out, args.workers)
        else:
            raise SystemExit(f"unknown worker {args.worker!r}")
        r["peak_rss_mb"] = _peak_mb()
        print(json.dumps(r))
        return
    if not (args.plan or args.metrics):
        ap.error("give --plan SIZES and/or --metrics SIZES")
    res = {"cpu": os.cpu_count(), "loadavg": os.getloadavg()}
    if args.plan:
        res["plan"] = run_plan(_sizes(args.plan), args.tmp)
    if args.metrics:
        res["metrics"] = run_metrics(_sizes(args.metrics), args.tmp, args.workers, args.keep_stores)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
