"""Extraction against independent references: one prompt at a time, Hugging Face's own
hidden states / attentions / logits / generate, and the residual-stream sum identity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from promptshift.extract.worker import ExtractConfig, fill_shard
from promptshift.sweep.config import load_sweep
from promptshift.vocabulary import REGION_CODE, REGIONS
from tests.conftest import write_sweep
from tests.tolerance import (U32, array_bound, assert_below, assert_within, forward_bound, logit_scale_of,
                             logprob_bound, logsoftmax_rounding)

FLOAT_ARRAYS = ("resid_pre", "attn_out", "mlp_out", "resid_post", "attn_region_mass", "attn_entropy", "attn_sink",
                "attn_last", "logits_topk_logprobs", "logits_entropy", "logits_lse", "lens_topk_logprobs",
                "lens_entropy", "lens_final_top1_logprob", "logits_logprobs")


@pytest.fixture(scope="module")
def sweep_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("sw")
    return write_sweep(d / "tiny.yaml", keep="all", storage_dtype="float32", max_new_tokens=6, block_prompts=5,
                       top_k=16, lens_top_k=4)


def _extract(sweep_path, tok, model, store, **kw):
    """Extraction with prefix sharing from groups of 2 on (the tiny sweep has 3 user prompts
    per system prompt), unless the test says otherwise."""
    kw.setdefault("min_shared", 2)
    s = load_sweep(sweep_path, **{k: v for k, v in kw.items() if k in ("token_budget",)})
    cfg = ExtractConfig(store=store, progress=False, **{k: v for k, v in kw.items() if k != "token_budget"})
    return fill_shard(s, cfg, model=model, tok=tok)


@pytest.fixture(scope="module")
def batched(sweep_path, tok, tiny_model):
    return _extract(sweep_path, tok, tiny_model, None)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_batched_equals_one_prompt_at_a_time(sweep_path, tok, tiny_model, padding_side):
    """Every stored array: big batches + shared prefixes vs batches of one, no sharing."""
    a = _extract(sweep_path, tok, tiny_model, None, padding_side=padding_side)
    b = _extract(sweep_path, tok, tiny_model, None, prefix_sharing=False, token_budget=16)
    assert a.plan.hash() == b.plan.hash()
    _assert_stores_close(a, b, tiny_model)
    for name in ("logits_topk_ids", "lens_topk_ids", "gen_ids", "gen_len"):
        assert np.array_equal(a.array(name)[...], b.array(name)[...]), name
    assert list(a.array("gen_text")[...]) == list(b.array("gen_text")[...])
    # the sampled self-check recorded in the store agrees: a largest difference relative to
    # the largest value of each array, which the activations' bound at scale 1 covers
    assert np.nanmax(a.array("block_selfcheck")[...]) <= forward_bound(tiny_model.config, _n_keys(a), 1.0)


def _n_keys(st) -> int:
    return int(st.plan.prompts.n_tokens.max())


def _assert_stores_close(a, b, model, names=FLOAT_ARRAYS):
    """Every float array of two stores of the same plan within its float rounding bound
    (tests/tolerance.py)."""
    ls = logit_scale_of(b)
    for name in names:
        y = b.array(name)[...]
        bound = array_bound(name, y, model.config, _n_keys(b), vocab=b.plan.dims.vocab, logit_scale=ls,
                            float16=np.asarray(y).dtype == np.float16)
        assert_within(a.array(name)[...], y, bound, name)


def _assert_results_close(got, ref, model, n_keys, names):
    """Engine Results of the same prompt within the float rounding bound of each field."""
    for x, y in zip(got, ref):
        ls = abs(y.lse) + float(np.abs(y.topk_logprobs).max())
        for name in names:
            v = np.asarray(getattr(y, name), np.float64)
            bound = array_bound(name, v, model.config, n_keys, vocab=model.config.vocab_size, logit_scale=ls,
                                float16=name == "pattern")  # full patterns are kept as float16
            assert_within(getattr(x, name), v, bound, name)
        for name in y.comps:
            assert_within(x.comps[name], y.comps[name],
                          array_bound(name, y.comps[name], model.config, n_keys, vocab=1, logit_scale=0.0), name)


def test_prefix_sharing_is_used(sweep_path, tok, tiny_model):
    """Shared prefixes are computed once per block, and one batch mixes the suffixes of
    different prefixes (each row attending to its own cached prefix), with the same values
    as the stored extraction and as a run without sharing."""
    from promptshift.extract.engine import Engine
    from promptshift.extract.worker import BlockExtractor

    st = _extract(sweep_path, tok, tiny_model, None)
    eng = Engine(tiny_model, components=st.components, top_k=16, lens_top_k=4, token_budget=4096)
    computed, batches = [], []
    orig_prefixes, orig_run = eng.compute_prefixes, eng.extract_batch
    eng.compute_prefixes = lambda specs: computed.extend(len(s[0]) for s in specs) or orig_prefixes(specs)
    eng.extract_batch = lambda items, prefix=None, *a, **k: batches.append(prefix) or orig_run(items, prefix, *a, **k)
    b = st.plan.blocks.iloc[0]
    ref = np.asarray(st.array("resid_post")[int(b.kept_start) : int(b.kept_end)], np.float64)
    rows = st.plan.prompts.iloc[int(b.prompt_start) : int(b.prompt_end)]
    n_groups = int((rows.groupby("system").size() >= 2).sum())
    assert n_groups >= 2, "the test needs a block with two shared prefixes"

    data, _, _ = BlockExtractor(eng, st.plan, tok, min_shared=2).compute(0)
    assert len(computed) == n_groups, "each shared prefix of the block is computed exactly once"
    mixed = [pre for pre in batches if isinstance(pre, list) and len({id(x) for x in pre if x is not None}) >= 2]
    assert mixed, "no batch mixed the suffixes of different prefixes"
    bound = array_bound("resid_post", ref, tiny_model.config, _n_keys(st), vocab=1, logit_scale=0.0)
    assert_within(data["resid_post"], ref, bound, "resid_post")

    # groups smaller than min_shared run whole, with the same values
    computed.clear()
    data, _, _ = BlockExtractor(eng, st.plan, tok, min_shared=99).compute(0)
    eng.remove_hooks()
    assert not computed
    assert_within(data["resid_post"], ref, bound, "resid_post")


def test_mixed_prefix_batch_equals_each_prompt_alone(tok, tiny_model):
    """Rows continuing prefixes of different lengths, and rows with no prefix, in one batch,
    against each prompt run alone: every output of the PromptResult."""
    from promptshift.extract.engine import Engine, Item
    from promptshift.vocabulary import REGION_CODE

    rng = np.random.default_rng(0)
    V = tiny_model.config.vocab_size
    eng = Engine(tiny_model, components=("resid_pre", "attn_out", "mlp_out", "resid_post"), top_k=8, lens_top_k=3,
                 token_budget=4096, full_attention_layers=(1,))
    try:
        def item(i, n_sys, n_user):
            ids = rng.integers(5, V, n_sys + n_user)
            reg = np.r_[np.full(n_sys, REGION_CODE["system"]), np.full(n_user, REGION_CODE["user"])].astype(np.int8)
            return Item(i, ids, reg, n_sys - 2)

        a, b = item(0, 9, 5), item(1, 4, 7)
        pa, pb = eng.compute_prefixes([(a.ids[:9], a.regions[:9], 7), (b.ids[:4], b.regions[:4], 2)])
        # a second prompt on each prefix, and one without a shared prefix
        a2 = Item(2, np.r_[a.ids[:9], rng.integers(5, V, 3)], np.r_[a.regions[:9], np.full(3, 1, np.int8)], 7)
        c = item(3, 6, 6)
        items, pres = [a, b, a2, c], [pa, pb, pa, None]
        got = eng.extract_batch(items, pres, max_new_tokens=4, eos_ids=())
        n_keys = max(len(it.ids) for it in items)
        for it, g in zip(items, got):
            ref = eng.extract_batch([it], None, max_new_tokens=4, eos_ids=())[0]
            _assert_results_close([g], [ref], tiny_model, n_keys, ("region_mass", "entropy", "sink", "last_row",
                                                                    "topk_logprobs", "lens_logprobs", "lens_entropy",
                                                                    "pattern"))
            assert np.array_equal(g.topk_ids, ref.topk_ids)
            assert np.array_equal(g.gen_ids, ref.gen_ids)
    finally:
        eng.remove_hooks()


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_packed_batch_equals_padded_batch(tok, tiny_model, padding_side):
    """Packed batches (the real tokens as one sequence outside attention) against the same
    batches padded: every output of the PromptResult, with mixed prefixes, rows without one,
    opted-in full patterns and greedy continuations on the packed pass's cache."""
    from promptshift.extract.engine import Engine, Item
    from promptshift.vocabulary import REGION_CODE

    rng = np.random.default_rng(1)
    V = tiny_model.config.vocab_size

    def item(i, n_sys, n_user, keep):
        ids = rng.integers(5, V, n_sys + n_user)
        reg = np.r_[np.full(n_sys, REGION_CODE["system"]), np.full(n_user, REGION_CODE["user"])].astype(np.int8)
        return Item(i, ids, reg, keep)

    a, b, c = item(0, 11, 4, 9), item(1, 5, 9, 3), item(2, 7, 2, 0)
    a2 = Item(3, np.r_[a.ids[:11], rng.integers(5, V, 6)], np.r_[a.regions[:11], np.full(6, 1, np.int8)], 9)
    seen = []
    h = tiny_model.model.embed_tokens.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    got = {}
    try:
        for packed in (False, True):
            eng = Engine(tiny_model, components=("resid_pre", "attn_out", "mlp_out", "resid_post"), top_k=8,
                         lens_top_k=3, token_budget=4096, full_attention_layers=(1,), padding_side=padding_side,
                         packed=None if packed else False)
            try:
                assert eng.packed is packed
                pa, pb = eng.compute_prefixes([(a.ids[:11], a.regions[:11], 9), (b.ids[:5], b.regions[:5], 3)])
                seen.clear()
                got[packed] = eng.extract_batch([a, b, c, a2], [pa, pb, None, pa], max_new_tokens=4, eos_ids=())
                # the batch's first forward: padded (4 rows x longest) or packed (1 x real tokens)
                assert seen[0] == ((1, 4 + 9 + 9 + 6) if packed else (4, 9))
            finally:
                eng.remove_hooks()
    finally:
        h.remove()
    n_keys = max(len(a2.ids), len(b.ids), len(c.ids))
    _assert_results_close(got[True], got[False], tiny_model, n_keys,
                          ("region_mass", "entropy", "sink", "last_row", "topk_logprobs", "lens_logprobs",
                           "lens_entropy", "lens_final_top1", "pattern"))
    for x, y in zip(got[True], got[False]):
        assert np.array_equal(x.topk_ids, y.topk_ids) and np.array_equal(x.lens_ids, y.lens_ids)
        assert np.array_equal(x.gen_ids, y.gen_ids)


