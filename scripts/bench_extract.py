#!/usr/bin/env python
"""Extraction benchmark: promptshift vs a per-pair loop, nnsight and TransformerLens, side
by side in one run, each in its own process (so peak RSS is its own), on the same model and
prompt pairs, all producing the same outputs (see scripts/bench_peers.py).

    python scripts/bench_extract.py                       # default suite, embedded model
    python scripts/bench_extract.py --max-user 12 --json out.json
    python scripts/bench_extract.py --max-user 4 --modes loop,promptshift,null,nnsight,tlens
    python scripts/bench_extract.py --scaling 50,500,5000  # time/pair and peak RSS vs sweep size
    python scripts/bench_extract.py --device cuda --dtype bfloat16 --model DIR --modes loop,promptshift,null
    python scripts/bench_extract.py --max-system 16 --max-user 4 --gen-tokens 32 --modes loop,promptshift
                                                          # 64 pairs with continuations: whole process, decode

Modes:
  loop           two unbatched forward passes per pair (variant, baseline), eager attention
                 with output_attentions, forward hooks for the components, as the notebook
                 promptshift grew out of did; with --gen-tokens, then `generate` (greedy) of
                 each prompt
  promptshift    `extract` to a zarr store (all four components at suffix positions,
                 attention statistics, logits and logit lens; greedy continuations only
                 with --gen-tokens, to match)
  null           the same extraction writing nowhere, to price the store
  nnsight        nnsight.LanguageModel tracing, batched, eager attention
  tlens          TransformerLens (TransformerBridge in 4.x) run_with_cache, batched
The peer modes (nnsight, tlens) run under --peers-python (.venv-peers by default, made by
`make bench-peers`), so the project venv never gets their dependencies. Every full-output
mode saves a few check prompts; the table's last column is their largest scale-free
difference from promptshift's store (float16 storage rounding is ~1e-3).
Also measured in the same run: matmul throughput in the compute dtype on the compute device
(float32 on a CPU, bfloat16 on a GPU by default), for model FLOP utilisation.

Each mode's whole process is timed too, spawn to exit (imports, model load, plan, store
creation, the work, the check file): the start-up a user waits for, which the per-mode
seconds leave out. With --gen-tokens N every mode produces N greedy tokens per prompt (up to
and including an end-of-sequence token), the check prompts' continuations are compared
token for token, and promptshift's decode steps are priced against the matmul peak: model
FLOPs of the decoded rows (2 x (non-embedding + unembedding parameters) per row-step, plus
4 x layers x hidden per attended key) per decode second.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def matmul_flops(n: int | None = None, reps: int | None = None, device: str = "cpu", dtype: str = "float32") -> float:
    """FLOP/s of an (n, n) @ (n, n) product in ``dtype`` on ``device``: the peak that MFU is
    measured against (2048 on a CPU; 8192 on a GPU, where smaller products do not fill it)."""
    import torch

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    n = n or (8192 if cuda else 2048)
    reps = reps or (20 if cuda else 8)
    dt = getattr(torch, dtype)
    a, b = torch.randn(n, n, device=dev, dtype=dt), torch.randn(n, n, device=dev, dtype=dt)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - t)


def _compute(args) -> tuple[str, str]:
    """(device, dtype) the modes run in: ``--device``/``--dtype``, else promptshift's own choice
    (a GPU if there is one, bfloat16 there, float32 on a CPU)."""
    from promptshift.models import auto_device, auto_dtype

    dev = auto_device(args.device)
    dt = str(auto_dtype(dev, args.dtype)).replace("torch.", "")
    return dev, dt


def _sweep(args):
    from promptshift.sweep.config import load_sweep

    gen = getattr(args, "gen_tokens", 0) or 0
    with warnings.catch_warnings():  # the sweep's word limits vs short continuations: not this script's concern
        warnings.simplefilter("ignore", UserWarning)
        s = load_sweep(args.sweep, max_new_tokens=gen, model=args.model)
    # exactly ``--gen-tokens`` greedy tokens (0: none) per prompt in every mode
    s.behaviour = dataclasses.replace(s.behaviour, max_new_tokens=None)
    if args.max_user:
        s.user_prompts = s.user_prompts[: args.max_user]
    if args.max_system:
        s.system_prompts = s.system_prompts[: args.max_system]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        s.__post_init__()
    return s


def worker_loop(args) -> dict:
    """Two unbatched forward passes per pair (variant, baseline), as the notebook promptshift
    grew out of did, producing the same outputs as the other modes (forward hooks for the
    four components, ``output_attentions`` (eager) reduced by the shared statistics)."""
    import torch

    from bench_peers import COMPS, Batch, Outputs, output_stats, versions
    from promptshift.extract.arch import resolve_arch
    from promptshift.models import eos_ids, load_model
    from promptshift.sweep.plan import build_plan, load_plan_inputs

    s = _sweep(args)
    tok, dims = load_plan_inputs(s)
    plan = build_plan(s, tok, dims)
    t0 = time.perf_counter()
    dev, dt = _compute(args)
    model = load_model(s.model, attn_implementation="eager", device=dev, dtype=dt)
    load_s = time.perf_counter() - t0
    eos = list(eos_ids(model, tok))
    arch = resolve_arch(model)
    L, NH = len(arch.layers), model.config.num_attention_heads
    full: dict[str, list] = {c: [None] * L for c in COMPS}

    def put(c, i):
        def fn(t):
            full[c][i] = t[0] if isinstance(t, tuple) else t
        return fn

    for i, layer in enumerate(arch.layers):
        layer.register_forward_pre_hook(lambda m, a, kw, f=put("resid_pre", i): f(a[0] if a else kw["hidden_states"]),
                                        with_kwargs=True)
        layer.register_forward_hook(lambda m, a, o, f=put("resid_post", i): f(o))
        arch.attn_add(i).register_forward_hook(lambda m, a, o, f=put("attn_out", i): f(o))
        arch.mlp_add(i).register_forward_hook(lambda m, a, o, f=put("mlp_out", i): f(o))
    out = Outputs(args.check_prompts)
    t0 = time.perf_counter()
    tokens = 0
    for r in plan.pairs.itertuples():
        for p in (r.variant, r.baseline):
            bt = Batch(plan, [p], L, NH)
            tokens += bt.lens[0]
            with torch.inference_mode():
                o = model(bt.ids.to(model.device), output_attentions=True)
                for i, a in enumerate(o.attentions):
                    bt.stats.reduce(i, a.float())
                comps = {c: torch.stack([bt.gather(full[c][i]) for i in range(L)], 1) for c in COMPS}
                normed = arch.final_norm(torch.stack([bt.last(full["resid_post"][i]) for i in range(L)], 1))
                outs = output_stats(o.logits[:, -1], normed, model.get_output_embeddings(), s.top_k, s.lens_top_k)
            out.add_batch(bt, comps, outs)
            if s.gen_tokens:  # the notebook's continuation: `generate` on the prompt, a second prefill
                with torch.inference_mode():
                    x = bt.ids.to(model.device)  # (1, n)
                    g = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=s.gen_tokens,
                                       do_sample=False, eos_token_id=eos, pad_token_id=eos[0])[0, x.shape[1]:]
                out.add_gen(p, _cut_at_eos(g.cpu().numpy(), eos))
    el = time.perf_counter() - t0
    out.save(args.check_out)
    n = plan.prompts.n_tokens
    qk = sum(int(n[r.variant]) * (int(n[r.variant]) + 1) // 2 + int(n[r.baseline]) * (int(n[r.baseline]) + 1) // 2
             for r in plan.pairs.itertuples())
    return {"pairs": len(plan.pairs), "tokens": tokens, "seconds": el, "load_seconds": load_s,
            "computed_tokens": tokens, "attn_qk": qk, "versions": versions(), "attention": "eager"}


def _cut_at_eos(ids, eos):
    """``ids`` up to and including its first end-of-sequence token."""
    import numpy as np

    hit = np.flatnonzero(np.isin(ids, eos))
    return np.asarray(ids[: hit[0] + 1] if len(hit) else ids, dtype=np.int64)


def worker_promptshift(args, fmt: str) -> dict:
    from bench_peers import versions
    from promptshift.extract.worker import ExtractConfig, fill_shard
    from promptshift.models import load_model
    from promptshift.sweep.plan import load_plan_inputs

    s = _sweep(args)
    tok, _ = load_plan_inputs(s)
    t0 = time.perf_counter()
    dev, dt = _compute(args)
    model = load_model(s.model, device=dev, dtype=dt)
    load_s = time.perf_counter() - t0
    if fmt == "zarr":
        import zarr  # noqa: F401 -- imported before timing, like the peers' libraries and the model

    with tempfile.TemporaryDirectory(dir=args.tmp) as d:
        path = str(Path(d) / "bench.zarr") if fmt == "zarr" else None
        t0 = time.perf_counter()
        st = fill_shard(s, ExtractConfig(store=path, format=fmt, progress=False, selfcheck=False), model=model, tok=tok)
        el = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) if path else 0
        plan = st.plan
        if path and args.check_out:
            _save_store_check(path, args.check_prompts, args.check_out)
        pair_tokens = int(sum(plan.prompts.n_tokens[r.variant] + plan.prompts.n_tokens[r.baseline]
                              for r in plan.pairs.itertuples()))
        kept = int(plan.prompts.n_kept.sum())
        return {"pairs": len(plan.pairs), "tokens": pair_tokens, "seconds": el, "bytes": size, "kept_tokens": kept,
                "computed_tokens": st.run_stats["tokens"], "attn_qk": st.run_stats["attn_qk"],
                "decode_rows": st.run_stats["decode_rows"], "decode_keys": st.run_stats["decode_keys"],
                "decode_seconds": st.run_stats["decode_seconds"], "load_seconds": load_s,
                "versions": versions("zarr")}


# store array -> key in the peers' check files
_CHECK_ARRAYS = {"attn_region_mass": "region_mass", "attn_entropy": "entropy", "attn_sink": "sink",
                 "logits_topk_logprobs": "topk_logprobs", "logits_lse": "lse", "lens_entropy": "lens_entropy",
                 "lens_topk_logprobs": "lens_logprobs"}


def _save_store_check(path, prompts, out) -> None:
    import numpy as np

    from promptshift.store import open as open_store

    st = open_store(path)
    d = {}
    for p in prompts:
        for c in st.components:
            d[f"{p}/{c}"] = st.component(c, p)
        for a, k in _CHECK_ARRAYS.items():
            d[f"{p}/{k}"] = np.asarray(st.array(a)[p])
        d[f"{p}/last_row"] = st.attn_last_row(p)
        if "gen_ids" in st.names():
            d[f"{p}/gen_ids"] = np.asarray(st.array("gen_ids")[p, : int(st.array("gen_len")[p])], np.int64)
    np.savez(out, **d)


def compare_checks(ref_path, path) -> float:
    """Largest scale-free difference |a - b| / max|b| over every checked array."""
    import numpy as np

    ref, other = np.load(ref_path), np.load(path)
    worst = 0.0
    for k in ref.files:
        if k.endswith("/gen_ids"):  # token ids: compared for equality (gen_agreement)
            continue
        if k not in other.files:
            return float("inf")
        a, b = np.asarray(other[k], np.float64), np.asarray(ref[k], np.float64)
        ok = np.isfinite(b)
        if not np.array_equal(ok, np.isfinite(a)):
            return float("inf")
        if ok.any():
            worst = max(worst, float(np.abs(a[ok] - b[ok]).max() / max(np.abs(b[ok]).max(), 1e-12)))
    return worst


def gen_agreement(ref_path, path) -> tuple[int, int]:
    """(continuations equal token for token, continuations checked) of the check prompts."""
    import numpy as np

    ref, other = np.load(ref_path), np.load(path)
    keys = [k for k in ref.files if k.endswith("/gen_ids")]
    return sum(k in other.files and np.array_equal(ref[k], other[k]) for k in keys), len(keys)


def run_worker(mode: str, args, python: str | None = None, extra: list[str] | None = None) -> dict:
    cmd = [python or sys.executable, __file__, "--worker", mode, "--sweep", args.sweep]
    for k in ("max_user", "max_system", "model", "tmp", "device", "dtype", "gen_tokens"):
        v = getattr(args, k)
        if v is not None:
            cmd += [f"--{k.replace('_', '-')}", str(v)]
    cmd += extra or []
    if getattr(args, "in_process", False) and python is None:
        import contextlib
        import io

        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf):
                main(cmd[2:])
        except Exception as e:  # reported like a failed worker process
            return {"error": f"{type(e).__name__}: {e}"}
        return json.loads(buf.getvalue().strip().splitlines()[-1])
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, check=False)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.stderr.write(r.stderr[-3000:])
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["process_seconds"] = wall  # spawn to exit: start-up included
    return res


PEER_MODES = ("nnsight", "tlens")
MODES = ("loop", "promptshift", "null", *PEER_MODES)


def default_peers_python() -> str:
    p = REPO / ".venv-peers" / "bin" / "python"
    return str(p) if p.exists() else sys.executable


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", default="default")
    ap.add_argument("--model", default=None)
    ap.add_argument("--max-user", type=int, default=None)
    ap.add_argument("--max-system", type=int, default=None)
    ap.add_argument("--modes", default="loop,promptshift,null",
                    help=f"comma-separated, any of {', '.join(MODES)}")
    ap.add_argument("--peers-python", default=None,
                    help="interpreter for the nnsight / tlens modes (default: .venv-peers/bin/python if it exists)")
    ap.add_argument("--scaling", default=None,
                    help="instead of the modes: promptshift extract on N synthetic pairs for each N, e.g. 50,500,5000")
    ap.add_argument("--tmp", default=None, help="directory for the temporary store")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: a GPU if there is one)")
    ap.add_argument("--dtype", default=None, help="compute dtype: float32, bfloat16, float16 (default: bfloat16 "
                    "on a GPU, float32 on a CPU); the matmul peak is measured in it")
    ap.add_argument("--gen-tokens", type=int, default=0,
                    help="greedy continuation tokens per prompt in every mode (default 0: none); only the loop, "
                    "promptshift and null modes generate")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--in-process", action="store_true", help="run the modes in this process, one after the "
                    "other (quick checks of the script: start-up is paid once, peak RSS is the whole process's)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--check-prompts", default="", help=argparse.SUPPRESS)
    ap.add_argument("--check-out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--n-pairs", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.check_prompts = [int(x) for x in args.check_prompts.split(",") if x]

    if args.worker:
        import bench_peers

        w = args.worker
        if w == "loop":
            res = worker_loop(args)
        elif w == "nnsight":
            res = bench_peers.worker_nnsight(args, _sweep)
        elif w == "tlens":
            res = bench_peers.worker_tlens(args, _sweep)
        elif w == "scale":
            from bench_scaling import worker_scale

            res = worker_scale(args)
        else:
            res = worker_promptshift(args, "zarr" if w == "promptshift" else "null")
        res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(res))
        return

    if args.scaling:
        from bench_scaling import run_scaling

        return run_scaling(args, run_worker)

    from transformers import AutoConfig

    from promptshift.models import materialize, resolve_source
    from promptshift.sweep.plan import ModelDims, build_plan, load_plan_inputs

    cfg = AutoConfig.from_pretrained(materialize(resolve_source(args.model)))
    dims = ModelDims.from_config(cfg)
    n_params_nonemb = _non_embedding_params(cfg)
    s = _sweep(args)
    plan = build_plan(s, *load_plan_inputs(s))
    # check prompts: the first pair's variant and baseline, and the last prompt of the plan
    r0 = plan.pairs.iloc[0]
    check = sorted({int(r0.variant), int(r0.baseline), len(plan.prompts) - 1})
    peers_python = args.peers_python or default_peers_python()
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        ap.error(f"unknown mode(s) {unknown}; use {', '.join(MODES)}")
    if args.gen_tokens and set(modes) & set(PEER_MODES):
        ap.error("--gen-tokens: the peer modes do not generate; use loop, promptshift, null")
    dev, dt = _compute(args)
    peak = matmul_flops(device=dev, dtype=dt)
    results = {}
    with tempfile.TemporaryDirectory(dir=args.tmp) as cd:
        for mode in modes:
            print(f"running {mode} ...", file=sys.stderr, flush=True)
            chk = str(Path(cd) / f"{mode}.npz")
            extra = ["--check-prompts", ",".join(map(str, check)), "--check-out", chk]
            results[mode] = run_worker(mode, args, peers_python if mode in PEER_MODES else None, extra)
            if Path(chk).exists():
                results[mode]["_check"] = chk
        ref = results.get("promptshift", {}).get("_check")
        for r in results.values():
            chk = r.pop("_check", None)
            if ref and chk:
                r["max_rel_diff_vs_promptshift"] = compare_checks(ref, chk)
                if args.gen_tokens:
                    r["gen_equal"] = gen_agreement(ref, chk)
    peak_after = matmul_flops(device=dev, dtype=dt)
    base = results.get("promptshift", {})
    null = results.get("null", {})
    rows = []
    for mode, r in results.items():
        if "error" in r or "unavailable" in r:
            why = f"failed: {r['error']}" if "error" in r else f"not available: {r['unavailable']}"
            rows.append(f"| {mode} | {why} | | | | | | | | | |")
            continue
        pps, tps = r["pairs"] / r["seconds"], r["tokens"] / r["seconds"]
        ratio = (pps / (base["pairs"] / base["seconds"])) if "seconds" in base else float("nan")
        ratio_null = (pps / (null["pairs"] / null["seconds"])) if "seconds" in null else float("nan")
        flops = 2 * n_params_nonemb * r["computed_tokens"] + 4 * dims.n_layers * dims.hidden * r["attn_qk"]
        mfu = flops / r["seconds"] / max(peak, peak_after)
        # the same plus the output side every mode computes: final logits and the logit lens
        # of every layer at the last position (an unembedding per layer per prompt run)
        n_out = 2 * r["pairs"] if mode == "loop" else len(plan.prompts)
        flops_all = flops + 2 * dims.vocab * dims.hidden * (dims.n_layers + 1) * n_out
        mfu_all = flops_all / r["seconds"] / max(peak, peak_after)
        bpt = r.get("bytes", 0) / r["kept_tokens"] if r.get("kept_tokens") and r.get("bytes") else float("nan")
        diff = r.get("max_rel_diff_vs_promptshift")
        rows.append(f"| {mode} | {r['pairs']} | {pps:.2f} | {tps:.0f} | {ratio:.2f} | {ratio_null:.2f} | "
                    f"{r['peak_rss_mb']:.0f} | {bpt:.0f} | {100 * mfu:.1f}% | {100 * mfu_all:.1f}% | "
                    f"{'–' if diff is None else f'{diff:.1e}'} |")
        r.update(pairs_per_s=pps, tokens_per_s=tps, ratio_to_promptshift=ratio, ratio_to_null=ratio_null, mfu=mfu,
                 model_flops=flops, mfu_with_outputs=mfu_all, flops_with_outputs=flops_all)
    print(f"{dt} matmul peak on {dev}: {max(peak, peak_after) / 1e9:.1f} GFLOP/s (before {peak / 1e9:.1f}, after "
          f"{peak_after / 1e9:.1f}); non-embedding parameters: {n_params_nonemb / 1e6:.1f} M; "
          f"check prompts {check}")
    print("| mode | pairs | pairs/s | tokens/s | x promptshift | x nowhere | peak RSS MB | bytes/kept token | MFU "
          "| MFU with outputs | max rel diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if "seconds" in base and "seconds" in null:
        over = base["seconds"] / null["seconds"] - 1
        print(f"store overhead (zarr vs nowhere): {100 * over:+.1f}%")
    work = "work, continuations" if args.gen_tokens else "work"
    print(f"whole process, spawn to exit (imports, model load, plan, store, {work}):")
    for mode, r in results.items():
        if "process_seconds" in r and mode == "promptshift":
            print(f"  {mode}: {r['process_seconds']:.1f} s")
        elif "process_seconds" in r:
            speedup = r["process_seconds"] / base["process_seconds"] if "process_seconds" in base else float("nan")
            r["process_ratio"] = speedup
            eq = (f"; continuations equal to promptshift's: {r['gen_equal'][0]}/{r['gen_equal'][1]}"
                  if "gen_equal" in r else "")
            print(f"  {mode}: {r['process_seconds']:.1f} s (promptshift {speedup:.2f}x faster){eq}")
    if args.gen_tokens and base.get("decode_seconds"):
        peak_max = max(peak, peak_after)
        dflops = (2 * (n_params_nonemb + dims.vocab * dims.hidden) * base["decode_rows"]
                  + 4 * dims.n_layers * dims.hidden * base["decode_keys"])
        dmfu = dflops / base["decode_seconds"] / peak_max
        base.update(decode_flops=dflops, decode_mfu=dmfu)
        print(f"promptshift decode: {base['decode_rows']} row-steps, {base['decode_keys']} attended keys in "
              f"{base['decode_seconds']:.1f} s ({base['decode_rows'] / base['decode_seconds']:.0f} tokens/s): "
              f"{dflops / base['decode_seconds'] / 1e9:.1f} GFLOP/s = {100 * dmfu:.1f}% of the matmul peak; "
              f"extraction without decode {base['seconds'] - base['decode_seconds']:.1f} s")
    for mode, r in results.items():
        if "versions" in r:
            extra = "".join(f", {k}: {r[k]}" for k in ("api", "attention") if k in r)
            print(f"{mode}: {', '.join(f'{k} {v}' for k, v in r['versions'].items())}{extra}; "
                  f"model load {r.get('load_seconds', float('nan')):.1f} s (not timed)")
    if args.json:
        Path(args.json).write_text(json.dumps({"peak_flops": max(peak, peak_after), "device": dev, "dtype": dt,
                                               "check_prompts": check,
                                               "results": results}, indent=1))


def _non_embedding_params(cfg) -> int:
    h, L, i = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size
    nh, nkv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    hd = getattr(cfg, "head_dim", None) or h // nh
    attn = h * nh * hd * 2 + h * nkv * hd * 2  # q, o + k, v
    mlp = 3 * h * i
    return L * (attn + mlp)


if __name__ == "__main__":
    main()
