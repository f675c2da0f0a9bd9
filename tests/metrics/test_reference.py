"""Every metric against a plain per-pair / per-prompt numpy reference written here,
independently of promptshift.metrics, on a synthetic store with known values."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

import promptshift.metrics as metrics
from promptshift.metrics.bootstrap import crossed_weights, estimate_weights, user_weights
from promptshift.store.core import open_store
from promptshift.vocabulary import REGIONS
from tests.metrics import synth

# Both sides compute in float64 from the same stored float32 values, so they differ only by
# float64 rounding in other orders of summation: at most (n - 1) * 2**-53 * sum|x_i| for
# sums of n terms (Higham 2002, section 4.2), below 1e-11 for these sums of at most a few
# thousand values of magnitude <= 100. 1e-6 leaves five orders of magnitude of room and is
# still far below any formula difference (a missing centering, a wrong denominator).
TOL = 1e-6
SINK = REGIONS.index("sink")


# --- references ------------------------------------------------------------------------
def ref_component_change(store) -> pd.DataFrame:
    plan = store.plan
    pr = plan.prompts
    comps = store.components
    mu = {c: np.concatenate([store.component(c, p) for p in range(plan.n_prompts)]).astype(np.float64).mean(0)
          for c in comps}
    rows = []

    def metrics_of(x, y, m):  # x, y, m (L, H) -> {name: (L,)}
        L = x.shape[0]
        out = {k: np.zeros(L) for k in ("cosine", "cosine_centered", "l2", "rel_change", "norm_variant",
                                         "norm_baseline")}
        for layer in range(L):
            a, b, c = x[layer], y[layer], m[layer]
            if np.linalg.norm(a - c) == 0 or np.linalg.norm(b - c) == 0:  # centred cosine undefined
                c = None
            out["cosine"][layer] = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
            out["cosine_centered"][layer] = (np.nan if c is None else
                                             (a - c) @ (b - c) / (np.linalg.norm(a - c) * np.linalg.norm(b - c)))
            out["l2"][layer] = np.linalg.norm(a - b)
            out["rel_change"][layer] = np.linalg.norm(a - b) / np.linalg.norm(b)
            out["norm_variant"][layer] = np.linalg.norm(a)
            out["norm_baseline"][layer] = np.linalg.norm(b)
        return out

    def emit(pair, comp, position, vals, is_control):
        for layer in range(len(vals["cosine"])):
            rows.append(dict(pair=pair, component=comp, position=position, layer=layer, is_control=is_control,
                             **{k: v[layer] for k, v in vals.items()}))

    for _, pa in plan.pairs.iterrows():
        v, b = int(pa.variant), int(pa.baseline)
        ksv, ksb = int(pr.keep_start[v]), int(pr.keep_start[b])
        regs = plan.prompt_regions(v)
        for c in comps:
            X = store.component(c, v).astype(np.float64)
            Y = store.component(c, b).astype(np.float64)
            toks = []
            for j in range(int(pa.suffix_len)):
                pv, pb = int(pa.v_suffix_start) + j, int(pa.b_suffix_start) + j
                if pv < ksv or pb < ksb:
                    continue
                toks.append((int(regs[pv]), metrics_of(X[pv - ksv], Y[pb - ksb], mu[c])))
            emit(int(pa.pair), c, "last", toks[-1][1], False)
            if plan.sweep.keep != "last":
                mean = {k: np.mean([t[1][k] for t in toks], axis=0) for k in toks[0][1]}
                emit(int(pa.pair), c, "suffix_mean", mean, False)
                for r in sorted({t[0] for t in toks}):
                    sel = [t[1] for t in toks if t[0] == r]
                    emit(int(pa.pair), c, REGIONS[r], {k: np.mean([s[k] for s in sel], axis=0) for k in sel[0]},
                         False)
    for _, ct in plan.controls.iterrows():
        a, b = int(ct.prompt_a), int(ct.prompt_b)
        for c in comps:
            x = store.component(c, a)[-1].astype(np.float64)
            y = store.component(c, b)[-1].astype(np.float64)
            emit(-1 - int(ct.control), c, "last", metrics_of(x, y, mu[c]), True)
    return pd.DataFrame(rows)


def ref_tokens(store, comp: str, layer: int) -> list[tuple[int, float]]:
    """(index from the end, rel_change) of every aligned token of every pair."""
    plan = store.plan
    pr = plan.prompts
    out = []
    for _, pa in plan.pairs.iterrows():
        v, b = int(pa.variant), int(pa.baseline)
        X, Y = store.component(comp, v).astype(np.float64), store.component(comp, b).astype(np.float64)
        for j in range(int(pa.suffix_len)):
            x = X[int(pa.v_suffix_start) + j - int(pr.keep_start[v]), layer]
            y = Y[int(pa.b_suffix_start) + j - int(pr.keep_start[b]), layer]
            out.append((int(pa.suffix_len) - 1 - j, np.linalg.norm(x - y) / np.linalg.norm(y)))
    return out


def ref_attention(store, truth):
    """heads rows (prompt, scope, layer, head, region) and layer rows from full matrices."""
    plan = store.plan
    heads, layers = [], []
    for p in range(plan.n_prompts):
        A = truth["attn"][p]  # (L, NH, n, n)
        L, NH, n, _ = A.shape
        reg = plan.prompt_regions(p)
        last = store.attn_last_row(p).astype(np.float64)  # (n, L, NH) float16 as stored
        for layer in range(L):
            for h in range(NH):
                row = last[:, layer, h]
                ent_last = -sum(x * math.log(x) for x in row if x > 0)
                ents = [-sum(x * math.log(x) for x in A[layer, h, i, : i + 1] if x > 0) for i in range(n)]
                for scope in ("last", "all"):
                    mass = {}
                    for r in range(len(REGIONS)):
                        if scope == "last":
                            mass[r] = row[reg == r].sum()
                        else:
                            mass[r] = np.mean([A[layer, h, i, reg == r].sum() for i in range(n)])
                    for r in range(len(REGIONS)):
                        if scope == "last":
                            uni = (reg == r).sum() / n
                        else:
                            uni = np.mean([(reg[: i + 1] == r).sum() / (i + 1) for i in range(n)])
                        heads.append(dict(prompt=p, scope=scope, layer=layer, head=h, region=REGIONS[r], mass=mass[r],
                                          mass_nosink=np.nan if r == SINK else mass[r] / (1 - mass[SINK]),
                                          uniform=uni, entropy=ent_last if scope == "last" else np.mean(ents)))
            sinks = [A[layer, h, 1:, 0].mean() for h in range(NH)]
            ent_all = np.mean([np.mean([-sum(x * math.log(x) for x in A[layer, h, i, : i + 1] if x > 0)
                                        for i in range(n)]) for h in range(NH)])
            k = min(5, n)  # the notebook's "recent tokens": the last 5 keys of the last query's row
            layers.append(dict(prompt=p, layer=layer, sink_rate=np.mean([s > 0.3 for s in sinks]),
                               sink_mass=np.mean(sinks), entropy=ent_all,
                               recent_mass=np.mean([last[n - k :, layer, h].sum() for h in range(NH)]),
                               recent_uniform=k / n))
    return pd.DataFrame(heads), pd.DataFrame(layers)


def ref_topk_divergence(ids_p, lp_p, ids_q, lp_q):
    """KL(P||Q), JS on union-of-top-k buckets + rest, as the docstring of metrics.output says."""
    P = {int(t): math.exp(x) for t, x in zip(ids_p, lp_p)}
    Q = {int(t): math.exp(x) for t, x in zip(ids_q, lp_q)}
    union = list(dict.fromkeys([int(t) for t in ids_p] + [int(t) for t in ids_q]))
    miss_p = [t for t in union if t not in P]
    miss_q = [t for t in union if t not in Q]
    rp, rq = max(0.0, 1 - sum(P.values())), max(0.0, 1 - sum(Q.values()))
    ep = min(min(P.values()), rp / (len(miss_p) + 1))
    eq = min(min(Q.values()), rq / (len(miss_q) + 1))
    p = [P.get(t, ep) for t in union] + [rp - len(miss_p) * ep]
    q = [Q.get(t, eq) for t in union] + [rq - len(miss_q) * eq]
    p = [max(x, 1e-12) for x in p]
    q = [max(x, 1e-12) for x in q]
    kl = sum(a * math.log(a / b) for a, b in zip(p, q))
    m = [(a + b) / 2 for a, b in zip(p, q)]
    js = 0.5 * sum(a * math.log(a / c) for a, c in zip(p, m)) + 0.5 * sum(b * math.log(b / c) for b, c in zip(q, m))
    return kl, js


def ref_edit(a, b):
    D = np.zeros((len(a) + 1, len(b) + 1), int)
    D[:, 0] = np.arange(len(a) + 1)
    D[0, :] = np.arange(len(b) + 1)
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            D[i, j] = min(D[i - 1, j] + 1, D[i, j - 1] + 1, D[i - 1, j - 1] + (a[i - 1] != b[j - 1]))
    return int(D[-1, -1])


def _assert_close(ours: pd.DataFrame, ref: pd.DataFrame, keys, cols, tol=TOL):
    m = ref.merge(ours, on=keys, how="left", suffixes=("_ref", ""), validate="one_to_one")
    assert len(m) == len(ref)
    for c in cols:
        a, b = m[c].to_numpy(np.float64), m[f"{c}_ref"].to_numpy(np.float64)
        assert np.array_equal(np.isnan(a), np.isnan(b)), c
        ok = ~np.isnan(a)
        err = np.abs(a[ok] - b[ok]).max() if ok.any() else 0.0
        assert err <= tol, f"{c}: max abs error {err}"


# --- tests -----------------------------------------------------------------------------
@pytest.mark.parametrize("keep", ["suffix", "all", "last"])
def test_component_change_matches_reference(keep, synth_store, synth_tables, tok, tmp_path):
    if keep == "suffix":
        path, tables = synth_store[0], synth_tables[0]
    else:
        synth.build(tmp_path / "s.zarr", keep=keep, tok=tok, seed=1)
        path = tmp_path / "s.zarr"
        tables = metrics.compute(path, None, workers=0, n_boot=50, progress=False)
    store = open_store(path)
    ref = ref_component_change(store)
    ours = tables["component_change"]
    assert len(ours) == len(ref)
    _assert_close(ours, ref, ["pair", "component", "position", "layer", "is_control"],
                  ["cosine", "cosine_centered", "l2", "rel_change", "norm_variant", "norm_baseline"])
    # resid_pre at layer 0 is the token embedding, identical at aligned tokens: exactly no change
    emb = ours[(ours.component == "resid_pre") & (ours.layer == 0) & ~ours.is_control]
    assert (emb["l2"] == 0).all() and (emb["rel_change"] == 0).all()
    # pair columns
    pairs = store.plan.pairs.set_index("pair")
    sel = ours[~ours.is_control]
    assert (sel["system"].to_numpy() == pairs.loc[sel["pair"], "system"].to_numpy()).all()
    assert (ours[ours.is_control]["system"] == "__control__").all()
    expected_pos = {"last"} if keep == "last" else {"last", "suffix_mean", "user", "gen_prompt", "template"}
    assert set(sel["position"]) <= expected_pos | {"assistant"} and "last" in set(sel["position"])
    if keep != "last":
        assert {"suffix_mean", "user", "gen_prompt"} <= set(sel["position"])


def test_attention_matches_reference(synth_store, synth_tables):
    path, truth = synth_store
    tables = synth_tables[0]
    store = open_store(path)
    heads, layers = ref_attention(store, truth)
    _assert_close(tables["attention_heads"], heads, ["prompt", "scope", "layer", "head", "region"],
                  ["mass", "mass_nosink", "uniform", "entropy"])
    regions = heads.groupby(["prompt", "scope", "layer", "region"], as_index=False)[
        ["mass", "mass_nosink", "uniform", "entropy"]].mean()
    regions.loc[regions.region == "sink", "mass_nosink"] = np.nan
    _assert_close(tables["attention_regions"], regions, ["prompt", "scope", "layer", "region"],
                  ["mass", "mass_nosink", "uniform", "entropy"])
    _assert_close(tables["attention_layers"], layers, ["prompt", "layer"],
                  ["sink_rate", "sink_mass", "entropy", "recent_mass", "recent_uniform"])
    ar = tables["attention_regions"]
    assert set(ar["role"]) == {"baseline", "variant"}
    assert 0 < tables["attention_layers"]["sink_rate"].mean() < 1  # head 1 sinks, head 0 does not


def test_attention_change_matches_reference(synth_store, synth_tables):
    store = open_store(synth_store[0])
    plan = store.plan
    rows = []
    for _, pa in plan.pairs.iterrows():
        v, b = int(pa.variant), int(pa.baseline)
        fv, fb = store.attn_last_row(v).astype(np.float64), store.attn_last_row(b).astype(np.float64)
        rv, rb = plan.prompt_regions(v), plan.prompt_regions(b)
        n = int(pa.suffix_len)
        for layer in range(fv.shape[1]):
            tv = []
            for h in range(fv.shape[2]):
                a = fv[int(pa.v_suffix_start): int(pa.v_suffix_start) + n, layer, h]
                c = fb[int(pa.b_suffix_start): int(pa.b_suffix_start) + n, layer, h]
                tv.append(0.5 * np.abs(a / a.sum() - c / c.sum()).sum())
            rows.append(dict(pair=int(pa.pair), layer=layer, tv_aligned=np.mean(tv),
                             mass_system_variant=fv[rv == REGIONS.index("system"), layer].sum(0).mean(),
                             mass_user_variant=fv[rv == REGIONS.index("user"), layer].sum(0).mean(),
                             mass_user_baseline=fb[rb == REGIONS.index("user"), layer].sum(0).mean()))
    _assert_close(synth_tables[0]["attention_change"], pd.DataFrame(rows), ["pair", "layer"],
                  ["tv_aligned", "mass_system_variant", "mass_user_variant", "mass_user_baseline"])


def test_output_and_lens_match_reference(synth_store, synth_tables):
    store = open_store(synth_store[0])
    plan = store.plan
    ids, lp = store.array("logits_topk_ids")[...], store.array("logits_topk_logprobs")[...]
    ent = store.array("logits_entropy")[...]
    lids, llp = store.array("lens_topk_ids")[...], store.array("lens_topk_logprobs")[...]
    final = store.array("lens_final_top1_logprob")[...]
    gid, glen = store.array("gen_ids")[...], store.array("gen_len")[...]
    out_rows, lens_rows = [], []
    for _, pa in plan.pairs.iterrows():
        v, b = int(pa.variant), int(pa.baseline)
        kl, js = ref_topk_divergence(ids[v], lp[v], ids[b], lp[b])
        gv, gb = list(gid[v, : glen[v]]), list(gid[b, : glen[b]])
        fd = next((i for i, (x, y) in enumerate(zip(gv, gb)) if x != y), None)
        if fd is None:
            fd = -1 if len(gv) == len(gb) else min(len(gv), len(gb))
        m = max(len(gv), len(gb))
        out_rows.append(dict(pair=int(pa.pair), kl=kl, js=js, top1_changed=float(ids[v, 0] != ids[b, 0]),
                             topk_overlap=len(set(ids[v]) & set(ids[b])) / ids.shape[1],
                             entropy_variant=ent[v], entropy_baseline=ent[b],
                             gen_edit_distance=ref_edit(gv, gb) / m if m else 0.0, first_divergence=fd,
                             len_change=len(gv) - len(gb)))
        for layer in range(lids.shape[1]):
            kll, _ = ref_topk_divergence(lids[v, layer], llp[v, layer], lids[b, layer], llp[b, layer])
            lens_rows.append(dict(pair=int(pa.pair), layer=layer, kl_lens=kll,
                                  top1_lens_variant=lids[v, layer, 0], top1_lens_baseline=lids[b, layer, 0],
                                  top1_agree=float(lids[v, layer, 0] == lids[b, layer, 0]),
                                  final_top1_logprob_variant=final[v, layer],
                                  final_top1_logprob_baseline=final[b, layer]))
    oc = synth_tables[0]["output_change"]
    _assert_close(oc, pd.DataFrame(out_rows), ["pair"],
                  ["kl", "js", "top1_changed", "topk_overlap", "entropy_variant", "entropy_baseline",
                   "gen_edit_distance", "first_divergence", "len_change"])
    assert oc["gen_edit_distance"].between(0, 1).all() and (oc["gen_edit_distance"] == 0).any()
    assert (oc["first_divergence"] == -1).any() and (oc["first_divergence"] >= 0).any()
    text = store.array("gen_text")[...]
    assert list(oc.sort_values("pair")["gen_variant"]) == [str(text[v]) for v in plan.pairs["variant"]]
    _assert_close(synth_tables[0]["lens_change"], pd.DataFrame(lens_rows), ["pair", "layer"],
                  ["kl_lens", "top1_lens_variant", "top1_lens_baseline", "top1_agree", "final_top1_logprob_variant",
                   "final_top1_logprob_baseline"])


def test_full_vocabulary_distances_match_scipy(synth_store, synth_tables):
    """kl_full / js_full / logit_cosine from the stored whole log-probability rows, against
    scipy's elementwise relative entropy (p log p/q; JS through the mixture m) and a plain
    cosine. Both sides work in float64 on the same float32 values: 1e-9 leaves room for
    summation order only (the issue's bar is 1e-5). scipy's jensenshannon renormalises p
    and q, whose sums differ from 1 by up to V x 2^-24 x max|log p| (~3e-5 here) after the
    float32 round trip, so it is compared at 1e-5."""
    from scipy.spatial.distance import jensenshannon
    from scipy.special import rel_entr

    store = open_store(synth_store[0])
    full = np.asarray(store.array("logits_logprobs")[...], dtype=np.float64)  # (P, V)
    assert full.shape == (store.plan.n_prompts, 50) and np.isfinite(full).all()
    oc = synth_tables[0]["output_change"].set_index("pair")
    for _, pa in store.plan.pairs.iterrows():
        a, b = full[int(pa.variant)], full[int(pa.baseline)]
        p, q = np.exp(a), np.exp(b)
        row = oc.loc[int(pa.pair)]
        assert abs(row["kl_full"] - rel_entr(p, q).sum()) <= 1e-9
        m = 0.5 * (p + q)
        assert abs(row["js_full"] - 0.5 * (rel_entr(p, m).sum() + rel_entr(q, m).sum())) <= 1e-9
        assert abs(row["js_full"] - jensenshannon(p, q) ** 2) <= 1e-5
        ca, cb = a - a.mean(), b - b.mean()
        assert abs(row["logit_cosine"] - ca @ cb / np.linalg.norm(ca) / np.linalg.norm(cb)) <= 1e-12


def test_user_attributes_are_pair_columns(synth_tables):
    """The prompt file's extra fields ride along as columns of every per-pair table, for
    pairs and controls alike (a control takes its first prompt's), as text."""
    want = {"capital": ("easy", None), "add": ("2", "math,sum"), "poem": (None, None), "color": (None, None)}
    for name in ("component_change", "attention_change", "output_change", "lens_change"):
        t = synth_tables[0][name]
        assert list(t.columns[:6]) == ["pair", "system", "user_id", "category", "difficulty", "type"], name
        for u, values in want.items():
            rows = t[t["user_id"] == u]
            assert len(rows), (name, u)
            for col, v in zip(("difficulty", "type"), values):
                assert rows[col].isna().all() if v is None else (rows[col] == v).all(), (name, u, col)
    cc = synth_tables[0]["component_change"]
    assert cc.loc[cc["is_control"] & (cc["user_id"] == "capital"), "difficulty"].eq("easy").all()


def test_topk_kl_approximates_exact_kl():
    """Against the exact KL of full distributions, when the top-k holds most of the mass."""
    from promptshift.metrics.output import topk_kl_js

    rng = np.random.default_rng(3)
    V, k, N = 2000, 64, 200
    z = rng.gumbel(size=(N, V)) * 2.5  # heavy head, long flat tail
    zq = z + rng.normal(0, 0.7, size=(N, V))
    lp = z - np.log(np.exp(z).sum(1, keepdims=True))
    lq = zq - np.log(np.exp(zq).sum(1, keepdims=True))
    exact_kl = (np.exp(lp) * (lp - lq)).sum(1)
    m = 0.5 * (np.exp(lp) + np.exp(lq))
    exact_js = 0.5 * (np.exp(lp) * (lp - np.log(m))).sum(1) + 0.5 * (np.exp(lq) * (lq - np.log(m))).sum(1)
    ip, iq = np.argsort(-lp, 1)[:, :k], np.argsort(-lq, 1)[:, :k]
    tp, tq = np.take_along_axis(lp, ip, 1), np.take_along_axis(lq, iq, 1)
    cover = np.minimum(np.exp(tp).sum(1), np.exp(tq).sum(1))
    sel = cover >= 0.95
    assert sel.sum() >= 20, "synthetic distributions should mostly have k covering 95% of the mass"
    kl, js = topk_kl_js(ip, tp, iq, tq)
    # error is of the order of the uncovered mass
    assert np.all(np.abs(kl[sel] - exact_kl[sel]) <= 0.05 + 0.05 * exact_kl[sel])
    assert np.all(np.abs(js[sel] - exact_js[sel]) <= 0.02)
    assert np.corrcoef(kl[sel], exact_kl[sel])[0, 1] > 0.99
    # full support: exact
    f = slice(0, 8)
    ip, iq = np.argsort(-lp[f], 1), np.argsort(-lq[f], 1)
    kl_full, js_full = topk_kl_js(ip, np.take_along_axis(lp[f], ip, 1), iq, np.take_along_axis(lq[f], iq, 1))
    assert np.allclose(kl_full, exact_kl[f], atol=1e-6) and np.allclose(js_full, exact_js[f], atol=1e-6)


def _pigeonhole(df: pd.DataFrame, systems: list[str], users: list[str], ws_b: np.ndarray, wu_b: np.ndarray):
    """The rows of one pigeonhole resample, written out: every (drawn system, drawn user) cell,
    each drawn system and user repeated as often as it was drawn."""
    drawn_s = [s for i, s in enumerate(systems) for _ in range(int(ws_b[i]))]
    drawn_u = [u for i, u in enumerate(users) for _ in range(int(wu_b[i]))]
    return pd.concat([df[(df.system == s) & (df.user_id == u)] for s in drawn_s for u in drawn_u])


def test_analyses_against_plain_loops(synth_store, synth_tables):
    """Means are plain means; CIs equal a naive loop over the same crossed resamples (system
    prompts and user prompts drawn independently, every drawn cell kept)."""
    from scipy import stats

    tables = synth_tables[0]
    store = open_store(synth_store[0])
    plan = store.plan
    users = [u.id for u in plan.sweep.user_prompts]
    systems = [s.name for s in plan.sweep.variants]
    ws, wu = crossed_weights(len(systems), len(users), 200, 0)
    assert np.array_equal(wu, user_weights(len(users), 200, 0))  # the user half is the user-only bootstrap
    cc = tables["component_change"]
    last = cc[(cc.position == "last")]
    lr = tables["layer_ranking"]
    # layer ranking: mean over pairs, control mean, CI by a loop over resamples
    for comp, layer in (("resid_post", 2), ("attn_out", 0)):
        g = last[(last.component == comp) & (last.layer == layer)]
        pairs, ctrl = g[~g.is_control], g[g.is_control]
        row = lr[(lr.component == comp) & (lr.layer == layer) & (lr.metric == "rel_change")
                 & (lr.position == "last")].iloc[0]
        assert abs(row["mean"] - pairs.rel_change.mean()) <= 1e-12
        assert abs(row["control_mean"] - ctrl.rel_change.mean()) <= 1e-12
        boots = [_pigeonhole(pairs, systems, users, ws[b], wu[b]).rel_change.mean() for b in range(len(wu))]
        lo, hi = np.percentile(boots, [2.5, 97.5])
        assert abs(row["ci_low"] - lo) <= 1e-9 and abs(row["ci_high"] - hi) <= 1e-9
    ranks = lr[(lr.metric == "rel_change") & (lr.position == "last") & (lr.component == "mlp_out")]
    assert ranks.sort_values("rank")["mean"].is_monotonic_decreasing

    # internal vs output: Pearson/Spearman r from scipy; CIs from the same loop
    io = tables["internal_vs_output"]
    oc = tables["output_change"].set_index("pair")
    g = last[(last.component == "resid_post") & (last.layer == 1) & ~last.is_control].sort_values("pair")
    g = g.assign(kl=oc.loc[g["pair"], "kl"].to_numpy())
    for method, fn in (("pearson", stats.pearsonr), ("spearman", stats.spearmanr)):
        row = io[(io.component == "resid_post") & (io.layer == 1) & (io.measure == "rel_change")
                 & (io.output == "kl") & (io.method == method)].iloc[0]
        res = fn(g["rel_change"], g["kl"])
        assert abs(row["r"] - res.statistic) <= 1e-9
        boots = []
        for b in range(len(wu)):
            sample = _pigeonhole(g, systems, users, ws[b], wu[b])
            boots.append(fn(sample["rel_change"], sample["kl"]).statistic if sample["rel_change"].nunique() > 1
                         and sample["kl"].nunique() > 1 else np.nan)
        lo, hi = np.nanpercentile(boots, [2.5, 97.5])
        assert abs(row["ci_low"] - lo) <= 1e-9 and abs(row["ci_high"] - hi) <= 1e-9, method

    # length: per system impact and r across systems; the CI resamples systems and users
    li = tables["length_impact"].set_index("system")
    imp = last[(last.component == "resid_post") & ~last.is_control].groupby("pair").rel_change.mean()
    pairs = plan.pairs.set_index("pair")
    per_sys = imp.groupby(pairs.loc[imp.index, "system"].to_numpy()).mean()
    assert np.allclose(li.loc[per_sys.index, "impact"], per_sys, atol=1e-12)
    lt = tables["length_tests"]
    row = lt[(lt.family == "all") & (lt.target == "impact") & (lt.method == "pearson")].iloc[0]
    res = stats.pearsonr(li["n_system_tokens"], li["impact"])
    assert abs(row["r"] - res.statistic) <= 1e-9
    imp_df = pd.DataFrame({"impact": imp.to_numpy(), "system": pairs.loc[imp.index, "system"].to_numpy(),
                           "user_id": pairs.loc[imp.index, "user_id"].to_numpy()})
    length = li["n_system_tokens"].astype(float)
    boots = []
    for b in range(len(wu)):
        drawn_u = [u for i, u in enumerate(users) for _ in range(int(wu[b, i]))]
        xs, ys = [], []
        for i, s in enumerate(systems):
            mine = imp_df[imp_df.system == s].set_index("user_id")["impact"]
            m = np.mean([mine[u] for u in drawn_u])  # this system's mean over the drawn user prompts
            xs += [length[s]] * int(ws[b, i])
            ys += [m] * int(ws[b, i])
        boots.append(np.corrcoef(xs, ys)[0, 1] if len(set(xs)) > 1 else np.nan)
    lo, hi = np.nanpercentile(boots, [2.5, 97.5])
    assert abs(row["ci_low"] - lo) <= 1e-9 and abs(row["ci_high"] - hi) <= 1e-9
    assert set(lt["family"]) == {"all", "concise"}  # the concise family has 3 members

    # tags: with/without means over pairs
    ti = tables["tag_impact"].set_index(["source", "tag", "target"])
    system_of = pairs.loc[imp.index, "system"]
    for key, members in ((("tag", "persona"), ["pirate"]), (("tag", "concise"), ["brief", "brief_long", "brief_longer"]),
                         # keyword features of the texts: "You are a pirate" (persona), "Be brief" (brevity),
                         # "never explain" (constraint)
                         (("keyword", "persona"), ["pirate"]),
                         (("keyword", "brevity"), ["brief", "brief_long", "brief_longer"]),
                         (("keyword", "constraint"), ["brief_long", "brief_longer"])):
        has = system_of.isin(members).to_numpy()
        r = ti.loc[(*key, "impact")]
        assert abs(r["with_mean"] - imp[has].mean()) <= 1e-12 and abs(r["without_mean"] - imp[~has].mean()) <= 1e-12
        assert r["n_with"] == has.sum(), key
    assert set(ti.loc["keyword"].index.get_level_values("tag")) == {"persona", "brevity", "constraint"}
    # length vs top-1 change rate and vs attention to the system tokens: plain per-system means
    oc = tables["output_change"].set_index("pair")
    top1 = oc.loc[imp.index, "top1_changed"].astype(float).groupby(system_of.to_numpy()).mean()
    assert np.allclose(li.loc[top1.index, "top1_change_rate"], top1, atol=1e-12)
    ach = tables["attention_change"]
    att = ach.groupby("pair")["mass_system_variant"].mean()
    att = att.loc[imp.index].groupby(system_of.to_numpy()).mean()
    assert np.allclose(li.loc[att.index, "attn_system"], att, atol=1e-12)
    pr = plan.prompts[plan.prompts.kind == "variant"]
    uni = (pr.n_system_tokens / pr.n_tokens).groupby(pr.system).mean()
    assert np.allclose(li.loc[uni.index, "attn_system_uniform"], uni, atol=1e-12)
    assert list(li.loc[["brief", "pirate"], "n_words"]) == [2, 11]
    for target, col in (("top1_changed", "top1_change_rate"), ("attn_system", "attn_system")):
        row = lt[(lt.family == "all") & (lt.target == target) & (lt.method == "spearman")].iloc[0]
        if li[col].nunique() == 1:  # every synthetic pair changes its top-1: r is undefined
            assert np.isnan(row["r"]), target
        else:
            assert abs(row["r"] - stats.spearmanr(li["n_system_tokens"], li[col]).statistic) <= 1e-9, target

    # position change: region rows are means of component_change region rows; index 0 is `last`
    pc = tables["position_change"]
    reg = cc[(cc.position == "user") & (cc.component == "mlp_out") & (cc.layer == 0)]
    row = pc[(pc.axis == "region") & (pc.region == "user") & (pc.component == "mlp_out") & (pc.layer == 0)].iloc[0]
    assert abs(row["mean"] - reg.rel_change.mean()) <= 1e-12
    assert set(pc["axis"]) == {"region", "from_end"}
    sel = pc[(pc.axis == "from_end") & (pc.component == "mlp_out") & (pc.layer == 0)].set_index("from_end")
    g = last[(last.component == "mlp_out") & (last.layer == 0) & ~last.is_control]
    assert abs(sel.loc[0, "mean"] - g.rel_change.mean()) <= 1e-12
    assert sel.loc[0, "region"] == "gen_prompt"
    # a deeper index: per-token reference over pairs whose aligned suffix reaches it
    toks = ref_tokens(store, "mlp_out", 0)
    for k in (3, 7):
        vals = [r for (f, r) in toks if f == k]
        assert sel.loc[k, "n_pairs"] == len(vals) and abs(sel.loc[k, "mean"] - np.mean(vals)) <= 1e-9


def test_summary(synth_tables):
    import json

    tables, out = synth_tables
    s = json.loads((out / "summary.json").read_text())
    assert set(s) >= {"n_pairs", "n_controls", "model", "sample", "selection", "most_affected_layer", "control_floor",
                      "effects_above_control", "length", "tags", "attention_shares", "strongest_internal_output",
                      "output", "lens_shift_layer"}
    assert s["n_pairs"] == 16 and s["n_controls"] == 4 and s["model"] == "synthetic"
    # 4 system prompts and 4 user prompts: both named small
    assert s["sample"]["n_systems"] == 4 and s["sample"]["n_users"] == 4 and s["sample"]["resampling"] == "crossed"
    assert s["sample"]["small"] == ["system prompts", "user prompts"]
    # the most affected layer: chosen on the selection half, measured on the other half
    sel, est = s["selection"]["select_users"], s["selection"]["estimate_users"]
    assert s["selection"]["method"] == "split"
    assert sorted(sel + est) == sorted(u.id for u in synth.sweep_config().user_prompts)
    assert len(sel) == len(est) == 2 and not set(sel) & set(est)
    cc = tables["component_change"]
    g = cc[(cc.component == "resid_post") & (cc.position == "last") & ~cc.is_control]
    layer = int(g[g.user_id.isin(sel)].groupby("layer").rel_change.mean().idxmax())
    d = s["most_affected_layer"]["resid_post"]
    assert d["layer"] == layer and d["selection"] == "split"
    held = g[g.user_id.isin(est) & (g.layer == layer)]
    assert d["mean"] == pytest.approx(held.rel_change.mean(), abs=1e-12) and d["n_pairs"] == len(held)
    users = [u.id for u in synth.sweep_config().user_prompts]
    systems = [v.name for v in synth.sweep_config().variants]
    ws, _ = crossed_weights(len(systems), len(users), 200, 0)
    w_est = estimate_weights(np.isin(users, sel), 200, 0)
    assert (w_est[:, np.isin(users, sel)] == 0).all() and (w_est.sum(1) == len(est)).all()
    boots = [_pigeonhole(held, systems, users, ws[b], w_est[b]).rel_change.mean() for b in range(200)]
    assert d["ci"] == pytest.approx(list(np.percentile(boots, [2.5, 97.5])), abs=1e-9)
    ctrl = cc[(cc.component == "resid_post") & (cc.position == "last") & cc.is_control & (cc.layer == layer)]
    assert s["control_floor"]["resid_post"] == pytest.approx(ctrl.rel_change.mean())
    # above the floor only when the whole held-out interval is
    assert s["effects_above_control"] == bool(d["ci"][0] > s["control_floor"]["resid_post"])
    assert ("NOT above control" in s["effects_note"]) == (not s["effects_above_control"])
    assert set(s["attention_shares"]) == {"sink", "system", "user", "gen_prompt", "template", "recent"}
    al = tables["attention_layers"]
    assert s["attention_shares"]["recent"] == pytest.approx(al.loc[al.role == "variant", "recent_mass"].mean())
    assert s["tags"]["source"] == "tag"  # declared tags win over keyword features when a sweep has them
    ti = tables["tag_impact"]
    assert [t["tag"] for t in s["tags"]["items"]] == sorted(ti.loc[ti.source == "tag", "tag"].unique())
    assert s["tags"]["n_tags"] == 4 and s["tags"]["level"] == pytest.approx(1 - 0.05 / 4)
    assert s["output"]["mean_kl"] == pytest.approx(tables["output_change"]["kl"].mean())
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["model_id"] == "synthetic" and prov["plan_hash"] and prov["metrics"]["n_boot"] == 200
    loaded = metrics.load_results(out)
    assert set(loaded) == set(metrics.TABLES)
    for name, df in tables.items():
        pd.testing.assert_frame_equal(loaded[name], df, check_dtype=False)
        assert (out / f"{name}.csv").is_file()