def test_residual_sum_identity(batched):
    pre, post = batched.array("resid_pre")[...], batched.array("resid_post")[...]
    attn, mlp = batched.array("attn_out")[...], batched.array("mlp_out")[...]
    real = np.asarray(batched.array("token_prompt")[...]) >= 0
    pre, post, attn, mlp = pre[real], post[real], attn[real], mlp[real]  # (T, L, H)
    # the identity is the decoder layer's own two additions, in float32: pre + attn rounds
    # once, + mlp once, and our float64 re-addition does not round: |error| <= 2 u |terms|
    err = np.abs(post.astype(np.float64) - (pre.astype(np.float64) + attn + mlp))
    assert_below(err, 2 * U32 * (1 + U32) * (np.abs(pre) + np.abs(attn) + np.abs(mlp)), "sum identity")


def test_residual_chain_is_checked_before_writing(sweep_path, tok, tiny_model, tmp_path):
    """The store keeps resid_pre at layer 0 only because a layer's input is bit for bit the
    previous layer's output. Captured at every layer, that holds; a model that changes the
    residual stream between layers is refused before a store exists."""
    from promptshift.errors import ExtractError
    from promptshift.extract.engine import Engine, Item

    sweep = load_sweep(sweep_path)
    eng = Engine(tiny_model, components=("resid_pre", "resid_post"), top_k=4, lens_top_k=2, token_budget=256)
    try:
        ids = np.array([1, 50, 70, 90, 110, 130], np.int64)
        r = eng.extract_batch([Item(0, ids, np.zeros(len(ids), np.int8), 0)])[0]
        pre, post = r.comps["resid_pre"], r.comps["resid_post"]  # (6, L, H), every layer captured
        assert pre.shape == post.shape and np.array_equal(pre[:, 1:], post[:, :-1])
        eng.check_residual_chain()
        # a pre-hook that shifts layer 1's input: the input of layer 1 is no longer layer 0's output
        h = eng.arch.layers[1].register_forward_pre_hook(lambda m, a: (a[0] + 1e-3, *a[1:]), prepend=True)
        try:
            with pytest.raises(ExtractError, match="resid_pre of layer 1 differs from resid_post of layer 0"):
                eng.check_residual_chain()
        finally:
            h.remove()
    finally:
        eng.remove_hooks()
    h = tiny_model.model.layers[2].register_forward_pre_hook(lambda m, a: (a[0] * 1.01, *a[1:]), prepend=True)
    try:
        with pytest.raises(ExtractError, match="changes the residual stream between layers"):
            fill_shard(sweep, ExtractConfig(store=tmp_path / "s.zarr", progress=False), model=tiny_model, tok=tok)
    finally:
        h.remove()
    assert not (tmp_path / "s.zarr").exists()


