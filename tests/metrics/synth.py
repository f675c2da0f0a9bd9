"""A synthetic store with known values, built without a model: a real plan (embedded
tokenizer, real chat template and regions) with tiny fake dimensions, filled with random
activations and with attention statistics reduced from full random attention matrices
exactly as extraction reduces them, so references can use the full matrices."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from promptshift.store.core import Store, empty_block, resid_pre_derived, stored_name
from promptshift.sweep.config import SweepConfig, SystemPrompt, UserPrompt
from promptshift.sweep.plan import ModelDims, build_plan
from promptshift.vocabulary import REGIONS

DIMS = ModelDims(n_layers=3, hidden=8, n_heads=2, vocab=50, max_positions=None)
R = len(REGIONS)


def sweep_config(keep: str = "suffix", max_new_tokens: int = 5) -> SweepConfig:
    return SweepConfig(
        name="synth",
        system_prompts=[
            SystemPrompt("brief", "Be brief.", ("concise",), family="concise", level="short"),
            SystemPrompt("pirate", "You are a pirate. Speak like one in every answer, matey.", ("persona", "tone")),
            SystemPrompt("brief_long", "Be brief. Answer in as few words as you can, and never explain.",
                         ("concise",), family="concise", level="medium"),
            SystemPrompt("brief_longer", "Be brief. Answer in as few words as you can, never explain, never greet, "
                         "and never add a closing remark.", ("concise", "constraint"), family="concise", level="long"),
        ],
        user_prompts=[
            # attributes: the extra fields of a notebook prompt file (a missing one is None)
            UserPrompt("capital", "What is the capital of France?", "factual", attributes={"difficulty": "easy"}),
            UserPrompt("add", "What is 2 + 3?", "reasoning", attributes={"difficulty": 2, "type": ["math", "sum"]}),
            UserPrompt("poem", "Write a short poem about rain.", "creative"),
            UserPrompt("color", "Name a color.", "factual"),
        ],
        keep=keep, storage_dtype="float32", block_prompts=4, max_new_tokens=max_new_tokens, top_k=8, lens_top_k=4,
    )


def _attention(rng, n: int, L: int, NH: int) -> np.ndarray:
    """(L, NH, n, n) causal attention probabilities; head 1 leans on token 0 (a sink)."""
    s = rng.normal(0.0, 1.5, size=(L, NH, n, n))
    s[:, 1, :, 0] += 3.0
    s = np.where(np.tril(np.ones((n, n), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def _reduce(A: np.ndarray, reg: np.ndarray):
    """The statistics extraction stores, from full matrices A (L, NH, n, n)."""
    L, NH, n, _ = A.shape
    qo = (reg[:, None] == np.arange(R)).astype(np.float64)  # (n, R)
    to_region = A @ qo  # (L, NH, n, R)
    counts = qo.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        rm = np.einsum("lhqk,qs->lhsk", to_region, qo) / counts[None, None, :, None]  # (L, NH, R, R)
        ent_q = -(np.where(A > 0, A * np.log(np.clip(A, 1e-30, None)), 0.0)).sum(-1)  # (L, NH, n)
        ent = np.einsum("lhq,qs->lhs", ent_q, qo) / counts
        sink = A[:, :, 1:, 0].mean(-1) if n > 1 else np.full((L, NH), np.nan)
    return rm, ent, sink


def _dist(rng, V: int, temp: float):
    logits = rng.normal(0.0, temp, size=V)
    logits[rng.integers(V)] += 4.0
    lp = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    return lp


def build(path: str | Path | None, keep: str = "suffix", fmt: str = "zarr", seed: int = 0, tok=None,
          max_new_tokens: int = 5, sweep: SweepConfig | None = None, replies=None):
    """Create and fill a store; returns (store, truth) where truth holds the full attention
    matrices and full next-token / lens log-distributions per prompt. ``sweep`` replaces
    :func:`sweep_config`; ``replies(system, user_id) -> (text, finished)`` sets each prompt's
    continuation text (finished: shorter than the budget; unfinished: the whole budget)."""
    if tok is None:
        from promptshift.models import load_tokenizer

        tok = load_tokenizer()
    sweep = sweep or sweep_config(keep, max_new_tokens)
    max_new_tokens = sweep.gen_tokens
    plan = build_plan(sweep, tok, DIMS)
    store = Store.create(path, plan, provenance={"model_id": "synthetic", "storage_dtype": "float32"}, fmt=fmt,
                         overwrite=True)
    rng = np.random.default_rng(seed)
    L, H, NH, V = DIMS.n_layers, DIMS.hidden, DIMS.n_heads, DIMS.vocab
    emb = rng.normal(size=(V + 60000, H)).astype(np.float32)  # token embeddings (real tokenizer ids)
    direction = rng.normal(size=(L, H)) * 3.0  # shared offset: raw cosines near 1 (anisotropy)
    pr = plan.prompts
    truth = {"attn": {}, "logp": {}, "lens_logp": {}}
    gens = {}
    for b, blk in plan.blocks.iterrows():
        ps = list(range(int(blk.prompt_start), int(blk.prompt_end)))
        data = empty_block(plan, b)
        for c in sweep.components:
            data[stored_name(plan, c)][:] = 7.0  # padding rows: garbage the metrics must never read
        for j, p in enumerate(ps):
            row = pr.iloc[p]
            n, ks = int(row.n_tokens), int(row.keep_start)
            ids = plan.prompt_tokens(p)
            reg = plan.prompt_regions(p).astype(np.int64)
            kept = np.arange(ks, n)
            k0 = int(row.kept_start - blk.kept_start)
            xs = {}
            for c in sweep.components:
                xs[c] = rng.normal(size=(len(kept), L, H)) + direction[None]
                if c == "resid_pre":  # layer 0 input is the token embedding: equal at aligned tokens
                    xs[c][:, 0] = emb[ids[kept]]
            if resid_pre_derived(plan):  # a layer's input is the previous layer's output
                xs["resid_pre"][:, 1:] = xs["resid_post"][:, :-1]
            for c, x in xs.items():
                name = stored_name(plan, c)
                data[name][k0 : k0 + len(kept)] = (x if name == c else x[:, 0]).astype(np.float32)
            A = _attention(rng, n, L, NH)
            truth["attn"][p] = A
            rm, ent, sink = _reduce(A, reg)
            data["attn_region_mass"][j], data["attn_entropy"][j], data["attn_sink"][j] = rm, ent, sink
            y0 = int(row.key_start - blk.key_start)
            data["attn_last"][y0 : y0 + n] = A[:, :, n - 1, :].transpose(2, 0, 1).astype(np.float16)
            lp = _dist(rng, V, 1.0 + 0.5 * (p % 3))
            truth["logp"][p] = lp
            top = np.argsort(-lp, kind="stable")[: sweep.top_k]
            data["logits_topk_ids"][j], data["logits_topk_logprobs"][j] = top, lp[top]
            data["logits_entropy"][j] = -(np.exp(lp) * lp).sum()
            data["logits_lse"][j] = float(rng.normal())
            if "logits_logprobs" in data:  # sweeps keep the whole distribution by default
                data["logits_logprobs"][j] = lp
            lens = np.stack([_dist(rng, V, 2.0 - 0.5 * l) for l in range(L)])  # (L, V)
            truth["lens_logp"][p] = lens
            lt = np.argsort(-lens, axis=1, kind="stable")[:, : sweep.lens_top_k]
            data["lens_topk_ids"][j] = lt
            data["lens_topk_logprobs"][j] = np.take_along_axis(lens, lt, 1)
            data["lens_entropy"][j] = -(np.exp(lens) * lens).sum(1)
            data["lens_final_top1_logprob"][j] = lens[:, top[0]]
            if max_new_tokens:
                # variants of one user prompt sometimes repeat the baseline's continuation
                u = row.user_id
                if row.kind == "variant" and u in gens and rng.random() < 0.4:
                    g = gens[u].copy()
                    if rng.random() < 0.5 and len(g) > 1:
                        g[-1] = (g[-1] + 1) % V
                else:
                    g = rng.integers(0, V, size=int(rng.integers(0, max_new_tokens + 1))).astype(np.int32)
                if row.kind == "baseline":
                    gens[u] = g
                data["gen_ids"][j, : len(g)] = g
                data["gen_len"][j] = len(g)
                data["gen_text"][j] = " ".join(f"t{t}" for t in g)
                if replies is not None:
                    text, fin = replies(row.system, row.user_id)
                    n = max_new_tokens if not fin else int(rng.integers(1, max_new_tokens))
                    data["gen_ids"][j] = -1
                    data["gen_ids"][j, :n] = rng.integers(0, V, size=n)
                    data["gen_len"][j], data["gen_text"][j] = n, text
        store.write_block(int(b), data)
    return store, truth
