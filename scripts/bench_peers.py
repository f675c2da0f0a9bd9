"""Peer implementations for scripts/bench_extract.py, and the reductions every full-output
mode shares, so that the per-pair loop, nnsight and TransformerLens produce the same
outputs as promptshift's extraction:

  * resid_pre, attn_out, mlp_out, resid_post of every layer at the kept (suffix) positions,
    cast to the storage dtype (float16)
  * attention statistics of every layer and head from the attention probabilities:
    region mass, entropy, sink mass, last query row (promptshift's own ``AttnStats.reduce``,
    so the arithmetic is identical and only the way the probabilities are obtained differs)
  * last-position logits: top-k log-probs, entropy, log-sum-exp
  * logit lens of every layer at the last position (final norm + unembedding, top-k,
    entropy, log-prob of the final top-1)

Nothing is written anywhere (like promptshift's ``null`` store); a few check prompts are
kept and saved, so the driver can compare every mode's values with promptshift's store.

nnsight and TransformerLens run every unique prompt of the plan once (each user prompt's
baseline once, not once per pair: the plan lists unique prompts, and any user of either
library would run them once), batched under the sweep's token budget with right padding
and an attention mask. They do not share system-prompt prefixes (neither library has
that); that and the in-layer reduction are what promptshift adds.
"""

from __future__ import annotations

import time

import numpy as np
import torch

COMPS = ("resid_pre", "attn_out", "mlp_out", "resid_post")


def versions(*mods: str) -> dict[str, str]:
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for m in ("torch", "transformers", *mods):
        try:
            out[m] = md.version(m)
        except md.PackageNotFoundError:
            out[m] = "not installed"
    return out


def batches(lengths: list[int], budget: int, n_heads: int) -> list[list[int]]:
    """The same padded batches promptshift would cut for these prompts without shared
    prefixes (its cost-minimising split under the token budget and attention-memory cap),
    so batching is not what separates the modes."""
    from promptshift.extract.batching import plan_batches
    from promptshift.extract.engine import _ATTN_BYTES_BUDGET

    return plan_batches(lengths, budget, bytes_per_qk=4 * n_heads, qk_budget=_ATTN_BYTES_BUDGET)


class Batch:
    """A right-padded batch of plan prompts, with the gather indices of the kept positions
    and a fresh set of attention-statistics accumulators."""

    def __init__(self, plan, prompts: list[int], n_layers: int, n_heads: int):
        from promptshift.extract.attention import AttnStats
        from promptshift.vocabulary import REGIONS

        self.prompts = prompts
        self.lens = [int(plan.prompts.n_tokens.iloc[p]) for p in prompts]
        B, S = len(prompts), max(self.lens)
        self.ids = torch.zeros(B, S, dtype=torch.long)
        q_reg = torch.full((B, S), -1, dtype=torch.long)
        keep = []
        for b, p in enumerate(prompts):
            n = self.lens[b]
            self.ids[b, :n] = torch.as_tensor(plan.prompt_tokens(p).astype(np.int64))
            q_reg[b, :n] = torch.as_tensor(plan.prompt_regions(p).astype(np.int64))
            keep.append(np.arange(int(plan.prompts.keep_start.iloc[p]), n))
        self.mask = (q_reg >= 0).long()
        self.counts = [len(k) for k in keep]
        self.b_idx = torch.as_tensor(np.concatenate([np.full(len(k), b) for b, k in enumerate(keep)]), dtype=torch.long)
        self.s_idx = torch.as_tensor(np.concatenate(keep), dtype=torch.long)
        self.last_q = torch.as_tensor([n - 1 for n in self.lens])
        self.rows = torch.arange(B)
        pos = torch.arange(S).unsqueeze(0).expand(B, S)
        self.stats = AttnStats.allocate(q_reg, q_reg, pos, self.last_q, torch.zeros(B, dtype=torch.long),
                                        n_layers, n_heads, len(REGIONS))

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        return t[self.b_idx, self.s_idx].float()  # (N_keep, H)

    def last(self, t: torch.Tensor) -> torch.Tensor:
        return t[self.rows, self.last_q].float()  # (B, H)


def output_stats(logits: torch.Tensor, normed_last: torch.Tensor, unembed, top_k: int, lens_top_k: int) -> dict:
    """promptshift's own output-side reduction (top-k, entropy, log-sum-exp, logit lens of
    every layer), so every mode does identical arithmetic there; ``unembed``: the model's
    output embedding module (its weight and bias are used)."""
    from promptshift.extract.engine import output_stats as reduce_outputs
    from promptshift.extract.engine import unembed as into

    return reduce_outputs(logits, normed_last, lambda r, out: into(unembed, None, r, out), top_k, lens_top_k,
                          _LENS_WORKSPACE)


