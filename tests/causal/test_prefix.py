"""Causal analyses of instruction prefixes (the instruction at the start of the user turn):
knockout of the prefix span, patching, phrases, against plain Hugging Face forwards, and
the placement tables metrics derives from them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from promptshift.causal import CausalConfig, run_causal
from promptshift.extract.worker import ExtractConfig, fill_shard
from promptshift.sweep.config import load_sweep
from promptshift.vocabulary import REGION_CODE
from tests.causal.test_causal import _eager, _hf_run, _kl64
from tests.conftest import tiny_llama, write_sweep
from tests.tolerance import assert_below, assert_within, forward_bound, kl_floor, logit_scale_of, logprob_bound

PREFIX = REGION_CODE["prefix"]
USERS = [{"id": "capital", "text": "What is the capital of France?", "category": "factual"},
         {"id": "add", "text": "What is 2 + 3?", "category": "reasoning"},
         {"id": "poem", "text": "Write a short poem about rain.", "category": "creative"}]
PREFIXES = [{"name": "brief", "text": "Be brief. Answer in as few words as you can, and never explain."},
            {"name": "arr", "text": "You are a pirate.", "same_as": "pirate"}]


def _run(tok, d, model, analyses=("patching", "knockout", "phrases", "steering")):
    sweep = load_sweep(write_sweep(d / "p.yaml", users=USERS, instruction_prefixes=PREFIXES, max_new_tokens=2,
                                   storage_dtype="float32", top_k=8, lens_top_k=4))
    store = fill_shard(sweep, ExtractConfig(store=None, progress=False), model=model, tok=tok)
    run_causal(sweep, CausalConfig(store=store, analyses=analyses, progress=False), model=model, tok=tok)
    return store


@pytest.fixture(scope="module")
def model(tok):
    m = tiny_llama(tok, n_layers=4, seed=1)
    m.config._attn_implementation = "eager"
    return m


@pytest.fixture(scope="module")
def store(tok, model, tmp_path_factory):
    return _run(tok, tmp_path_factory.mktemp("prefix"), model)


def _prefix_pairs(store):
    p = store.plan.pairs
    return p[p.placement == "prefix"]


def _kl_bound(model, n_keys, lp_p, lp_q, scale) -> float:
    """|stored KL(p || q) - KL computed here|: each log-probability within ``lpb`` of the
    exact one on either side (tests/tolerance.py), so KL moves by at most
    lpb * (2 + E_p |log p - log q|)."""
    lpb = logprob_bound(model.config, n_keys, scale, float(max(lp_p.abs().max(), lp_q.abs().max())), len(lp_p))
    return lpb * (2 + float((lp_p.exp() * (lp_p - lp_q).abs()).sum()))


def test_prefix_knockout_and_patching_against_a_plain_hf_loop(store, model):
    """Every stored knockout value of a prefix pair equals a plain forward whose attention
    mask hides the prefix tokens from every later query in layers >= start; the patching
    curves of prefix pairs keep their fixed points."""
    _eager(model)
    plan, L, V = store.plan, model.config.num_hidden_layers, model.config.vocab_size
    ko, _ = store.read_causal("knockout")
    pa, _ = store.read_causal("patching")
    row = {int(p): i for i, p in enumerate(ko["pair"])}
    n_keys = int(plan.prompts["n_tokens"].max())
    pre = _prefix_pairs(store)
    assert len(pre) == 2 * 3 and set(pre.pair) <= set(row)
    for r in pre.itertuples():
        i = row[int(r.pair)]
        v_ids, reg = plan.prompt_tokens(r.variant), plan.prompt_regions(r.variant)
        lp_v, _, sc_v = _hf_run(model, v_ids)
        end = int(np.flatnonzero(reg == PREFIX)[-1]) + 1
        assert end == r.v_suffix_start  # the prefix ends where the aligned user text begins
        hide = torch.zeros(len(v_ids), len(v_ids), dtype=torch.bool)
        hide[end:, torch.as_tensor(reg == PREFIX)] = True  # queries after the prefix, prefix keys

        def knock(mask):
            return mask.masked_fill(hide[None, None], torch.finfo(mask.dtype).min)
        for start in range(L + 1):
            ref, _, sc = _hf_run(model, v_ids, attn_pre=[(la, knock) for la in range(start, L)])
            lpb = logprob_bound(model.config, n_keys, max(sc, sc_v), float(ref.abs().max()), V)
            spread = float((lp_v.exp() * (lp_v - ref).abs()).sum())
            assert_within(ko["kl"][i, start], _kl64(lp_v, ref), lpb * (2 + spread), f"knockout {r.pair} {start}")
            assert_within(ko["lp"][i, start], float(ref[int(lp_v.argmax())]), 2 * lpb, f"knockout lp {r.pair}")
    # patching: at site 0 the suffix holds identical token embeddings (nothing recovered: the
    # baseline's output); the last position's final residual is the variant's own (everything)
    for r in pre.itertuples():
        i = row[int(r.pair)]
        lp_v, _, sc_v = _hf_run(model, plan.prompt_tokens(r.variant))
        lp_b, _, sc_b = _hf_run(model, plan.prompt_tokens(r.baseline))
        assert_within(pa["kl"][i, 0, 0], _kl64(lp_v, lp_b), _kl_bound(model, n_keys, lp_v, lp_b, max(sc_v, sc_b)),
                      f"suffix patching at site 0, pair {r.pair}")
        assert_below(pa["kl"][i, 1, -1], kl_floor(float(-(lp_v.exp() * lp_v).sum()), V),
                     f"last-position patching at site L, pair {r.pair}")


def test_prefix_knockout_from_layer_zero_recovers_the_baseline(tok, tmp_path):
    """Knocking the prefix span out in every layer leaves every later token seeing exactly
    the baseline's tokens; only their positions differ (shifted by the prefix's length). In
    a model without positional encoding (rotary frequencies zeroed) nothing else differs,
    so the knocked-out variant's next-token distribution is the baseline's, to float32
    rounding; with rotary positions the shift alone leaves a measurable difference, so the
    test can tell the two apart."""
    nope = tiny_llama(tok, n_layers=3, seed=2)
    with torch.no_grad():
        for m in nope.modules():
            if hasattr(m, "inv_freq"):
                m.inv_freq.zero_()  # cos = 1, sin = 0: rotary embedding is the identity at every position
    st = _run(tok, tmp_path, nope, analyses=("knockout",))
    ko, _ = st.read_causal("knockout")
    pre = set(_prefix_pairs(st).pair)
    rows = np.array([i for i, p in enumerate(ko["pair"]) if int(p) in pre])
    n_keys = int(st.plan.prompts["n_tokens"].max())
    V = nope.config.vocab_size
    # two float32 runs of one distribution over different key sets and batch shapes: the KL
    # floor of their log-softmax rounding, plus the logits' forward-chain rounding (squared)
    dz = 2 * forward_bound(nope.config, n_keys, logit_scale_of(st))
    floor = kl_floor(np.log(V), V, dz)
    assert_below(ko["kl_ko0_b"][rows], floor, "prefix knocked out from layer 0 vs baseline (no positions)")
    assert (ko["kl_vb"][rows] > 20 * floor).all()  # the prefix itself moved the output: the test has room
    # the same with rotary positions: knocking the prefix out leaves the position shift
    (tmp_path / "rope").mkdir()
    rope = _run(tok, tmp_path / "rope", tiny_llama(tok, n_layers=3, seed=2), analyses=("knockout",))
    ko2, _ = rope.read_causal("knockout")
    assert (ko2["kl_ko0_b"][rows] > floor).any()


def test_prefix_phrases_and_placement_tables(store, model, tok, tmp_path):
    import promptshift.metrics as metrics

    ph, meta = store.read_causal("phrases")
    labels = {p["system"] for p in meta["phrases"]}
    assert {"prefix:brief", "prefix:arr", "brief", "pirate", "french"} == labels
    # leaving out a phrase of a prefix: the conversation with the rest of the prefix, by hand
    _eager(model)
    rows = [(i, p) for i, p in enumerate(meta["phrases"]) if p["system"] == "prefix:brief"]
    assert len(rows) == 2  # "Be brief." and the rest
    users = {u["id"]: u["text"] for u in USERS}
    text = PREFIXES[0]["text"]
    plan = store.plan
    for i, p in rows:
        rest = (text[: p["start"]] + text[p["end"]:]).strip()
        for j, u in enumerate(meta["users"]):
            msgs = [{"role": "system", "content": ""},
                    {"role": "user", "content": rest + "\n\n" + users[u]}]
            ids = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                      add_special_tokens=False)["input_ids"]
            ref, _, sc = _hf_run(model, ids)
            v = int(plan.pairs[(plan.pairs.system == "prefix:brief") & (plan.pairs.user_id == u)].variant.iloc[0])
            lp_v, _, sc_v = _hf_run(model, plan.prompt_tokens(v))
            n_keys = max(len(ids), len(plan.prompt_tokens(v)))
            assert_within(ph["kl_va"][i, j], _kl64(lp_v, ref), _kl_bound(model, n_keys, lp_v, ref, max(sc, sc_v)),
                          f"phrase {i} left out, user {u}")
    # metrics: system-prompt causal tables leave the prefixes out; placement compares both places
    t = metrics.compute(store, tmp_path / "out", workers=0, n_boot=50, progress=False)
    assert set(t["causal_knockout"]["system"]) == {"brief", "pirate", "french"}
    pc = t["placement_compare"]
    got = set(pc.loc[pc.measure.str.contains(":patching_|:knockout", regex=True), "measure"])
    assert got == {"onset:patching_suffix", "onset:patching_last", "stops_mattering:knockout"}
    cur = t["placement_causal"]
    from tests.metrics.test_placement import documented

    assert set(cur.columns) <= documented("placement_causal")  # docs/RESULTS.md, as written
    assert set(cur.analysis) <= documented("placement_causal")
    assert set(cur.placement) == {"system", "prefix"} and set(cur.analysis) == {"patching_suffix", "patching_last",
                                                                                  "knockout"}
    # a curve is the ratio of sums over the label's pairs
    ko, _ = store.read_causal("knockout")
    pairs = plan.pairs.set_index("pair")
    idx = [k for k, p in enumerate(ko["pair"]) if pairs.loc[int(p), "system"] == "prefix:arr"]
    kl64 = ko["kl"][idx].astype(np.float64)
    want = kl64.sum(0) / kl64[:, 0].sum()
    got = cur[(cur.prefix == "arr") & (cur.placement == "prefix") & (cur.analysis == "knockout")].sort_values("site")
    # float64 ratios of the same float32 values, summed in another order
    assert np.allclose(got["value"].to_numpy(), want, rtol=1e-12, equal_nan=True)