def test_matches_hf_hidden_states_logits_and_attentions(batched, tiny_model):
    plan = batched.plan
    p = int(plan.pairs.iloc[0].variant)
    ids = torch.as_tensor(plan.prompt_tokens(p), dtype=torch.long)[None]
    tiny_model.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            out = tiny_model(ids, output_hidden_states=True, output_attentions=True)
    finally:
        tiny_model.config._attn_implementation = "promptshift"
    hs = [h[0].numpy() for h in out.hidden_states]  # L+1 x (S, H)
    L = len(hs) - 1
    pos = plan.kept_positions(p)
    post = batched.component("resid_post", p)  # (n_kept, L, H)
    pre = batched.component("resid_pre", p)
    cfg, n = tiny_model.config, ids.shape[1]
    for layer in range(L):
        assert_within(pre[:, layer], hs[layer][pos], forward_bound(cfg, n, np.abs(hs[layer]).max(), layer), layer)
    for layer in range(L - 1):
        assert_within(post[:, layer], hs[layer + 1][pos], forward_bound(cfg, n, np.abs(hs[layer + 1]).max(), layer + 1),
                      layer)
    # HF's last hidden state is after the final norm; ours is the raw residual stream.
    normed = tiny_model.model.norm(torch.as_tensor(post[:, L - 1])).detach().numpy()
    assert_within(normed, hs[L][pos], forward_bound(cfg, n, np.abs(hs[L]).max()), "final norm")
    assert np.abs(post[:, L - 1] - hs[L][pos]).max() > 100 * forward_bound(cfg, n, np.abs(hs[L]).max())

    # next-token log-probs
    logp = torch.log_softmax(out.logits[0, -1], -1).numpy()
    ids_k = batched.array("logits_topk_ids")[p]
    lp_bound = logprob_bound(cfg, n, float(out.logits[0, -1].abs().max()), float(np.abs(logp[ids_k]).max()), len(logp))
    assert_within(batched.array("logits_topk_logprobs")[p], logp[ids_k], lp_bound, "log-probs")
    assert ids_k[0] == logp.argmax()
    # the whole vocabulary: the same bound, at the largest |log-prob| of any token
    full_bound = logprob_bound(cfg, n, float(out.logits[0, -1].abs().max()), float(np.abs(logp).max()), len(logp))
    assert_within(batched.array("logits_logprobs")[p], logp, full_bound, "whole log-probs")

    # attention statistics from the full eager attention matrices
    reg = plan.prompt_regions(p)
    onehot = np.eye(len(REGIONS))[reg]  # (S, R)
    for layer, att in enumerate(out.attentions):
        a = att[0].numpy()  # (NH, S, S)
        to_region = a @ onehot  # (NH, S, R)
        counts = onehot.sum(0)
        ref = np.einsum("hqr,qs->hsr", to_region, onehot) / np.where(counts > 0, counts, np.nan)[None, :, None]
        bound = lambda name, ref: array_bound(name, ref, cfg, n, vocab=len(logp), logit_scale=0.0,  # noqa: E731
                                              float16=batched.array(name).dtype == np.float16)
        assert_within(batched.array("attn_region_mass")[p, layer], ref, bound("attn_region_mass", ref), "mass")
        last = a[:, -1, :].T  # (S, NH)
        assert_within(batched.attn_last_row(p)[:, layer], last, bound("attn_last", last), "last row")
        sink_ref = a[:, 1:, 0].mean(-1)
        assert_within(batched.array("attn_sink")[p, layer], sink_ref, bound("attn_sink", sink_ref), "sink")
        ent = -(a * np.log(np.clip(a, 1e-30, None))).sum(-1)  # (NH, S)
        u = reg == REGION_CODE["user"]
        ent_u = ent[:, u].mean(-1)
        assert_within(batched.array("attn_entropy")[p, layer, :, REGION_CODE["user"]], ent_u,
                      bound("attn_entropy", ent_u), "entropy")