_LENS_WORKSPACE: dict = {}  # the lens buffers, reused across batches as promptshift's engine does


class Outputs:
    """Receives finished batches: casts and splits them per prompt as a store would, then
    drops them, keeping only the check prompts' values."""

    def __init__(self, check_prompts=(), dtype=np.float16):
        self.check = set(int(p) for p in check_prompts)
        self.kept: dict[int, dict[str, np.ndarray]] = {}
        self.dtype = dtype
        self.prompts_done = 0

    def add_batch(self, bt: Batch, comps: dict[str, torch.Tensor], outs: dict) -> None:
        """comps: name -> (N_keep, L, H) float tensors in the batch's gather order."""
        st = bt.stats
        split = {c: np.split(v.cpu().numpy().astype(self.dtype), np.cumsum(bt.counts)[:-1]) for c, v in comps.items()}
        rm, en, sk = st.region_mass.numpy(), st.entropy.numpy(), st.sink.numpy()
        qc, sc, lr = st.q_onehot.sum(1).numpy(), st.q_notfirst.sum(1).numpy(), st.last_row.numpy()
        for b, p in enumerate(bt.prompts):
            with np.errstate(invalid="ignore", divide="ignore"):
                denom = np.where(qc[b] > 0, qc[b], np.nan)
                res = {
                    "region_mass": (rm[b] / denom[None, None, :, None]).astype(np.float32),
                    "entropy": (en[b] / denom[None, None, :]).astype(np.float32),
                    "sink": (sk[b] / (sc[b] if sc[b] > 0 else np.nan)).astype(np.float32),
                }
            res["last_row"] = lr[b][..., : bt.lens[b]].transpose(2, 0, 1).astype(self.dtype)  # (n, L, NH)
            for c in split:
                res[c] = split[c][b]
            for k, v in outs.items():
                res[k] = v[b]
            self.prompts_done += 1
            if p in self.check and p not in self.kept:
                self.kept[p] = res

    def add_gen(self, p: int, ids: np.ndarray) -> None:
        """Prompt ``p``'s greedy continuation (token ids, up to and including its
        end-of-sequence token), kept for a check prompt."""
        if p in self.kept:
            self.kept[p]["gen_ids"] = ids

    def save(self, path: str | None) -> None:
        if path:
            np.savez(path, **{f"{p}/{k}": np.asarray(v) for p, r in self.kept.items() for k, v in r.items()})


def _prepare(args, sweep_fn):
    from promptshift.models import materialize, resolve_source
    from promptshift.sweep.plan import build_plan, load_plan_inputs

    s = sweep_fn(args)
    tok, dims = load_plan_inputs(s)
    plan = build_plan(s, tok, dims)
    return s, tok, plan, materialize(resolve_source(s.model))


