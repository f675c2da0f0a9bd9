#!/usr/bin/env python
"""Causal benchmark: activation patching in promptshift vs TransformerLens's patching helpers
and an nnsight patching loop, side by side in one run, each in its own process (so peak RSS
is its own), on the same model, pairs and sites, all producing the same outputs.

    python scripts/bench_causal.py                                   # quick sweep, 4 user prompts
    python scripts/bench_causal.py --max-user 2 --max-system 1       # 2 pairs: a correctness check
    python scripts/bench_causal.py --modes promptshift,tlens,nnsight --peers-python .venv-peers/bin/python

The work, identical in every mode: for every pair (a user prompt under a system prompt, its
*variant*, and under the sweep's baseline) and every site l = 0..L-1 (the input of layer l:
TransformerLens's ``blocks.l.hook_resid_pre``), the baseline is run with the variant's
residual stream patched in

  * ``last``: at the last position (the one that predicts the first answer token);
  * ``suffix``: at every aligned suffix position (the user prompt and what follows, the same
    tokens in both prompts, at the end of both);

and the output is the full-vocabulary KL(p_variant || p_patched) of the next-token
distribution at the last position (nats). Each mode also runs the variant once for its
residuals and p_variant. Timed: that work, from token ids to the (pairs, 2, L) KL array;
not timed: imports, model loading, planning.

Modes:
  promptshift  ``promptshift.causal.analyses.patching`` as ``promptshift causal`` runs it
               (it also computes site L, the last layer's output: one layer per row more)
  tlens        TransformerLens ``transformer_lens.patching.generic_activation_patch`` on
               ``resid_pre`` with its ``layer_pos_patch_setter`` at position -1 (``last``) and
               a setter that writes the last n positions (``suffix``), one forward pass per
               (pair, site) as the helper runs them; TransformerBridge on the HF weights
               (TransformerLens 4.x) or HookedTransformer without weight processing (< 4)
  nnsight      ``nnsight.LanguageModel``: per pair and mode, one ``trace`` with one invoke per
               site (nnsight batches the invokes into one forward pass), each writing the
               variant's saved layer input into ``model.layers[l].input``

Peers run under --peers-python (``.venv-peers``, made by ``make bench-peers``), so the
project venv never gets their dependencies. The table gives seconds, pairs/s, each mode's
speed relative to promptshift, peak RSS, and the largest |KL difference| from promptshift's
values (float32 rounding: ~1e-6 here; the bar is 1e-4).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
PEER_MODES = ("tlens", "nnsight")
MODES = ("promptshift", *PEER_MODES)


def _plan(args):
    """The sweep cut to ``--max-user`` / ``--max-system`` with no continuation (as
    scripts/bench_extract.py cuts it), its tokenizer, plan and local model directory."""
    from bench_extract import _sweep
    from bench_peers import _prepare

    return _prepare(args, _sweep)


def _pairs(plan):
    """Per pair: variant ids, baseline ids, aligned suffix length."""
    return [(plan.prompt_tokens(int(r.variant)).astype(np.int64), plan.prompt_tokens(int(r.baseline)).astype(np.int64),
             int(r.suffix_len)) for r in plan.pairs.itertuples()]


def _kl(lp_v, lp):
    """KL(p_v || p) in float64 from float32 log-probabilities (V,)."""
    a, b = lp_v.double(), lp.double()
    return float((a.exp() * (a - b)).sum())


def worker_promptshift(args) -> dict:
    import torch

    from promptshift.causal.analyses import Scope, patching
    from promptshift.causal.runner import Runner
    from promptshift.models import load_model

    s, tok, plan, _ = _plan(args)
    t0 = time.perf_counter()
    model = load_model(s.model, device=args.device, dtype="float32")
    runner = Runner(model, token_budget=s.token_budget)
    load_s = time.perf_counter() - t0
    L = runner.L
    users = [u.id for u in s.user_prompts]
    t0 = time.perf_counter()
    with torch.inference_mode():
        arrays, _ = patching(runner, plan, Scope(users=users, progress=False))
    el = time.perf_counter() - t0
    runner.close()
    kl, _dims = arrays["kl"]  # (pairs, mode, site): modes in PATCH_MODES order (suffix, last)
    return {"seconds": el, "load_seconds": load_s, "kl": kl[:, :, :L].astype(np.float64).tolist()}


def worker_tlens(args) -> dict:
    import pandas as pd
    import torch

    from bench_peers import load_tlens

    s, tok, plan, loc = _plan(args)
    t0 = time.perf_counter()
    try:
        from transformer_lens import patching as tlp

        hf, model, api = load_tlens(loc, tok)
    except Exception as e:  # noqa: BLE001 -- reported in the table instead of failing the run
        msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return {"unavailable": msg[:300]}
    load_s = time.perf_counter() - t0
    L = hf.config.num_hidden_layers

    def suffix_setter(corrupted, index, clean):
        """Write the clean run's last ``n`` positions into the corrupted run's last ``n``."""
        n = int(index[-1])
        corrupted[:, -n:] = clean[:, -n:]
        return corrupted

    pairs = _pairs(plan)
    out = np.zeros((len(pairs), 2, L))
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i, (v_ids, b_ids, n_al) in enumerate(pairs):
            logits_v, cache = model.run_with_cache(torch.as_tensor(v_ids)[None],
                                                   names_filter=lambda name: name.endswith("hook_resid_pre"))
            lp_v = torch.log_softmax(logits_v[0, -1].float(), -1)

            def metric(logits, lp_v=lp_v):
                return torch.tensor(_kl(lp_v, torch.log_softmax(logits[0, -1].float(), -1)))

            corrupted = torch.as_tensor(b_ids)[None]
            for m, (setter, pos) in enumerate([(suffix_setter, n_al), (tlp.layer_pos_patch_setter, -1)]):
                index = pd.DataFrame({"layer": list(range(L)), "pos": [pos] * L})
                res = tlp.generic_activation_patch(model, corrupted, cache, metric, setter, "resid_pre", index_df=index)
                out[i, m] = torch.as_tensor(res).double().numpy().reshape(L)
            del cache
    el = time.perf_counter() - t0
    return {"seconds": el, "load_seconds": load_s, "kl": out.tolist(), "api": api}


def worker_nnsight(args) -> dict:
    import torch
    from nnsight import LanguageModel

    s, tok, plan, loc = _plan(args)
    t0 = time.perf_counter()
    lm = LanguageModel(loc, tokenizer=tok, dispatch=True, dtype=torch.float32)
    lm._module.eval()
    L = lm._module.config.num_hidden_layers
    load_s = time.perf_counter() - t0
    pairs = _pairs(plan)
    out = np.zeros((len(pairs), 2, L))
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i, (v_ids, b_ids, n_al) in enumerate(pairs):
            # containers made before a trace: what its body saves into them is there after it
            clean, got = [None] * L, [None] * L
            logits_v = [None]
            with lm.trace(torch.as_tensor(v_ids)[None]):
                for layer in range(L):
                    clean[layer] = lm.model.layers[layer].input.save()  # (1, S_v, H)
                logits_v[0] = lm.lm_head.output[0, -1].save()
            lp_v = torch.log_softmax(logits_v[0].float(), -1)
            for m, n in enumerate([n_al, 1]):
                with lm.trace() as tracer:
                    for layer in range(L):
                        with tracer.invoke(torch.as_tensor(b_ids)[None]):
                            lm.model.layers[layer].input[:, -n:] = clean[layer][:, -n:]
                            got[layer] = lm.lm_head.output[0, -1].save()
                out[i, m] = [_kl(lp_v, torch.log_softmax(g.float(), -1)) for g in got]
    el = time.perf_counter() - t0
    return {"seconds": el, "load_seconds": load_s, "kl": out.tolist()}


def _versions() -> dict:
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for m in ("torch", "transformers", "nnsight", "transformer-lens"):
        try:
            out[m] = md.version(m)
        except md.PackageNotFoundError:
            pass
    return out


def run_worker(mode: str, args, python: str) -> dict:
    cmd = [python, __file__, "--worker", mode, "--sweep", args.sweep]
    for k in ("max_user", "max_system", "model", "device"):
        v = getattr(args, k)
        if v is not None:
            cmd += [f"--{k.replace('_', '-')}", str(v)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(REPO)}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if r.returncode != 0:
        sys.stderr.write(r.stderr[-3000:])
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", default="quick")
    ap.add_argument("--model", default=None)
    ap.add_argument("--max-user", type=int, default=4, help="the sweep's first N user prompts")
    ap.add_argument("--max-system", type=int, default=None, help="the sweep's first N system prompts")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, any of {', '.join(MODES)}")
    ap.add_argument("--device", default="cpu", help="device of the promptshift mode (cuda for a GPU check); the "
                    "peer modes run on the CPU")
    ap.add_argument("--peers-python", default=None,
                    help="interpreter for the peer modes (default: .venv-peers/bin/python if it exists)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        fn = {"promptshift": worker_promptshift, "tlens": worker_tlens, "nnsight": worker_nnsight}[args.worker]
        res = fn(args)
        res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        res["versions"] = _versions()
        print(json.dumps(res))
        return

    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        ap.error(f"unknown mode(s) {unknown}; use {', '.join(MODES)}")
    if args.device != "cpu" and any(m in PEER_MODES for m in modes):
        ap.error("the peer modes run on the CPU here: use --device cpu, or --modes promptshift")
    peers = args.peers_python or str(REPO / ".venv-peers" / "bin" / "python")
    if any(m in PEER_MODES for m in modes) and not Path(peers).exists():
        ap.error(f"no peers interpreter at {peers}: run `make .venv-peers/.peers-installed` or pass --peers-python")
    _, _, plan, _ = _plan(args)
    results = {}
    for mode in modes:
        print(f"running {mode} ...", file=sys.stderr, flush=True)
        results[mode] = run_worker(mode, args, peers if mode in PEER_MODES else sys.executable)
    n = len(plan.pairs)
    L = None
    ref = np.asarray(results["promptshift"]["kl"]) if "kl" in results.get("promptshift", {}) else None
    base = results.get("promptshift", {}).get("seconds")
    rows = []
    for mode, r in results.items():
        if "kl" not in r:
            why = f"failed: {r['error']}" if "error" in r else f"not available: {r.get('unavailable')}"
            rows.append(f"| {mode} | {why} | | | | | |")
            continue
        kl = np.asarray(r["kl"])
        L = kl.shape[-1]
        diff = float(np.abs(kl - ref).max()) if ref is not None and ref.shape == kl.shape else float("nan")
        speed = (r["seconds"] / base) if base else float("nan")
        r.update(max_abs_kl_diff_vs_promptshift=diff, seconds_over_promptshift=speed)
        rows.append(f"| {mode} | {n} | {r['seconds']:.1f} | {n / r['seconds']:.3f} | {speed:.2f} | "
                    f"{r['peak_rss_mb']:.0f} | {diff:.1e} |")
    print(f"sweep {args.sweep}: {n} pairs x {L} sites x 2 modes (last, suffix); full-vocabulary KL at the last position")
    print("| mode | pairs | seconds | pairs/s | seconds / promptshift's | peak RSS MB | max abs KL diff vs promptshift |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    for mode, r in results.items():
        if "versions" in r:
            extra = f", {r['api']}" if "api" in r else ""
            print(f"{mode}: {', '.join(f'{k} {v}' for k, v in r['versions'].items())}{extra}; "
                  f"model load {r.get('load_seconds', float('nan')):.1f} s (not timed)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