def test_generation_matches_hf_generate(batched, tiny_model, tok):
    plan = batched.plan
    for p in (0, int(plan.pairs.iloc[-1].variant)):
        ids = torch.as_tensor(plan.prompt_tokens(p), dtype=torch.long)[None]
        with torch.no_grad():
            ref = tiny_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                      pad_token_id=tok.eos_token_id)[0, ids.shape[1]:].numpy()
        n = int(batched.array("gen_len")[p])
        got = batched.array("gen_ids")[p, :n]
        assert np.array_equal(got, ref[:n])


def test_longer_continuation_for_behaviour(tmp_path, tok, tiny_model):
    """`behaviour.max_new_tokens` lengthens the stored continuation (HF generate is the
    reference); the output-change columns still compare the first `max_new_tokens` tokens.
    Without `full_logprobs` the store has no whole distributions and the exact columns are NaN."""
    from promptshift.metrics import compute

    p = write_sweep(tmp_path / "beh.yaml", max_new_tokens=3, behaviour={"max_new_tokens": 9}, full_logprobs=False,
                    storage_dtype="float32", block_prompts=6)
    st = fill_shard(load_sweep(p), ExtractConfig(store=None, progress=False), model=tiny_model, tok=tok)
    assert st.array("gen_ids").shape[1] == 9 and "logits_logprobs" not in st.names()
    assert st.provenance["eos_token_ids"] == [tok.eos_token_id]
    for q in (0, int(st.plan.pairs.iloc[-1].variant)):
        ids = torch.as_tensor(st.plan.prompt_tokens(q), dtype=torch.long)[None]
        with torch.no_grad():
            ref = tiny_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=9, do_sample=False,
                                      pad_token_id=tok.eos_token_id)[0, ids.shape[1]:].numpy()
        n = int(st.array("gen_len")[q])
        assert n == min(9, len(ref)) and np.array_equal(st.array("gen_ids")[q, :n], ref[:n])
    oc = compute(st, workers=0, n_boot=20, progress=False)["output_change"]
    gid, glen = st.array("gen_ids")[...], st.array("gen_len")[...]
    for _, pa in st.plan.pairs.iterrows():
        v, b = int(pa.variant), int(pa.baseline)
        nv, nb = min(int(glen[v]), 3), min(int(glen[b]), 3)
        row = oc[oc["pair"] == pa.pair].iloc[0]
        assert row["len_change"] == nv - nb
        same = nv == nb and np.array_equal(gid[v, :nv], gid[b, :nb])
        assert (row["first_divergence"] == -1) == same
    assert oc[["kl_full", "js_full", "logit_cosine"]].isna().all().all()