def _result(plan, seconds: float, load_s: float, out: Outputs, extra: dict) -> dict:
    n = plan.prompts.n_tokens.to_numpy().astype(np.int64)
    pair_tokens = int(sum(n[r.variant] + n[r.baseline] for r in plan.pairs.itertuples()))
    return {"pairs": len(plan.pairs), "tokens": pair_tokens, "seconds": seconds, "load_seconds": load_s,
            "computed_tokens": int(n.sum()), "attn_qk": int((n * (n + 1) // 2).sum()),
            "prompts": out.prompts_done, **extra}


def worker_nnsight(args, sweep_fn) -> dict:
    """nnsight.LanguageModel tracing, one trace per batch; eager attention, because the
    attention module returns its probabilities only there (sdpa returns None)."""
    from nnsight import LanguageModel

    s, tok, plan, loc = _prepare(args, sweep_fn)
    t0 = time.perf_counter()
    lm = LanguageModel(loc, tokenizer=tok, dispatch=True, attn_implementation="eager", dtype=torch.float32)
    hf = lm._module
    hf.eval()
    L, NH = hf.config.num_hidden_layers, hf.config.num_attention_heads
    load_s = time.perf_counter() - t0
    out = Outputs(args.check_prompts)
    lengths = plan.prompts.n_tokens.tolist()
    t0 = time.perf_counter()
    for idx in batches(lengths, s.token_budget, NH):
        bt = Batch(plan, idx, L, NH)
        bufs = {c: [None] * L for c in COMPS}
        last = [None] * L
        with torch.inference_mode(), lm.trace({"input_ids": bt.ids, "attention_mask": bt.mask}):
            for i, layer in enumerate(lm.model.layers):
                bufs["resid_pre"][i] = bt.gather(layer.input).save()
                attn = layer.self_attn.output  # (attn_output, attn_weights)
                bufs["attn_out"][i] = bt.gather(attn[0]).save()
                bt.stats.reduce(i, attn[1].float())  # (B, NH, S, S) probabilities, reduced in the trace
                bufs["mlp_out"][i] = bt.gather(layer.mlp.output).save()
                o = layer.output
                o = o[0] if isinstance(o, tuple) else o
                bufs["resid_post"][i] = bt.gather(o).save()
                last[i] = bt.last(o).save()
            # unembed only the last position of each row
            lm.lm_head.input = bt.last(lm.model.norm.output)[:, None]
            logits = lm.lm_head.output[:, 0].save()
        comps = {c: torch.stack(bufs[c], 1) for c in COMPS}
        with torch.inference_mode():
            normed = hf.model.norm(torch.stack(last, 1))
            outs = output_stats(logits, normed, hf.lm_head, s.top_k, s.lens_top_k)
        out.add_batch(bt, comps, outs)
    el = time.perf_counter() - t0
    out.save(args.check_out)
    return _result(plan, el, load_s, out, {"versions": versions("nnsight"), "attention": "eager"})


def load_tlens(loc, tok, **hf_kwargs):
    """TransformerLens on the local HF model ``loc`` (no hub), raw HF weights (no LayerNorm
    folding or centring, so activations equal the others'): TransformerBridge (4.x, where
    HookedTransformer was removed) or, before it, HookedTransformer without processing.
    ``hf_kwargs`` go to the HF model's ``from_pretrained`` (e.g. ``attn_implementation``).
    Returns (hf model, TransformerLens model, the API used, for the table); raises what
    TransformerLens raises (the callers report it as unavailable)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(loc, dtype=torch.float32, **hf_kwargs).eval()
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:  # TransformerLens < 4
        from transformer_lens import HookedTransformer

        model = HookedTransformer.from_pretrained_no_processing(
            "HuggingFaceTB/SmolLM2-135M-Instruct", hf_model=hf, tokenizer=tok, dtype=torch.float32)
        api = "HookedTransformer.from_pretrained_no_processing(hf_model=...)"
    else:
        model = TransformerBridge.boot_transformers(loc, hf_model=hf, tokenizer=tok, dtype=torch.float32)
        api = "TransformerBridge.boot_transformers(local dir, hf_model=...)"
    return hf, model.eval(), api


def worker_tlens(args, sweep_fn) -> dict:
    """TransformerLens (:func:`load_tlens`, eager attention for the probabilities),
    ``run_with_cache`` with a names filter."""
    s, tok, plan, loc = _prepare(args, sweep_fn)
    t0 = time.perf_counter()
    try:
        hf, model, api = load_tlens(loc, tok, attn_implementation="eager")
    except Exception as e:  # noqa: BLE001 -- reported in the table instead of failing the run
        msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return {"unavailable": msg[:300], "versions": versions("transformer-lens")}
    L, NH = hf.config.num_hidden_layers, hf.config.num_attention_heads
    names = {f"blocks.{i}.{h}" for i in range(L)
             for h in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post", "attn.hook_pattern")}
    load_s = time.perf_counter() - t0
    out = Outputs(args.check_prompts)
    lengths = plan.prompts.n_tokens.tolist()
    t0 = time.perf_counter()
    for idx in batches(lengths, s.token_budget, NH):
        bt = Batch(plan, idx, L, NH)
        with torch.inference_mode():
            # stop after the last block: the final norm and unembedding run on the last positions only
            resid, cache = model.run_with_cache(bt.ids, attention_mask=bt.mask, names_filter=lambda n: n in names,
                                                stop_at_layer=L)
            comps = {c: torch.stack([bt.gather(cache[f"blocks.{i}.hook_{c}"]) for i in range(L)], 1) for c in COMPS}
            for i in range(L):
                bt.stats.reduce(i, cache[f"blocks.{i}.attn.hook_pattern"].float())
            last = torch.stack([bt.last(cache[f"blocks.{i}.hook_resid_post"]) for i in range(L)], 1)  # (B, L, H)
            normed = hf.model.norm(last)
            outs = output_stats(hf.lm_head(normed[:, -1]), normed, hf.lm_head, s.top_k, s.lens_top_k)
            del cache, resid
        out.add_batch(bt, comps, outs)
    el = time.perf_counter() - t0
    out.save(args.check_out)
    return _result(plan, el, load_s, out, {"versions": versions("transformer-lens"), "api": api,
                                           "attention": "eager"})
