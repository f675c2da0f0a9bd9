"""Greedy decoding (promptshift/extract/decode.py) against Hugging Face ``generate``, one
prompt at a time, where one decode batch mixes rows of several shared prefixes (attended
once per prefix) and rows without one, and rows stop at different steps (finished rows
are compacted out of the batch): right and left padding, packed and padded prompt passes,
a sliding-window model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import promptshift.extract.decode as decode
from promptshift.extract.run import ExtractConfig, extract
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
    free = extract(load_sweep(path), ExtractConfig(**cfg), model=model, tok=tok)
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
    st = extract(load_sweep(path), ExtractConfig(**cfg), model=model, tok=tok)
    assert any((g >= 0).any() and (g < 0).any() for g in merged), "no decode batch mixed prefixed and plain rows"
    assert any(len(set(g[g >= 0].tolist())) >= 2 for g in merged), "no decode batch held two shared prefixes"
    assert compacted and all(k < n for n, k in compacted), "finished rows were never dropped from a decode batch"
    glen = st.array("gen_len")[...]
    assert glen.min() < NEW and (glen < NEW).sum() >= 3, "the stop tokens must end several rows early"
    for p in range(st.plan.n_prompts):
        ref = _generate(model, st.plan.prompt_tokens(p), eos)
        n = int(glen[p])
        assert n == len(ref) and np.array_equal(st.array("gen_ids")[p, :n], ref), p