def test_logit_lens_last_layer_is_final_distribution(batched, tiny_model):
    lens = batched.array("lens_topk_logprobs")[...]  # (P, L, k)
    final = batched.array("logits_topk_logprobs")[...]
    k = lens.shape[-1]
    # the same last-layer residual through the final norm, by two paths (the lens's norm
    # of the captured residual, the model's own): one norm's rounding (hidden terms) apart
    cfg = tiny_model.config
    bound = logprob_bound(cfg, 0, logit_scale_of(batched), float(np.abs(final).max()), cfg.vocab_size)
    assert_within(lens[:, -1], final[:, :k], bound, "lens at the last layer")
    assert_within(batched.array("lens_final_top1_logprob")[:, -1], final[:, 0], bound, "final top-1")


def test_cuda_oom_halves_the_batch_and_retries(sweep_path, tok, tiny_model, batched, monkeypatch):
    from promptshift.extract.engine import Engine

    orig = Engine.extract_batch
    sizes = []

    def flaky(self, items, *a, **k):
        sizes.append(len(items))
        if len(items) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return orig(self, items, *a, **k)

    monkeypatch.setattr(Engine, "extract_batch", flaky)
    st = _extract(sweep_path, tok, tiny_model, None, selfcheck=False)
    assert max(sizes) > 1 and 1 in sizes
    _assert_stores_close(st, batched, tiny_model, ("resid_post", "attn_region_mass", "logits_topk_logprobs"))


