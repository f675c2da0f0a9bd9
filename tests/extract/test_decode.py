"""Greedy decoding (promptshift/extract/decode.py) against Hugging Face ``generate``, one
prompt at a time, where one decode batch mixes rows of several shared prefixes (attended
once per prefix) and rows without one, and rows stop at different steps (finished rows
are compacted out of the batch): right and left padding, packed and padded prompt passes,
a sliding-window model; and one decode step's cascade attention against plain attention
over each row's keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import promptshift.extract.decode as decode
from promptshift.extract.worker import ExtractConfig, fill_shard
from promptshift.sweep.config import load_sweep
from tests.conftest import tiny_llama, write_sweep
from tests.extract.test_sliding import LONG, _model

NEW = 10


def _generate(model, ids, eos):
    x = torch.as_tensor(ids, dtype=torch.long)[None]
    with torch.no_grad():
        return model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW, do_sample=False,
                              pad_token_id=eos[0], eos_token_id=list(eos))[0, x.shape[1]:].numpy()


def _stop_tokens(gen: np.ndarray, n: int = 3) -> list[int]:
    """Tokens that end many continuations early, at different steps: the most common tokens
    at steps 1..NEW-2 (a row that meets one stops there)."""
    inner = gen[:, 1 : NEW - 1]
    vals, counts = np.unique(inner, return_counts=True)
    return [int(v) for v in vals[np.argsort(-counts, kind="stable")][:n]]


@pytest.mark.parametrize("family,options", [
    ("llama", {}),
    ("llama", {"packing": False, "padding_side": "left"}),
    ("mistral", {}),  # sliding window 24, shorter than the long system prompt
])
def test_continuations_with_early_stops_match_generate(family, options, tok, tmp_path, monkeypatch):
    model = tiny_llama(tok) if family == "llama" else _model("mistral", len(tok), 24)
    systems = [{"name": "long", "text": LONG}, {"name": "brief", "text": "Be brief."},
               {"name": "french", "text": "Always answer in French."}]
    # blocks of 5 prompts cut the groups of a system prompt: blocks mix shared prefixes and rows without one
    path = write_sweep(tmp_path / "s.yaml", systems=systems, max_new_tokens=NEW, block_prompts=5, keep="last",
                       storage_dtype="float32", top_k=4, lens_top_k=2)
    cfg = dict(store=None, progress=False, selfcheck=False, min_shared=2, **options)
    free = fill_shard(load_sweep(path), ExtractConfig(**cfg), model=model, tok=tok)
    eos = [tok.eos_token_id, *_stop_tokens(free.array("gen_ids")[...])]
    model.generation_config.eos_token_id = eos

    merged, compacted = [], []
    orig_merge, orig_compact = decode._merge, decode._compact

    def merge(*a, **k):
        out = orig_merge(*a, **k)
        merged.append(out[1].group.clone())
        return out

    def compact(cache, dec, keep):
        compacted.append((len(dec.group), len(keep)))
        return orig_compact(cache, dec, keep)

    monkeypatch.setattr(decode, "_merge", merge)
    monkeypatch.setattr(decode, "_compact", compact)
    st = fill_shard(load_sweep(path), ExtractConfig(**cfg), model=model, tok=tok)
    assert any((g >= 0).any() and (g < 0).any() for g in merged), "no decode batch mixed prefixed and plain rows"
    assert any(len(set(g[g >= 0].tolist())) >= 2 for g in merged), "no decode batch held two shared prefixes"
    assert compacted and all(k < n for n, k in compacted), "finished rows were never dropped from a decode batch"
    glen = st.array("gen_len")[...]
    assert glen.min() < NEW and (glen < NEW).sum() >= 3, "the stop tokens must end several rows early"
    for p in range(st.plan.n_prompts):
        ref = _generate(model, st.plan.prompt_tokens(p), eos)
        n = int(glen[p])
        assert n == len(ref) and np.array_equal(st.array("gen_ids")[p, :n], ref), p


@pytest.mark.parametrize("window,softcap", [(None, None), (4, None), (None, 5.0)])
def test_cascade_attention_equals_attention_over_each_rows_keys(window, softcap):
    """One decode step of :class:`Decoding` (each shared prefix attended once for all its
    rows, groups of unequal size, a row without a prefix, grouped-query heads) against plain
    softmax attention, row by row, over the row's prefix keys followed by its own keys, in
    float64, with the causal and sliding-window rule by position."""
    from types import SimpleNamespace

    from promptshift.extract.attention import Decoding

    g = torch.Generator().manual_seed(0)
    NKV, rep, D, T = 2, 3, 8, 6
    plens = [7, 4]  # two shared prefixes
    group = torch.tensor([0, 1, -1, 0, 1, 0])  # (B,): group 0 has three rows, group 1 two, row 2 none
    own = [3, 5, 2, 4, 1, 3]  # own keys per row; the last is this step's token
    B, Pm = len(group), max(plens)
    kp, vp = torch.randn(2, NKV, Pm, D, generator=g), torch.randn(2, NKV, Pm, D, generator=g)
    key, value = torch.randn(B, NKV, T, D, generator=g), torch.randn(B, NKV, T, D, generator=g)
    query = torch.randn(B, NKV * rep, 1, D, generator=g)
    key_pos = torch.full((B, Pm + T), -1, dtype=torch.long)
    q_pos = torch.zeros(B, dtype=torch.long)
    for b in range(B):
        o = plens[group[b]] if group[b] >= 0 else 0
        key_pos[b, :o] = torch.arange(o)
        key_pos[b, Pm : Pm + own[b]] = o + torch.arange(own[b])
        q_pos[b] = o + own[b] - 1
    dec = Decoding([(kp, vp)], group, key_pos, (window,))
    dec.step(q_pos)
    scale = D**-0.5
    got = dec.attend(SimpleNamespace(layer_idx=0), query, key, value, scale, softcap, None)  # (B, 1, NH, D)

    eps = torch.finfo(torch.float32).eps
    for b in range(B):
        o = plens[group[b]] if group[b] >= 0 else 0
        for h in range(NKV * rep):
            kv = h // rep  # head h reads key/value head h // rep (transformers' repeat_kv)
            ks = [kp[group[b], kv, :o]] if o else []
            vs = [vp[group[b], kv, :o]] if o else []
            k = torch.cat([*ks, key[b, kv, : own[b]]]).double()  # (n, D)
            v = torch.cat([*vs, value[b, kv, : own[b]]]).double()
            pos = torch.arange(o + own[b])
            s = k @ query[b, h, 0].double() * scale  # (n,)
            if softcap is not None:
                s = torch.tanh(s / softcap) * softcap
            ok = pos <= q_pos[b]
            if window is not None:
                ok &= q_pos[b] - pos < window
            p = torch.softmax(s.masked_fill(~ok, -torch.inf), 0)
            ref = p @ v  # (D,)
            # float32 bound: each score is a D-term dot product (error <= D eps sum|q||k|), which
            # exp turns into that relative error of each weight; the softmax sum and the weighted
            # sum of n values add n eps relative each, on a scale of max |v|
            n = len(pos)
            err_s = D * eps * float((k.abs() @ query[b, h, 0].double().abs()).max()) * scale
            tol = (2 * err_s + 2 * n * eps) * float(v.abs().max())
            assert float((got[b, 0, h].double() - ref).abs().max()) <= tol, (b, h)
