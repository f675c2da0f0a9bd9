#!/usr/bin/env python
"""Extraction benchmark: promptshift vs a per-pair loop, side by side in one run, each in
its own process (so peak RSS is its own), on the same model and prompt pairs.

    python scripts/bench_extract.py                       # default suite, embedded model
    python scripts/bench_extract.py --max-user 12 --json out.json

Modes:
  loop           two unbatched forward passes per pair (variant, baseline) with
                 output_hidden_states and output_attentions (eager), keeping the hidden
                 states at the aligned suffix and per-region attention mass, as the
                 notebook promptshift grew out of did
  promptshift    `extract` to a zarr store (all four components at suffix positions,
                 attention statistics, logits and logit lens; no generation, to match)
  null           the same extraction writing nowhere, to price the store
Also measured in the same run: fp32 matmul throughput, for model FLOP utilisation.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def matmul_flops(n: int = 2048, reps: int = 8) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t)


def _sweep(args):
    from promptshift.sweep.config import load_sweep

    s = load_sweep(args.sweep, max_new_tokens=0, model=args.model)
    if args.max_user:
        s.user_prompts = s.user_prompts[: args.max_user]
    if args.max_system:
        s.system_prompts = s.system_prompts[: args.max_system]
    s.__post_init__()
    return s


def worker_loop(args) -> dict:
    import numpy as np
    import torch

    from promptshift.models import load_model
    from promptshift.sweep.chat import REGIONS
    from promptshift.sweep.plan import build_plan, load_plan_inputs

    s = _sweep(args)
    tok, dims = load_plan_inputs(s)
    plan = build_plan(s, tok, dims)
    model = load_model(s.model, attn_implementation="eager")
    kept = []
    t0 = time.perf_counter()
    tokens = 0
    for r in plan.pairs.itertuples():
        for p, start in ((r.variant, r.v_suffix_start), (r.baseline, r.b_suffix_start)):
            ids = torch.as_tensor(plan.prompt_tokens(p), dtype=torch.long)[None]
            tokens += ids.shape[1]
            with torch.no_grad():
                out = model(ids, output_hidden_states=True, output_attentions=True)
            hs = torch.stack(out.hidden_states[1:], 1)[0, start:].numpy().astype(np.float16)  # (n, L, H)
            onehot = np.eye(len(REGIONS))[plan.prompt_regions(p)]
            mass = [(a[0].numpy() @ onehot).mean(1) for a in out.attentions]  # L x (NH, R)
            kept.append((hs, np.stack(mass)))
    el = time.perf_counter() - t0
    n = plan.prompts.n_tokens
    qk = sum(int(n[r.variant]) * (int(n[r.variant]) + 1) // 2 + int(n[r.baseline]) * (int(n[r.baseline]) + 1) // 2
             for r in plan.pairs.itertuples())
    return {"pairs": len(plan.pairs), "tokens": tokens, "seconds": el, "computed_tokens": tokens, "attn_qk": qk}


def worker_promptshift(args, fmt: str) -> dict:
    from promptshift.extract.run import ExtractConfig, extract
    from promptshift.models import load_model
    from promptshift.sweep.plan import load_plan_inputs

    s = _sweep(args)
    tok, _ = load_plan_inputs(s)
    model = load_model(s.model)
    with tempfile.TemporaryDirectory(dir=args.tmp) as d:
        path = str(Path(d) / "bench.zarr") if fmt == "zarr" else None
        t0 = time.perf_counter()
        st = extract(s, ExtractConfig(store=path, format=fmt, progress=False, selfcheck=False), model=model, tok=tok)
        el = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) if path else 0
        plan = st.plan
        pair_tokens = int(sum(plan.prompts.n_tokens[r.variant] + plan.prompts.n_tokens[r.baseline]
                              for r in plan.pairs.itertuples()))
        kept = int(plan.prompts.n_kept.sum())
        return {"pairs": len(plan.pairs), "tokens": pair_tokens, "seconds": el, "bytes": size, "kept_tokens": kept,
                "computed_tokens": st.run_stats["tokens"], "attn_qk": st.run_stats["attn_qk"]}


def run_worker(mode: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--sweep", args.sweep]
    for k in ("max_user", "max_system", "model", "tmp"):
        v = getattr(args, k)
        if v is not None:
            cmd += [f"--{k.replace('_', '-')}", str(v)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", default="default")
    ap.add_argument("--model", default=None)
    ap.add_argument("--max-user", type=int, default=None)
    ap.add_argument("--max-system", type=int, default=None)
    ap.add_argument("--modes", default="loop,promptshift,null")
    ap.add_argument("--tmp", default=None, help="directory for the temporary store")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        res = worker_loop(args) if args.worker == "loop" else worker_promptshift(
            args, "zarr" if args.worker == "promptshift" else "null")
        res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(res))
        return

    from promptshift.sweep.plan import ModelDims
    from transformers import AutoConfig

    from promptshift.models import materialize, resolve_source

    cfg = AutoConfig.from_pretrained(materialize(resolve_source(args.model)))
    dims = ModelDims.from_config(cfg)
    n_params_nonemb = _non_embedding_params(cfg)
    peak = matmul_flops()
    results = {}
    for mode in args.modes.split(","):
        print(f"running {mode} ...", file=sys.stderr, flush=True)
        results[mode] = run_worker(mode, args)
    peak_after = matmul_flops()
    base = results.get("promptshift", {})
    rows = []
    for mode, r in results.items():
        if "error" in r:
            rows.append(f"| {mode} | failed: {r['error']} | | | | | | |")
            continue
        pps, tps = r["pairs"] / r["seconds"], r["tokens"] / r["seconds"]
        ratio = (pps / (base["pairs"] / base["seconds"])) if base and "seconds" in base else float("nan")
        flops = 2 * n_params_nonemb * r["computed_tokens"] + 4 * dims.n_layers * dims.hidden * r["attn_qk"]
        mfu = flops / r["seconds"] / max(peak, peak_after)
        bpt = r.get("bytes", 0) / r["kept_tokens"] if r.get("kept_tokens") and r.get("bytes") else float("nan")
        rows.append(f"| {mode} | {r['pairs']} | {pps:.2f} | {tps:.0f} | {ratio:.2f} | {r['peak_rss_mb']:.0f} | "
                    f"{bpt:.0f} | {100 * mfu:.1f}% |")
        r.update(pairs_per_s=pps, tokens_per_s=tps, ratio_to_promptshift=ratio, mfu=mfu, model_flops=flops)
    print(f"fp32 matmul peak: {max(peak, peak_after) / 1e9:.1f} GFLOP/s (before {peak / 1e9:.1f}, after "
          f"{peak_after / 1e9:.1f}); non-embedding parameters: {n_params_nonemb / 1e6:.1f} M")
    print("| mode | pairs | pairs/s | tokens/s | x promptshift | peak RSS MB | bytes/kept token | MFU |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if "promptshift" in results and "null" in results and "seconds" in results["null"]:
        over = results["promptshift"]["seconds"] / results["null"]["seconds"] - 1
        print(f"store overhead (zarr vs nowhere): {100 * over:+.1f}%")
    if args.json:
        Path(args.json).write_text(json.dumps({"peak_flops": max(peak, peak_after), "results": results}, indent=1))


def _non_embedding_params(cfg) -> int:
    h, L, i = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size
    nh, nkv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    hd = getattr(cfg, "head_dim", None) or h // nh
    attn = h * nh * hd * 2 + h * nkv * hd * 2  # q, o + k, v
    mlp = 3 * h * i
    return L * (attn + mlp)


if __name__ == "__main__":
    main()