@pytest.mark.parametrize("storage_dtype", ["float32", "float16"])
def test_full_patterns_for_opted_in_layers(sweep_path, tok, tiny_model, storage_dtype):
    """Shared prefix rows and suffix rows reassemble into the model's full pattern. The
    attention arrays (full patterns, last rows) are stored in the storage dtype, like the
    activations: with float32 they match the model's own attentions to float32 rounding."""
    s = load_sweep(sweep_path, full_attention_layers=[0, 2], storage_dtype=storage_dtype)
    st = fill_shard(s, ExtractConfig(store=None, progress=False, min_shared=2), model=tiny_model, tok=tok)
    plan = st.plan
    for name in ("attn_pattern", "attn_last", *st.components):
        assert st.array(name).dtype == np.dtype(storage_dtype), name
    f16 = storage_dtype == "float16"
    tiny_model.config._attn_implementation = "eager"
    try:
        for p in (0, int(plan.pairs.iloc[-1].variant)):
            ids = torch.as_tensor(plan.prompt_tokens(p), dtype=torch.long)[None]
            with torch.no_grad():
                att = tiny_model(ids, output_attentions=True).attentions
            got = st.attn_pattern(p)  # (2, NH, n, n)
            for i, layer in enumerate((0, 2)):
                ref = att[layer][0].numpy()
                bound = array_bound("attn_pattern", ref, tiny_model.config, ids.shape[1], vocab=1, logit_scale=0.0,
                                    float16=f16)
                assert_within(got[i], ref, bound, f"pattern of layer {layer}")
                last = ref[:, -1, :].T  # (n, NH)
                bound = array_bound("attn_last", last, tiny_model.config, ids.shape[1], vocab=1, logit_scale=0.0,
                                    float16=f16)
                assert_within(st.attn_last_row(p)[:, layer], last, bound, f"last row of layer {layer}")
    finally:
        tiny_model.config._attn_implementation = "promptshift"
    with pytest.raises(Exception, match="no full attention patterns"):
        _extract(sweep_path, tok, tiny_model, None).attn_pattern(0)


