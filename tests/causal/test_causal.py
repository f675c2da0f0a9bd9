"""Causal analyses on tiny models with planted answers, against references written with
plain Hugging Face forward passes (no promptshift machinery) and plain numpy."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from promptshift.causal import CausalConfig, CausalError, run_causal
from promptshift.causal.multiturn import load_multiturn, messages, obeys, plain
from promptshift.causal.phrases import split_phrases, without
from promptshift.causal.runner import Edit, Row, Runner, kl
from promptshift.extract.worker import ExtractConfig, fill_shard
from promptshift.metrics import compute
from promptshift.sweep.behaviour import Check
from promptshift.sweep.config import load_sweep
from promptshift.vocabulary import REGION_CODE
from tests.conftest import tiny_llama, write_sweep
from tests.tolerance import assert_below, assert_within, entropy_of, forward_bound, kl_floor, logprob_bound

SYSTEM = REGION_CODE["system"]


def hf_logprobs(model, ids, *, attention_mask=None, pre_hooks=()) -> torch.Tensor:
    """Reference: one plain forward of the Hugging Face model, eager attention, optional
    forward pre-hooks (layer, fn(hidden) -> hidden). Returns the last position's
    log-probabilities and every layer's hidden states; ``hf_logprobs.logit_scale`` holds
    the largest |logit| of the last call (the scale of the logits' float32 rounding)."""
    handles = []
    for layer, fn in pre_hooks:
        def hook(mod, args, kwargs, fn=fn):
            if args:
                return (fn(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}

        handles.append(model.model.layers[layer].register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            x = torch.as_tensor(ids)[None]
            kw = {} if attention_mask is None else {"attention_mask": torch.as_tensor(attention_mask)[None],
                                                    "position_ids": torch.arange(len(ids))[None]}
            out = model(x, output_hidden_states=True, **kw)
    finally:
        for h in handles:
            h.remove()
    hf_logprobs.logit_scale = float(out.logits[0, -1].abs().max())
    return torch.log_softmax(out.logits[0, -1].float(), -1), [h[0] for h in out.hidden_states]


def _lp_bound(model, ids, ref) -> float:
    """Largest float32 difference of one token's log-probability between two runs of
    ``ids`` (tests/tolerance.py), ``ref`` the reference log-probabilities just computed by
    :func:`hf_logprobs`."""
    return logprob_bound(model.config, len(ids), hf_logprobs.logit_scale, float(ref.abs().max()), len(ref))


def _kl_floor(ref) -> float:
    """The float32 floor of KL(ref || a second run of the same distribution)."""
    return kl_floor(entropy_of(ref), len(ref))


@pytest.fixture(scope="module")
def model(tok):
    m = tiny_llama(tok, n_layers=4, seed=1)
    m.config._attn_implementation = "eager"
    return m


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    d = tmp_path_factory.mktemp("causal")
    return load_sweep(write_sweep(d / "c.yaml", max_new_tokens=2, storage_dtype="float32", top_k=8, lens_top_k=4))


@pytest.fixture(scope="module")
def store(sweep, tok, model):
    return fill_shard(sweep, ExtractConfig(store=None, progress=False), model=model, tok=tok)


def _eager(model):
    model.config._attn_implementation = "eager"
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = "eager"


def _pair(store, i=4):
    r = store.plan.pairs.iloc[i]
    p = store.plan
    return r, p.prompt_tokens(int(r.variant)), p.prompt_tokens(int(r.baseline)), p.prompt_regions(int(r.variant))


# --- the runner against plain forward passes ------------------------------------------------
def test_suffix_patching_matches_a_hooked_full_forward(store, model):
    """Patching site l over the aligned suffix == a full baseline forward whose layer-l input
    at the suffix is replaced by the variant's (HF hidden_states[l]); last site too."""
    r, v_ids, b_ids, _ = _pair(store)
    runner = Runner(model)
    try:
        _eager(model)
        _, v_hidden = hf_logprobs(model, v_ids)
        vs, bs, n = int(r.v_suffix_start), int(r.b_suffix_start), int(r.suffix_len)
        res, _ = runner.residuals(v_ids, np.arange(vs, len(v_ids)))
        for site in range(runner.L):
            assert_within(res[:, site], v_hidden[site][vs:],
                          forward_bound(model.config, len(v_ids), v_hidden[site].abs().max(), site), f"site {site}")
            ref, _ = hf_logprobs(model, b_ids, pre_hooks=[(site, lambda h, s=site: torch.cat(
                [h[:, :bs], v_hidden[s][None, vs:]], dim=1))])
            out = runner.compute([Row(b_ids[:bs], b_ids[bs:], [Edit(site, np.arange(n), res[:, site])])])[0]
            assert_below(kl(ref, out.logprobs), _kl_floor(ref), f"KL at site {site}")
            assert_within(out.logprobs, ref, _lp_bound(model, b_ids, ref), f"log-probs at site {site}")
    finally:
        runner.close()


def test_patching_a_prompt_with_itself_recovers_everything(store, model):
    r, v_ids, _, _ = _pair(store)
    runner = Runner(model)
    try:
        vs = int(r.v_suffix_start)
        res, lp_v = runner.residuals(v_ids, np.arange(vs, len(v_ids)))
        rows = [Row(v_ids[:vs], v_ids[vs:], [Edit(s, np.arange(len(v_ids) - vs), res[:, s])])
                for s in range(runner.L + 1)]
        rows += [Row(v_ids[:-1], v_ids[-1:], [Edit(s, [0], res[-1:, s])]) for s in range(runner.L + 1)]
        for o in runner.compute(rows):  # the same distribution, through other batch shapes: the float32 floor
            assert_below(kl(lp_v, o.logprobs), _kl_floor(lp_v), "KL of a self-patch")
    finally:
        runner.close()


def test_knockout_from_layer_zero_matches_masking_the_system_keys(store, model):
    """Blocking the system keys in every layer for every later query is, at the last
    position, the same as a forward whose attention mask hides the system tokens."""
    _, v_ids, _, reg = _pair(store)
    _eager(model)
    ref, _ = hf_logprobs(model, v_ids, attention_mask=(reg != SYSTEM).astype(np.int64))
    runner = Runner(model)
    try:
        end = int(np.flatnonzero(reg == SYSTEM)[-1]) + 1
        out = runner.compute([Row(v_ids[:end], v_ids[end:], knockout_keys=reg == SYSTEM, knockout_start=0),
                              Row(v_ids[:end], v_ids[end:], knockout_keys=reg == SYSTEM, knockout_start=runner.L)])
        assert_within(out[0].logprobs, ref, _lp_bound(model, v_ids, ref), "knockout from layer 0")
        _, lp_v = runner.residuals(v_ids, [len(v_ids) - 1])
        assert_below(kl(lp_v, out[1].logprobs), _kl_floor(lp_v), "knockout from layer L")  # nothing blocked
    finally:
        runner.close()


def test_planted_knockout_onset(sweep, tok):
    """Layers >= k of this model carry no attention output at all (v_proj = 0), so they
    cannot read the system span: knocking it out from layer k on changes nothing, from
    layer k-1 on it does, and metrics puts the onset at k."""
    k = 2
    m = tiny_llama(tok, n_layers=5, seed=3)
    with torch.no_grad():
        for layer in m.model.layers[k:]:
            layer.self_attn.v_proj.weight.zero_()
    st = fill_shard(sweep, ExtractConfig(store=None, progress=False), model=m, tok=tok)
    run_causal(sweep, CausalConfig(store=st, analyses=("knockout",), progress=False), model=m, tok=tok)
    arrays, _ = st.read_causal("knockout")
    klko = arrays["kl"]  # (pairs, L+1)
    # from layer k on, knocking out changes nothing: only the float32 floor is left (rows
    # whose runs start at different layers are batched differently, and some CPUs' matmul
    # kernels round differently with the batch size), while knocking out from layer k-1
    # changes the output by more than that floor can
    floor = _stored_kl_floor(st)[:, None]  # (pairs, 1)
    assert_below(klko[:, k:], floor, "knockout from layer k on")
    assert np.all(klko[:, k - 1 : k] > floor), (klko[:, k - 1], floor[:, 0])
    tables = compute(st, None, workers=0, progress=False, n_boot=200)
    summ = _summary(st, tables)
    assert summ["knockout"]["stops_mattering"]["site"] == k
    assert summ["knockout"]["stops_mattering"]["ci"] == [k, k]
    # the same layers, planted, make suffix patching exact from layer k on
    run_causal(sweep, CausalConfig(store=st, analyses=("patching",), progress=False), model=m, tok=tok)
    pa, _ = st.read_causal("patching")
    assert_below(pa["kl"][:, 0, k:], floor, "suffix patching from layer k on")
    assert np.all(pa["kl"][:, 0, 1:2] > floor)


def _stored_kl_floor(st) -> np.ndarray:
    """(pairs,) the float32 floor of a KL from each pair's variant distribution, from the
    entropy the store holds for the variant."""
    ent = np.asarray(st.array("logits_entropy")[...], np.float64)[st.plan.pairs["variant"].to_numpy()]
    return np.array([kl_floor(h, st.plan.dims.vocab) for h in ent])


def _summary(st, tables):
    from promptshift.metrics.causal import causal_tables

    return causal_tables(st, st.plan.pairs, 200, 0)[1]


def test_steering_with_its_own_difference_reproduces_the_variant(store, model):
    """A steering vector computed from one pair and added to that pair's baseline at site l
    gives exactly the variant's last-position residual at l (and its output at site L)."""
    r, v_ids, b_ids, _ = _pair(store)
    runner = Runner(model)
    try:
        hv, lp_v = runner.residuals(v_ids, [len(v_ids) - 1])
        hb, _ = runner.residuals(b_ids, [len(b_ids) - 1])
        diff = hv[0] - hb[0]  # (L+1, H)
        rows = [Row(b_ids[:-1], b_ids[-1:], [Edit(s, [0], diff[s][None], add=True)]) for s in range(runner.L + 1)]
        outs = runner.compute(rows, capture=True)
        for s, o in enumerate(outs):
            assert_within(o.resid[s], hv[0, s], forward_bound(model.config, len(v_ids), hv[0].abs().max()), s)
        assert_below(kl(lp_v, outs[-1].logprobs), _kl_floor(lp_v), "steering at site L")
    finally:
        runner.close()


# --- the whole job, stored, and metrics against numpy ------------------------------------------
@pytest.fixture(scope="module")
def full(store, sweep, tok, model):
    run_causal(sweep, CausalConfig(store=store, progress=False, max_new_tokens=4), model=model, tok=tok)
    return compute(store, None, workers=0, progress=False, n_boot=300)


def test_all_analyses_stored(store, full, sweep, model):
    from promptshift.causal import missing_analyses

    assert store.causal_analyses() == ["continuation", "knockout", "multiturn", "patching", "phrases", "steering"]
    assert missing_analyses(store, sweep) == ()  # what `promptshift run` skips when rerun
    assert missing_analyses(store, sweep, users=2) == ("patching", "knockout", "phrases", "steering",
                                                       "continuation")
    pa, meta = store.read_causal("patching")
    n = len(store.plan.pairs)
    assert pa["kl"].shape == (n, 2, meta["n_layers"] + 1)
    # fixed points: suffix site 0 patches identical embeddings (so it is the baseline run
    # again, in another batch: KL(v || b) moves by at most the baseline log-probs' float32
    # difference), site L the final residual (the variant again: the float32 floor)
    lp_b = 0.0
    for p in store.plan.pairs["baseline"].unique():
        ids = store.plan.prompt_tokens(int(p))
        lp_b = max(lp_b, _lp_bound(model, ids, hf_logprobs(model, ids)[0]))
    assert_within(pa["kl"][:, 0, 0], pa["kl_vb"], lp_b, "suffix patching at site 0")
    assert_below(pa["kl"][:, :, -1], _stored_kl_floor(store)[:, None], "patching at site L")


def _hf_run(model, ids, *, pre=(), post=None, attn_pre=()):
    """Reference: one plain HF forward (eager attention) of ``ids`` with hooks written here:
    ``pre`` (layer, fn(hidden) -> hidden) on layer inputs, ``post`` fn(hidden) -> hidden on
    the last layer's output (before the final norm), ``attn_pre`` (layer, fn(mask) -> mask)
    on the 4D additive mask an attention module gets. Returns the last position's float64
    log-probabilities, every layer's input and the last layer's output, and the largest
    |logit| (the scale of the logits' rounding)."""
    handles, grabbed = [], {}
    layers = model.model.layers

    def grab(i):
        def hook(mod, args, kwargs):
            grabbed[i] = (args[0] if args else kwargs["hidden_states"])[0].detach().clone()
        return hook

    for i in range(len(layers)):
        handles.append(layers[i].register_forward_pre_hook(grab(i), with_kwargs=True))
    for layer, fn in pre:
        def hook(mod, args, kwargs, fn=fn):
            if args:
                return (fn(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}
        handles.append(layers[layer].register_forward_pre_hook(hook, with_kwargs=True))

    def last(mod, args, out):
        out = post(out) if post is not None else out
        grabbed[len(layers)] = out[0].detach().clone()
        return out

    handles.append(layers[-1].register_forward_hook(last))
    for layer, fn in attn_pre:
        def hook(mod, args, kwargs, fn=fn):
            return args, {**kwargs, "attention_mask": fn(kwargs["attention_mask"])}
        handles.append(layers[layer].self_attn.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            x = torch.as_tensor(ids)[None]
            out = model(x, attention_mask=torch.ones_like(x))
    finally:
        for h in handles:
            h.remove()
    z = out.logits[0, -1].double()
    return torch.log_softmax(z, -1), torch.stack([grabbed[i] for i in range(len(layers) + 1)]), float(z.abs().max())


def _kl64(p, q):
    return float((p.exp() * (p - q)).sum())


def test_analyses_against_a_plain_hf_loop(store, full, model):
    """Every stored value of patching (both modes), knockout and steering, for every pair
    and site, recomputed one run at a time by a plain Hugging Face forward with hooks
    written here (eager attention, no key/value cache, no batching, no skipped layers),
    within the float32 rounding of the compared quantities."""
    _eager(model)
    plan, L, V = store.plan, model.config.num_hidden_layers, model.config.vocab_size
    pa, _ = store.read_causal("patching")
    ko, _ = store.read_causal("knockout")
    stv, _ = store.read_causal("steering")
    pairs = plan.pairs
    runs = {p: _hf_run(model, plan.prompt_tokens(p)) for p in set(pairs["variant"]) | set(pairs["baseline"])}
    n_keys = int(plan.prompts["n_tokens"].max())

    def check(got_kl, got_lp, lp_v, ref, scale, what):
        # each log-probability is within `lpb` of the exact one in either computation; KL moves
        # by at most the two sides' errors plus the variant's error times E_p|log p_v - log q|
        y = int(lp_v.argmax())
        lpb = logprob_bound(model.config, n_keys, scale, float(ref.abs().max()), V)
        spread = float((lp_v.exp() * (lp_v - ref).abs()).sum())
        assert_within(got_kl, _kl64(lp_v, ref), lpb * (2 + spread), what)
        assert_within(got_lp, float(ref[y]), 2 * lpb, what)

    for i, r in pairs.iterrows():
        v, b = int(r.variant), int(r.baseline)
        lp_v, h_v, sc_v = runs[v]
        lp_b, h_b, _ = runs[b]
        b_ids, v_ids, reg = plan.prompt_tokens(b), plan.prompt_tokens(v), plan.prompt_regions(v)
        vs, bs, n = int(r.v_suffix_start), int(r.b_suffix_start), int(r.suffix_len)
        for site in range(L + 1):
            for m, (src, dst) in enumerate([(slice(vs, vs + n), slice(bs, bs + n)), (slice(-1, None), slice(-1, None))]):
                def put(h, site=site, src=src, dst=dst):
                    h = h.clone()
                    h[0, dst] = h_v[site][src]
                    return h
                ref, _, sc = (_hf_run(model, b_ids, pre=[(site, put)]) if site < L
                              else _hf_run(model, b_ids, post=put))
                check(pa["kl"][i, m, site], pa["lp"][i, m, site], lp_v, ref, max(sc, sc_v), f"patching {i} {m} {site}")
        end = int(np.flatnonzero(reg == SYSTEM)[-1]) + 1
        hide = torch.zeros(len(v_ids), len(v_ids), dtype=torch.bool)
        hide[end:, torch.as_tensor(reg == SYSTEM)] = True  # queries after the system prompt, system keys

        def knock(mask):
            return mask.masked_fill(hide[None, None], torch.finfo(mask.dtype).min)
        for start in range(L + 1):
            ref, _, sc = _hf_run(model, v_ids, attn_pre=[(la, knock) for la in range(start, L)])
            check(ko["kl"][i, start], ko["lp"][i, start], lp_v, ref, max(sc, sc_v), f"knockout {i} {start}")
        # steering: the mean last-position difference of the other user prompts of this system prompt
        others = pairs[(pairs["system"] == r.system) & (pairs["user_id"] != r.user_id)]
        vec = torch.stack([runs[int(o.variant)][1][:, -1] - runs[int(o.baseline)][1][:, -1]
                           for o in others.itertuples()]).mean(0)  # (L+1, H)
        for site in range(L + 1):
            def add(h, site=site):
                h = h.clone()
                h[0, -1] += vec[site]
                return h
            ref, _, sc = _hf_run(model, b_ids, pre=[(site, add)]) if site < L else _hf_run(model, b_ids, post=add)
            check(stv["kl"][i, site], stv["lp"][i, site], lp_v, ref, max(sc, sc_v), f"steering {i} {site}")


def _hf_continuation(model, ids, y, *, pre=(), post=None):
    """Reference: one plain HF forward of ``ids`` followed by the reply ``y`` minus its last
    token, with the hooks of :func:`_hf_run` on the prompt positions; the mean float64
    log-probability of ``y`` (position len(ids) - 1 + t predicts y[t]), the largest |logit| and
    the largest |log-probability| of the scored tokens."""
    layers = model.model.layers
    handles = []
    for layer, fn in pre:
        def hook(mod, args, kwargs, fn=fn):
            if args:
                return (fn(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}
        handles.append(layers[layer].register_forward_pre_hook(hook, with_kwargs=True))
    if post is not None:
        handles.append(layers[-1].register_forward_hook(lambda mod, args, out: post(out)))
    try:
        with torch.no_grad():
            x = torch.as_tensor(np.concatenate([ids, y[:-1]]))[None]
            z = model(x, attention_mask=torch.ones_like(x)).logits[0].double()  # (S, V)
    finally:
        for h in handles:
            h.remove()
    rows = z[len(ids) - 1 : len(ids) - 1 + len(y)]  # (m, V)
    lp = torch.log_softmax(rows, -1)[torch.arange(len(y)), torch.as_tensor(y)]
    return float(lp.mean()), float(rows.abs().max()), float(lp.abs().max())


@pytest.fixture(scope="module")
def cont_refs(store, full, model):
    """Every value of the continuation analysis recomputed one run at a time by a plain
    Hugging Face forward over prompt + reply with hooks written here (eager attention, no
    cache, no batching): ``{("lp_v", i) | ("lp_b", i) | ("lp", i, mode, site): (reference,
    bound)}``, the bound the float32 rounding bound of one log-probability (a mean of such
    log-probabilities moves by at most the largest bound)."""
    _eager(model)
    plan, L, V = store.plan, model.config.num_hidden_layers, model.config.vocab_size
    _, meta = store.read_causal("continuation")
    gid, glen = store.array("gen_ids")[...], store.array("gen_len")[...]
    n_keys = int(plan.prompts["n_tokens"].max()) + int(meta["max_tokens"])
    runs = {p: _hf_run(model, plan.prompt_tokens(p)) for p in set(plan.pairs["variant"])}

    def ref(ids, y, **hooks):
        lp, scale, lp_abs = _hf_continuation(model, ids, y, **hooks)
        return lp, logprob_bound(model.config, n_keys, scale, lp_abs, V)  # each token's; so their mean's too

    out = {}
    for i, r in plan.pairs.iterrows():
        v, b = int(r.variant), int(r.baseline)
        y = np.asarray(gid[v, : min(int(glen[v]), meta["max_tokens"])], dtype=np.int64)
        v_ids, b_ids = plan.prompt_tokens(v), plan.prompt_tokens(b)
        out["lp_v", i] = ref(v_ids, y)
        out["lp_b", i] = ref(b_ids, y)
        h_v = runs[v][1]  # (L+1, S, H) every layer's input and the last layer's output, prompt positions
        vs, bs, n = int(r.v_suffix_start), int(r.b_suffix_start), int(r.suffix_len)
        nb = len(b_ids)
        for site in range(L + 1):
            for m, (src, dst) in enumerate([(slice(vs, vs + n), slice(bs, bs + n)), (slice(len(v_ids) - 1, None),
                                                                                     slice(nb - 1, nb))]):
                def put(h, site=site, src=src, dst=dst):
                    h = h.clone()
                    h[0, dst] = h_v[site][src]
                    return h
                hooks = {"pre": [(site, put)]} if site < L else {"post": put}
                out["lp", i, m, site] = ref(b_ids, y, **hooks)
    return out


def _check_continuation(arrays, cont_refs, what):
    """Every value of ``arrays`` (name -> (n_pairs, ...) array) within its reference's bound."""
    for key, (ref, bound) in cont_refs.items():
        assert_within(arrays[key[0]][key[1:]], ref, bound, f"{what}: {key}")


def test_continuation_against_a_plain_hf_loop(store, cont_refs):
    """Every stored value of the continuation analysis (variant, baseline, both patching
    modes at every site) within the float32 bound of the plain HF loop (:func:`cont_refs`);
    suffix patching at site 0 swaps identical embeddings (the baseline again)."""
    plan = store.plan
    ct, meta = store.read_causal("continuation")
    glen = store.array("gen_len")[...]
    assert np.array_equal(ct["pair"], plan.pairs["pair"].to_numpy())
    for i, r in plan.pairs.iterrows():
        assert ct["n_tokens"][i] == min(int(glen[int(r.variant)]), meta["max_tokens"]) > 0
    _check_continuation(ct, cont_refs, "stored")
    for i in range(len(plan.pairs)):
        lp_b, b_bound = cont_refs["lp_b", i]
        assert_within(ct["lp"][i, 0, 0], lp_b, 2 * b_bound, f"suffix site 0 is the baseline {i}")


def test_continuation_in_chunks_against_a_plain_hf_loop(store, cont_refs, model, monkeypatch):
    """With a memory budget that fits one pair's reply residuals, every pair runs in its own
    chunk (its baseline, then its variant and patched rows from their sites): every value
    again within the float32 bound of the plain HF loop (:func:`cont_refs`)."""
    from promptshift.causal import continuation as cmod
    from promptshift.causal.analyses import Scope

    plan = store.plan
    _, meta = store.read_causal("continuation")
    gid, glen = store.array("gen_ids")[...], store.array("gen_len")[...]
    monkeypatch.setattr(cmod, "_CONT_RESID_BYTES_BUDGET", 1)
    runner = Runner(model)
    try:
        arrays, _ = cmod.continuation(runner, plan, Scope(list(meta["users"]), progress=False), None, gid, glen,
                                      n_tokens=int(meta["max_tokens"]))
    finally:
        runner.close()
    assert runner.can_skip  # the patched rows ran from their sites
    _check_continuation({k: a for k, (a, _) in arrays.items()}, cont_refs, "in chunks")


def test_continuation_curve_is_a_ratio_of_sums(full):
    long, curve = full["causal_continuation"], full["causal_continuation_curve"]
    assert len(curve) == 2 * long["site"].nunique()
    for (mode, site), g in long.groupby(["mode", "site"]):
        want = (g["lp_cont"] - g["lp_b"]).sum() / (g["lp_v"] - g["lp_b"]).sum()
        row = curve[(curve["mode"] == mode) & (curve["site"] == site)].iloc[0]
        assert row["recovered_cont"] == pytest.approx(want, rel=1e-9, abs=1e-12)
        assert row["recovered_cont_ci_low"] <= row["recovered_cont"] + 1e-12 <= row["recovered_cont_ci_high"] + 2e-12


def test_curves_are_ratios_of_sums(full):
    long, curve = full["causal_patching"], full["causal_patching_curve"]
    for (mode, site), g in long.groupby(["mode", "site"]):
        want = 1 - g["kl"].sum() / g["kl_vb"].sum()
        got = curve[(curve["mode"] == mode) & (curve["site"] == site)]["recovered_kl"].iloc[0]
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
        lo = curve[(curve["mode"] == mode) & (curve["site"] == site)]
        assert float(lo["recovered_kl_ci_low"].iloc[0]) <= got + 1e-12 <= float(lo["recovered_kl_ci_high"].iloc[0]) + 2e-12
    st = full["causal_steering_curve"]
    sl = full["causal_steering"]
    for site, g in sl.groupby("site"):
        assert st[st["site"] == site]["recovered_kl"].iloc[0] == pytest.approx(1 - g["kl"].sum() / g["kl_vb"].sum())


def test_causal_intervals_resample_system_and_user_prompts(store, full):
    """A curve's CI equals a loop over materialised pigeonhole resamples (drawn system prompts
    × drawn user prompts, every drawn cell kept); the steering vector's best site is chosen
    on the selection half of the user prompts and its recovered share measured on the other."""
    from promptshift.metrics.bootstrap import crossed_weights, split_users
    from promptshift.metrics.causal import causal_tables

    _, meta = store.read_causal("steering")
    users = list(meta["users"])
    long = full["causal_steering"]
    systems = [s for s in dict.fromkeys(store.plan.pairs["system"]) if s in set(long["system"])]
    ws, wu = crossed_weights(len(systems), len(users), 300, 0)
    curve = full["causal_steering_curve"]
    site = int(curve["site"].max()) // 2
    g = long[long["site"] == site]
    boots = []
    for b in range(300):
        drawn = [(s, u) for i, s in enumerate(systems) for _ in range(int(ws[b, i]))
                 for j, u in enumerate(users) for _ in range(int(wu[b, j]))]
        rows = pd.concat([g[(g["system"] == s) & (g["user_id"] == u)] for s, u in drawn])
        boots.append(1 - rows["kl"].sum() / rows["kl_vb"].sum())
    row = curve[curve["site"] == site].iloc[0]
    lo, hi = np.percentile(boots, [2.5, 97.5])
    assert row["recovered_kl_ci_low"] == pytest.approx(lo, abs=1e-9)
    assert row["recovered_kl_ci_high"] == pytest.approx(hi, abs=1e-9)

    summ = causal_tables(store, store.plan.pairs, 300, 0)[1]
    st = summ["steering"]
    assert st["resampling"] == "crossed" and st["n_systems"] == len(systems) and st["n_users"] == len(users)
    cats = long.drop_duplicates("user_id").set_index("user_id")["category"].reindex(users).to_numpy()
    sel = set(np.asarray(users)[split_users(len(users), 0, cats)])
    assert 0 < len(sel) < len(users) and st["best"]["selection"] == "split"
    half = long[long["user_id"].isin(sel)]
    rec = {k: 1 - v["kl"].sum() / v["kl_vb"].sum() for k, v in half.groupby("site") if k < curve["site"].max()}
    best = max(rec, key=rec.get)
    assert st["best"]["site"] == best and st["best"]["recovered_select"] == pytest.approx(rec[best])
    held = long[~long["user_id"].isin(sel) & (long["site"] == best)]
    assert st["best"]["recovered"] == pytest.approx(1 - held["kl"].sum() / held["kl_vb"].sum())
    assert summ["patching"]["resampling"] == summ["knockout"]["resampling"] == "crossed"


def test_phrase_and_multiturn_tables(store, full, sweep):
    ph = full["causal_phrases"]
    rank = full["causal_phrase_rank"]
    for (s, j), g in ph.groupby(["system", "phrase"]):
        r = rank[(rank["system"] == s) & (rank["phrase"] == j)].iloc[0]
        assert r["kl_removed"] == pytest.approx(g["kl_va"].mean())
        assert r["importance_output"] == pytest.approx(1 - g["kl_ab"].sum() / g["kl_vb"].sum())
    # single-phrase prompts: leaving the phrase out is the baseline
    single = ph[ph["n_phrases"] == 1]
    V = store.plan.dims.vocab
    assert_below(single["kl_ab"], kl_floor(math.log(V), V), "KL(a || b) of a single phrase")  # H(P) <= ln V
    tk = full["causal_tokens"]
    n_sys = sum(int((store.plan.prompt_regions(int(v)) == SYSTEM).sum())
                for v in store.plan.pairs.drop_duplicates("system")["variant"])
    assert len(tk) == n_sys and tk["attribution"].notna().all()
    mt, turns = full["multiturn"], full["multiturn_turns"]
    for (c, t), g in mt.groupby(["condition", "turn"]):
        r = turns[(turns["condition"] == c) & (turns["turn"] == t)].iloc[0]
        assert r["obey_rate"] == pytest.approx(g["obeys"].mean())
        if c != "no_system":
            assert r["sys_mass"] == pytest.approx(g["sys_mass"].mean())
    assert mt[mt["condition"] == "no_system"]["sys_mass"].isna().all()


def test_multiturn_attention_against_output_attentions(store, tok, model):
    """The stored system mass of one row, recomputed from Hugging Face's own attentions."""
    arrays, meta = store.read_causal("multiturn")
    suite = load_multiturn("multiturn")
    i = int(np.flatnonzero((arrays["condition"] == 0) & (arrays["turn"] == 3))[0])
    conv = suite["conversations"][int(arrays["conversation"][i])]
    from promptshift.sweep.chat import render

    r = render(tok, messages(suite, conv, 3, "system"))
    _eager(model)
    with torch.no_grad():
        att = model(torch.as_tensor(r.ids)[None], output_attentions=True).attentions  # L x (1, NH, S, S)
    row = torch.stack([a[0, :, -1] for a in att]).double().numpy()  # (L, NH, S)
    rest = row[..., 1:].sum(-1)  # (L, NH) the mass off the sink (the first token)
    sysm = row[..., r.regions == SYSTEM].sum(-1) / rest
    # probabilities (scale 1) through every layer; a / rest moves by (da + a d rest / rest) / rest
    dp = 2 * forward_bound(model.config, len(r.ids), 1.0)  # softmax: |dp| <= 2 max|d score| for p <= 1
    bound = (dp * (1 + sysm / rest) / rest).max(-1)  # (L,)
    assert_within(arrays["sys_mass"][i], sysm.mean(-1), bound, "system mass")


# --- pieces ------------------------------------------------------------------------------------
def test_split_phrases():
    t = 'Respond only with JSON like {"a": "..."}. Do not write anything else. Be brief.'
    assert [t[a:b] for a, b in split_phrases(t)] == ['Respond only with JSON like {"a": "..."}.',
                                                     "Do not write anything else.", "Be brief."]
    t = "Speak like a pirate in every reply, using words such as ahoy and matey, and mention the sea whenever it fits."
    assert [t[a:b] for a, b in split_phrases(t)] == [
        "Speak like a pirate in every reply, using words such as ahoy and matey,",
        "and mention the sea whenever it fits."]
    assert without("One. Two. Three.", (5, 9)) == "One. Three."
    assert without("One. Two.", (0, 4)) == "Two."


def test_multiturn_rules():
    check = {"type": "startswith", "value": "Ahoy"}  # the suite's older syntax still reads
    assert obeys("  Ahoy, matey", check) and not obeys("Hello, Ahoy", check)
    assert obeys("x Ahoy", {"contains": "Ahoy"}) and not obeys("x ahoy", {"contains": "Ahoy"})
    assert obeys("ahoy!", {"type": "regex", "value": "(?i)^ahoy"})
    assert plain("Ahoy, the capital is Tokyo.", check) == "The capital is Tokyo."
    suite = load_multiturn("multiturn")
    assert suite["check"] == Check("startswith", "Ahoy")  # one parser for the suite and the sweeps
    conv = suite["conversations"][0]
    m = messages(suite, conv, 3, "system_plain")
    assert [x["role"] for x in m] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert not any(x["content"].startswith("Ahoy") for x in m if x["role"] == "assistant")
    assert messages(suite, conv, 1, "no_system") == [{"role": "system", "content": ""},
                                                     {"role": "user", "content": conv["turns"][0]["user"]}]


def test_bad_input(store, sweep, tok, model, tmp_path):
    with pytest.raises(CausalError, match="unknown analysis 'patch'"):
        CausalConfig(store=store, analyses=("patch",))
    with pytest.raises(CausalError, match="at least 2"):
        run_causal(sweep, CausalConfig(store=store, analyses=("steering",), users=1, progress=False),
                   model=model, tok=tok)
    other = load_sweep(write_sweep(tmp_path / "o.yaml", users=[{"id": "x", "text": "Hello?"}]))
    with pytest.raises(CausalError, match="different sweep"):
        run_causal(other, CausalConfig(store=store, analyses=("patching",), progress=False), model=model, tok=tok)
    bad = tmp_path / "mt.yaml"
    bad.write_text(json.dumps({"rule": {"system": "x", "check": {"type": "endswith", "value": "y"}},
                               "conversations": [{"id": "a", "turns": [{"user": "hi"}]}]}))
    from promptshift.errors import SweepError

    with pytest.raises(SweepError, match="rule.check"):
        load_multiturn(bad)
    with pytest.raises(CausalError, match="weights"):
        run_causal(sweep, CausalConfig(store=store, analyses=("patching",), progress=False),
                   model=tiny_llama(tok, n_layers=4, seed=9), tok=tok)


def test_cli_on_a_zarr_store(tmp_path, tok, capsys):
    """`promptshift causal` end to end on a saved tiny model, with the sweep given (and
    checked) and without it (read from the store); metrics picks the results up."""
    from promptshift.cli import main

    d = tmp_path / "m"
    tiny_llama(tok, n_layers=2).save_pretrained(d)
    tok.save_pretrained(d)
    sw = write_sweep(tmp_path / "s.yaml", model=str(d), max_new_tokens=0, top_k=4, lens_top_k=2)
    st = tmp_path / "s.zarr"
    with pytest.raises(SystemExit) as e:
        main(["extract", str(sw), "--store", str(st), "--no-progress"])
    assert e.value.code == 0
    with pytest.raises(SystemExit) as e:
        main(["causal", str(sw), "--store", str(st), "--analysis", "patching", "--users", "2", "--no-progress"])
    assert e.value.code == 0
    with pytest.raises(SystemExit) as e:  # no sweep: the store's own, and its model
        main(["causal", "--store", str(st), "--analysis", "knockout", "--users", "2", "--no-progress"])
    assert e.value.code == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # a sweep option without a sweep
        main(["causal", "--store", str(st), "--baseline", "no_system_turn", "--no-progress"])
    assert e.value.code != 0 and "give SWEEP" in capsys.readouterr().err
    other = write_sweep(tmp_path / "s.yaml", model=str(d), max_new_tokens=0, top_k=4, lens_top_k=3)
    with pytest.raises(SystemExit) as e:  # the same path, other content: refused, naming what differs
        main(["causal", str(other), "--store", str(st), "--analysis", "knockout", "--no-progress"])
    assert e.value.code != 0 and "`lens_top_k` differs" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["causal", str(sw), "--store", str(st), "--analysis", "nope", "--no-progress"])
    assert e.value.code == 2
    res = tmp_path / "res"
    compute(str(st), str(res), workers=0, progress=False, n_boot=50)
    curve = pd.read_parquet(res / "causal_patching_curve.parquet")
    assert set(curve["mode"]) == {"suffix", "last"} and curve["n_pairs"].iloc[0] == 6
    assert json.loads((res / "summary.json").read_text())["causal"]["knockout"]["n_pairs"] == 6


def test_skipping_layers_below_a_full_replacement_changes_nothing(store, model):
    """Rows that start at a layer (their tail replaced there) give what running every layer gives."""
    r, v_ids, b_ids, reg = _pair(store)
    runner = Runner(model)
    try:
        assert runner.can_skip
        vs, bs, n = int(r.v_suffix_start), int(r.b_suffix_start), int(r.suffix_len)
        res, _ = runner.residuals(v_ids, np.arange(vs, len(v_ids)))
        end = int(np.flatnonzero(reg == SYSTEM)[-1]) + 1
        own, _ = runner.residuals(v_ids, np.arange(end, len(v_ids)))
        _eager(model)
        bound = max(_lp_bound(model, ids, hf_logprobs(model, ids)[0]) for ids in (v_ids, b_ids))
        for site in range(1, runner.L + 1):
            s0 = min(site, runner.L - 1)
            pairs = [(Row(b_ids[:bs], b_ids[bs:], [Edit(site, np.arange(n), res[:, site])], start=start))
                     for start in (0, s0)]
            pairs += [Row(v_ids[:end], v_ids[end:], [Edit(s0, np.arange(len(v_ids) - end), own[:, s0])],
                          knockout_keys=reg == SYSTEM, knockout_start=site, start=start) for start in (0, s0)]
            o = [runner.compute([row])[0] for row in pairs]  # one call each: small batches of a call run together
            assert_within(o[0].logprobs, o[1].logprobs, bound, f"patching from site {site}")
            assert_within(o[2].logprobs, o[3].logprobs, bound, f"knockout from site {site}")
        with pytest.raises(ValueError, match="must replace every tail position"):
            runner.compute([Row(b_ids[:bs], b_ids[bs:], start=2)])
        # replace edits of one site together covering the tail suffice; leaving one position out does not
        split = [Edit(2, np.arange(1), res[:1, 2]), Edit(2, 1 + np.arange(n - 1), res[1:, 2])]
        whole = Row(b_ids[:bs], b_ids[bs:], [Edit(2, np.arange(n), res[:, 2])])
        o = runner.compute([Row(b_ids[:bs], b_ids[bs:], split, start=2), whole])
        assert_within(o[0].logprobs, o[1].logprobs, bound, "split edits from site 2")
        with pytest.raises(ValueError, match="must replace every tail position"):
            runner.compute([Row(b_ids[:bs], b_ids[bs:], split[1:], start=2)])
    finally:
        runner.close()


def test_small_batches_of_several_first_layers_run_together(store, model, monkeypatch):
    """One-token rows of every site (last-position patching) run as few batches from the
    smallest first layer, and give what each row gives run alone from its own site."""
    from promptshift.causal import runner as rn

    r, v_ids, b_ids, reg = _pair(store)
    runner = Runner(model)
    try:
        res, _ = runner.residuals(v_ids, np.arange(len(v_ids) - 1, len(v_ids)))
        rows = [Row(b_ids[:-1], b_ids[-1:], [Edit(site, np.array([0]), res[:, site])], start=min(site, runner.L - 1))
                for site in range(runner.L + 1)] * 3
        alone = [runner.compute([row])[0] for row in rows[: runner.L + 1]]
        starts = []
        batch = Runner._batch
        monkeypatch.setattr(Runner, "_batch", lambda self, rs, kvs, capture, start=0: (
            starts.append(start), batch(self, rs, kvs, capture, start))[1])
        monkeypatch.setattr(rn, "_BAND_TOKENS", 8)  # 3 tokens per first layer: bands of 3 first layers
        together = runner.compute(rows)
        assert starts == [0, 3]  # first layers 0-2 together, then 3 and the site-L rows (first layer L-1)
        _eager(model)
        bound = _lp_bound(model, b_ids, hf_logprobs(model, b_ids)[0])
        for i, o in enumerate(together):
            assert_within(o.logprobs, alone[i % (runner.L + 1)].logprobs, bound, f"row {i}")
        # the outputs are those of their own rows: the sites' distributions differ
        assert float(kl(alone[0].logprobs, alone[runner.L].logprobs)) > 1e-3
    finally:
        runner.close()


def _rows_run(monkeypatch) -> list[int]:
    """The number of rows of each ``Runner.stream`` call from now on (appended as they come)."""
    ran: list[int] = []
    stream = Runner.stream

    def counting(self, rows, *args, **kwargs):
        ran.append(len(rows))
        return stream(self, rows, *args, **kwargs)

    monkeypatch.setattr(Runner, "stream", counting)
    return ran


def test_rows_patching_the_baselines_own_values_are_not_run(store, model, monkeypatch):
    """Site 0 patches the same token embeddings (no position embeddings here): those rows are
    the baseline's own run and take its reference output; rows whose values differ in one
    number run."""
    from promptshift.causal import analyses as an

    users = list(dict.fromkeys(store.plan.pairs.user_id))[:2]
    runner = Runner(model)
    ran = _rows_run(monkeypatch)
    try:
        refs = an.Refs(runner, store.plan, an.Scope(users, progress=False))
        n = len(refs.pairs)
        arrays, _ = an.patching(runner, store.plan, an.Scope(users, progress=False), refs)
        assert ran[-1] == n * 2 * runner.L  # of n * 2 * (L + 1): site 0 of both modes not run
        kl0, kl_vb = arrays["kl"][0][:, :, 0], arrays["kl_vb"][0]
        np.testing.assert_array_equal(kl0, np.stack([kl_vb, kl_vb], 1))  # KL(p_v || p_b) exactly
        for b in set(refs.pairs.baseline.astype(int)):  # one float changed: nothing is taken for granted
            refs.resid[b] = refs.resid[b].clone()
            refs.resid[b][:, 0, 0] += 1e-3
        again, _ = an.patching(runner, store.plan, an.Scope(users, progress=False), refs)
        assert ran[-1] == n * 2 * (runner.L + 1)
        np.testing.assert_allclose(again["kl"][0], arrays["kl"][0], atol=1e-4)  # (the rows ran, unperturbed)
    finally:
        runner.close()


def test_site_zero_rows_run_where_position_embeddings_differ(tok, tmp_path, monkeypatch):
    """The same shortcut, a model with absolute position embeddings (GPT-2): the variant's
    layer-0 input at the aligned suffix is not the baseline's (other positions), so site 0
    rows run, and their output equals a plain Hugging Face forward of the baseline with
    that input patched in (not the baseline's own output)."""
    from promptshift.causal import analyses as an
    from tests.extract.test_architectures import _build

    model = _build("gpt2", len(tok), 256)
    sw = load_sweep(write_sweep(tmp_path / "g.yaml", max_new_tokens=0, storage_dtype="float32"))
    st = fill_shard(sw, ExtractConfig(store=None, progress=False), model=model, tok=tok)
    users = list(dict.fromkeys(st.plan.pairs.user_id))[:1]
    runner = Runner(model)
    ran = _rows_run(monkeypatch)
    try:
        scope = an.Scope(users, progress=False)
        refs = an.Refs(runner, st.plan, scope)
        arrays, _ = an.patching(runner, st.plan, scope, refs)
        assert ran[-1] == len(refs.pairs) * 2 * (runner.L + 1)  # every row ran
    finally:
        runner.close()
    kl_all, kl_vb = arrays["kl"][0], arrays["kl_vb"][0]
    for i, r in enumerate(refs.pairs.itertuples()):
        v_ids, b_ids = st.plan.prompt_tokens(int(r.variant)), st.plan.prompt_tokens(int(r.baseline))
        vs, bs = int(r.v_suffix_start), int(r.b_suffix_start)
        with torch.no_grad():
            v_out = model(torch.as_tensor(v_ids)[None], output_hidden_states=True)
            emb = v_out.hidden_states[0][0, vs:]  # (n_al, H): token + position embeddings of the variant

            def patch(mod, args, kwargs):
                h = args[0] if args else kwargs["hidden_states"]
                h = torch.cat([h[:, :bs], emb[None]], dim=1)
                return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

            hook = model.transformer.h[0].register_forward_pre_hook(patch, with_kwargs=True)
            try:
                ref_logits = model(torch.as_tensor(b_ids)[None]).logits[0, -1].float()
            finally:
                hook.remove()
        p_v = torch.log_softmax(v_out.logits[0, -1].float(), -1)
        ref = torch.log_softmax(ref_logits, -1)
        want = float(kl(p_v, ref))
        assert abs(want - float(kl_vb[i])) > 1e-3  # the patched run is not the baseline's
        # |KL(a || b) - KL(a' || b')| <= max |a - a'| + max |b - b'|: one log-probability bound per run
        bound = sum(logprob_bound(model.config, n, float(z.abs().max()), float(lp.abs().max()), len(lp))
                    for n, z, lp in ((len(v_ids), v_out.logits[0, -1], p_v), (len(b_ids), ref_logits, ref)))
        assert_below(abs(float(kl_all[i, 0, 0]) - want), bound, f"pair {i}: site 0 of suffix patching")


def test_phrase_ablation_and_attribution_against_plain_hf(store, full, tok, model, sweep):
    """One phrase of the two-phrase prompt: KL(p_v || p_without) from a plain HF forward on
    the text with the phrase cut out by hand; token attributions from plain autograd."""
    from promptshift.sweep.chat import conversation, render

    _eager(model)
    ph = full["causal_phrases"]
    row = ph[(ph["system"] == "pirate") & (ph["phrase"] == 1) & (ph["user_id"] == "add")].iloc[0]
    user = next(u.text for u in sweep.user_prompts if u.id == "add")
    pirate = next(s.text for s in sweep.system_prompts if s.name == "pirate")
    assert row["text"] == "Speak like one in every answer, matey."
    cut = pirate.replace(" Speak like one in every answer, matey.", "")
    a_ids, v_ids = render(tok, conversation(tok, cut, user)).ids, render(tok, conversation(tok, pirate, user)).ids
    lp_a, _ = hf_logprobs(model, a_ids)
    db = _lp_bound(model, a_ids, lp_a)
    lp_v, _ = hf_logprobs(model, v_ids)
    db = max(db, _lp_bound(model, v_ids, lp_v))
    # KL = sum p_v (lp_v - lp_a) moves by at most db (lp_v) + db (lp_a) + db max|lp_v - lp_a| (p_v)
    assert_within(row["kl_va"], float(kl(lp_v, lp_a)), db * (2 + float((lp_v - lp_a).abs().max())), "KL(v || a)")
    # gradient x input, recomputed with plain autograd on the HF model
    arrays, meta = store.read_causal("phrases")
    r = store.plan.pairs[(store.plan.pairs["system"] == "pirate") & (store.plan.pairs["user_id"] == "add")].iloc[0]
    v_ids = store.plan.prompt_tokens(int(r.variant))
    lp_b, _ = hf_logprobs(model, store.plan.prompt_tokens(int(r.baseline)))
    e = model.get_input_embeddings()(torch.as_tensor(v_ids)[None]).detach().requires_grad_(True)
    lp = torch.log_softmax(model(inputs_embeds=e).logits[0, -1].float(), -1)
    (lp.exp() * (lp - lp_b)).sum().backward()
    sys_idx = np.flatnonzero(store.plan.prompt_regions(int(r.variant)) == SYSTEM)
    terms = (e.grad[0, sys_idx] * e[0, sys_idx]).detach()  # (n_sys, H)
    want = terms.sum(-1).numpy()
    tokens = pd.DataFrame(meta["tokens"])
    rows = np.flatnonzero(tokens["system"] == "pirate")
    got = arrays["token_attr"][rows, meta["users"].index("add")]
    # the gradient runs the forward chain twice (forward and backward), each term at its own scale
    bound = 2 * forward_bound(model.config, len(v_ids), 1.0) * terms.abs().sum(-1).numpy()
    assert_within(got, want, bound, "gradient x input")
    # every token of the left-out phrase is labelled with it
    assert set(tokens.loc[rows, "phrase"]) == {0, 1}
    text = "".join(tokens.loc[rows[tokens.loc[rows, "phrase"] == 1], "token"])
    assert text.strip() == "Speak like one in every answer, matey."


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_causal_results_in_each_backend(fmt, tmp_path, tok):
    """write_causal / read_causal on disk: a rerun replaces the analysis, an interrupted
    rewrite (no meta) is not listed, and export carries the results to the other format."""
    from promptshift.errors import StoreError
    from promptshift.store import open_store
    from promptshift.store.verify import export_store
    from tests.metrics.synth import build

    path = tmp_path / ("s.zarr" if fmt == "zarr" else "s.h5")
    st, _ = build(str(path), fmt=fmt, tok=tok)
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    st.write_causal("patching", {"kl": (a, ("pair", "site")), "empty": (np.zeros((0, 2), np.float32),
                                                                          ("system_token", "user"))},
                    {"users": ["x"], "note": "é"})
    st.close()
    st = open_store(path, mode="r+")
    arrays, meta = st.read_causal("patching")
    np.testing.assert_array_equal(arrays["kl"], a)
    assert arrays["empty"].shape == (0, 2) and meta == {"users": ["x"], "note": "é"}
    st.write_causal("patching", {"kl": (a[:1], ("pair", "site"))}, {"users": []})
    arrays, _ = st.read_causal("patching")
    assert set(arrays) == {"kl"} and arrays["kl"].shape == (1, 4)
    other = tmp_path / ("e.h5" if fmt == "zarr" else "e.zarr")
    st.close()
    export_store(path, other)
    arrays, _ = open_store(other).read_causal("patching")
    np.testing.assert_array_equal(arrays["kl"], a[:1])
    st = open_store(path, mode="r+")
    st.backend.remove("causal_patching_meta")  # as if a rewrite stopped before its meta
    assert st.causal_analyses() == []
    with pytest.raises(StoreError, match="no complete causal analysis 'patching'"):
        st.read_causal("patching")


def test_scope_users_spread_over_the_sweep():
    from promptshift.causal import scope_users

    sw = load_sweep("quick")
    ids = [u.id for u in sw.user_prompts]
    assert scope_users(sw, None) == ids and scope_users(sw, 100) == ids
    six = scope_users(sw, 6)
    cats = {u.id: u.category for u in sw.user_prompts}
    assert len(six) == 6 and len({cats[u] for u in six}) == 6  # one per category of the quick sweep
    assert scope_users(sw, 1) == ids[:1]