def test_float16_overflow_names_the_prompt(tmp_path, tok):
    """Activations beyond float16's range stop the extraction with the component and the
    prompt named, instead of storing inf."""
    from promptshift.errors import ExtractError
    from tests.conftest import tiny_llama

    model = tiny_llama(tok)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(1e6)  # residual stream ~1e6 > 65504
    path = write_sweep(tmp_path / "s.yaml", storage_dtype="float16", max_new_tokens=0)
    with pytest.raises(ExtractError, match=r"resid_pre of prompt 0 \(.*\) has values up to .* beyond float16's range"):
        fill_shard(load_sweep(path), ExtractConfig(store=None, progress=False, selfcheck=False), model=model, tok=tok)


@pytest.mark.parametrize("softcap", [None, 7.0])
def test_output_stats_against_numpy(monkeypatch, softcap):
    """The in-place logit lens (chunked, buffers reused across calls of different sizes)
    against a float64 numpy formula: top-k, entropy, log-prob of the final top-1."""
    import torch

    from promptshift.extract import engine as E

    monkeypatch.setattr(E, "_LENS_CHUNK_BYTES_CPU", 4 * 97 * 9)  # 9-row chunks: several per call
    rng = np.random.default_rng(1)
    H, V = 12, 97
    head = torch.nn.Linear(H, V, bias=True)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(rng.normal(size=(V, H)) * 2.0))
        head.bias.copy_(torch.from_numpy(rng.normal(size=V)))
    W, bias = head.weight.detach().double().numpy(), head.bias.detach().double().numpy()

    def ref_logits(h):
        z = h @ W.T + bias
        return np.tanh(z / softcap) * softcap if softcap else z

    ws = {}
    for B, L in ((1, 4), (2, 9), (4, 2)):  # the second call needs bigger buffers, the third reuses them
        normed = rng.normal(size=(B, L, H)).astype(np.float32)
        final = rng.normal(size=(B, H)).astype(np.float32)
        fn = lambda r, out: E.unembed(head, softcap, r, out)  # noqa: E731
        logits = E.unembed(head, softcap, torch.from_numpy(final))
        got = E.output_stats(logits, torch.from_numpy(normed), fn, 3, 4, ws)
        z = ref_logits(normed.astype(np.float64))  # (B, L, V)
        lp = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
        order = np.argsort(-lp, axis=-1)[..., :4]
        assert np.array_equal(got["lens_ids"], order)
        # float32 against float64: the logits are sums of H + 1 terms (bias), of magnitude at
        # most sum|h_i w_i| + |b|; a log-prob moves by twice that and its own log-softmax rounding
        terms = (np.abs(normed.astype(np.float64)) @ np.abs(W).T + np.abs(bias)).max()
        tanh = 1.0 if not softcap else 3.0  # z / c, tanh, * c: three more roundings
        dlp = 2 * (H + 1 + tanh) * U32 * terms + logsoftmax_rounding(float(np.abs(lp).max()), V)
        assert_within(got["lens_logprobs"], np.take_along_axis(lp, order, -1), dlp, "lens log-probs")
        ent = -(np.exp(lp) * lp).sum(-1)
        assert_within(got["lens_entropy"], ent, dlp * (1 + ent.max()) + V * U32 * ent.max(), "lens entropy")
        zf = ref_logits(final.astype(np.float64))
        top1 = zf.argmax(-1)
        assert_within(got["lens_final_top1"], lp[np.arange(B), :, top1], dlp, "final top-1")
        assert ws["x"].shape == (4 if B == 1 else 9, V)
