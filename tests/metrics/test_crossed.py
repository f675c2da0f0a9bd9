"""Statistics for the crossed design (system prompts × user prompts), without a store:
the pigeonhole bootstrap against a plain numpy reference, p-values that agree with their
intervals, the seeded split, selected maxima measured on held-out user prompts, and the
planted length effects the findings must (not) claim."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from promptshift.metrics import analyses as an
from promptshift.metrics import bootstrap
from promptshift.metrics.bootstrap import (
    across_corr, boot_p, corr_ci, crossed_mean, crossed_mean_long, crossed_weights, group_diff, mean_ci, pair_weights,
    percentile_ci, split_users, user_weights,
)
from promptshift.report.findings import findings


# --- the pigeonhole bootstrap against a reference that materialises each resample ---------
def test_crossed_mean_equals_materialised_pigeonhole_resamples():
    """Resample rows (system prompts) and columns (user prompts) of a matrix with missing
    cells by index draws, take the mean of the drawn sub-matrix; the matrix-product
    implementation fed the same draws as multiplicities gives the same values."""
    rng = np.random.default_rng(11)
    S, U, B = 5, 7, 300
    Y = rng.normal(size=(S, U)) + rng.normal(size=(S, 1)) + 2 * rng.normal(size=(1, U))
    Y[1, 3] = Y[4, 0] = np.nan  # two missing pairs
    rows = rng.integers(0, S, size=(B, S))
    cols = rng.integers(0, U, size=(B, U))
    ref = np.array([np.nanmean(Y[np.ix_(rows[b], cols[b])]) for b in range(B)])  # (B,)

    ws = np.stack([np.bincount(r, minlength=S) for r in rows]).astype(float)  # (B, S)
    wu = np.stack([np.bincount(c, minlength=U) for c in cols]).astype(float)  # (B, U)
    ok = np.isfinite(Y)
    mean, boot = crossed_mean(np.where(ok, Y, 0.0)[None], ok[None].astype(float), ws, wu)
    assert mean[0] == pytest.approx(np.nanmean(Y), abs=1e-12)
    # float64 sums of at most S*U*max-multiplicity terms: agreement to ~1e-13 relative
    np.testing.assert_allclose(boot[0], ref, rtol=1e-12, atol=1e-12)
    lo, hi = percentile_ci(boot[0])
    assert (lo, hi) == pytest.approx(tuple(np.percentile(ref, [2.5, 97.5])), abs=1e-12)

    # long form, several statistics at once, gives the same as the dense form
    s_idx, u_idx = np.nonzero(ok)
    m, bl = crossed_mean_long(np.zeros(len(s_idx), int), s_idx, u_idx, Y[ok], np.ones(ok.sum()), 1, ws, wu)
    np.testing.assert_allclose(bl[0], boot[0], rtol=1e-12)

    # a group difference: systems {0, 2} against the others
    member = np.array([True, False, True, False, False])
    diff, bd = group_diff(np.where(ok, Y, 0.0), ok.astype(float), member, ws, wu)
    ref_d = []
    for b in range(B):
        sub = Y[np.ix_(rows[b], cols[b])]
        inside = member[rows[b]]
        ref_d.append(np.nanmean(sub[inside]) - np.nanmean(sub[~inside]) if inside.any() and (~inside).any()
                     else np.nan)
    np.testing.assert_allclose(bd, ref_d, rtol=1e-12, atol=1e-12, equal_nan=True)


def test_across_corr_equals_materialised_resamples():
    """Correlation across system prompts of a fixed property with each system prompt's mean
    over the drawn user prompts, computed on the drawn system prompts (with repeats)."""
    from scipy import stats

    rng = np.random.default_rng(5)
    S, U, B = 9, 6, 200
    x = rng.integers(5, 200, size=S).astype(float)
    Y = 0.002 * x[:, None] + rng.normal(0, 0.2, size=(S, U)) + rng.normal(0, 1.0, size=(1, U))
    Y[2, 1] = np.nan
    rows = rng.integers(0, S, size=(B, S))
    cols = rng.integers(0, U, size=(B, U))
    ref_p, ref_s = [], []
    for b in range(B):
        sys_mean = np.nanmean(Y[:, cols[b]], axis=1)  # (S,) each system's mean over the drawn users
        xs, ys = x[rows[b]], sys_mean[rows[b]]
        fine = len(np.unique(xs)) > 1 and len(np.unique(ys)) > 1
        ref_p.append(np.corrcoef(xs, ys)[0, 1] if fine else np.nan)
        ref_s.append(stats.spearmanr(xs, ys).statistic if fine else np.nan)
    ws = np.stack([np.bincount(r, minlength=S) for r in rows]).astype(float)
    wu = np.stack([np.bincount(c, minlength=U) for c in cols]).astype(float)
    ok = np.isfinite(Y)
    res = across_corr(x, np.where(ok, Y, 0.0), ok.astype(float), ws, wu)
    for method, ref in (("pearson", ref_p), ("spearman", ref_s)):
        lo, hi = np.nanpercentile(ref, [2.5, 97.5])
        assert res[method]["ci_low"] == pytest.approx(lo, abs=1e-9)
        assert res[method]["ci_high"] == pytest.approx(hi, abs=1e-9)
    assert res["pearson"]["r"] == pytest.approx(stats.pearsonr(x, np.nanmean(Y, 1)).statistic, abs=1e-12)
    assert res["pearson"]["n"] == S and res["pearson"]["n_users"] == U


def test_corr_ci_in_blocks_of_resamples_equals_materialised_resamples(monkeypatch):
    """Correlations across pairs under the crossed bootstrap, with the resample weights
    built a few resamples at a time (blocks of 7 here, as at 100,000 pairs), equal r of
    each materialised resample: the drawn pairs repeated by their multiplicity, then numpy's
    Pearson and scipy's Spearman (mid-ranks of the repeated sample)."""
    from scipy import stats

    rng = np.random.default_rng(8)
    S, U, B = 6, 9, 50
    s_idx, u_idx = (a.reshape(-1) for a in np.meshgrid(np.arange(S), np.arange(U), indexing="ij"))  # (n,) pairs
    n = len(s_idx)
    y = rng.normal(size=n) + 0.5 * rng.normal(size=S)[s_idx]
    X = np.stack([y + rng.normal(0, s, size=n) for s in (0.5, 2.0)])  # (2, n)
    X[1, :4] = np.round(X[1, :4])  # some ties
    X[1, 4:8] = X[1, 0]
    y[3] = np.nan  # a pair left out of every row
    ws, wu = crossed_weights(S, U, B, seed=4)
    monkeypatch.setattr(bootstrap, "_PAIR_CHUNK", 7 * n)  # blocks of 7 resamples
    res = corr_ci(X, y, pair_weights(ws, wu, s_idx, u_idx))
    ok = np.isfinite(y)
    ref = {"pearson": np.empty((2, B)), "spearman": np.empty((2, B))}
    for b in range(B):
        rep = np.repeat(np.flatnonzero(ok), (ws[b, s_idx] * wu[b, u_idx])[ok].astype(int))  # the drawn pairs
        for m in range(2):
            ref["pearson"][m, b] = np.corrcoef(X[m, rep], y[rep])[0, 1]
            ref["spearman"][m, b] = stats.spearmanr(X[m, rep], y[rep]).statistic
    for method in ("pearson", "spearman"):
        lo, hi = percentile_ci(ref[method])
        np.testing.assert_allclose(res[method]["ci_low"], lo, atol=1e-9)
        np.testing.assert_allclose(res[method]["ci_high"], hi, atol=1e-9)
        np.testing.assert_allclose(res[method]["p"], boot_p(ref[method]), atol=1e-12)
        assert (res[method]["n"] == ok.sum()).all()
    np.testing.assert_allclose(res["pearson"]["r"], [np.corrcoef(x[ok], y[ok])[0, 1] for x in X], atol=1e-12)
    # the same weights given as one (B, n) matrix, in one block: the same intervals
    monkeypatch.setattr(bootstrap, "_PAIR_CHUNK", 1 << 21)
    dense = corr_ci(X, y, pair_weights(ws, wu, s_idx, u_idx).dense())
    for method in ("pearson", "spearman"):
        np.testing.assert_allclose(dense[method]["ci_low"], res[method]["ci_low"], atol=1e-12)


# --- p-values that agree with their intervals ------------------------------------------
def test_boot_p_is_below_alpha_exactly_when_the_interval_excludes_zero():
    rng = np.random.default_rng(3)
    cases = [rng.normal(mu, 1.0, 999) for mu in (-3.0, -1.9, -0.5, 0.0, 0.7, 1.96, 2.5, 5.0)]
    cases.append(np.round(rng.normal(0.3, 1.0, 500), 1))  # ties, some exactly at 0
    with_nan = rng.normal(1.5, 1.0, 400)
    with_nan[::7] = np.nan  # undefined resamples are left out, as in percentile_ci
    cases.append(with_nan)
    for boot in cases:
        p = float(boot_p(boot))
        for alpha in (0.01, 0.05, 0.1, 0.32):
            lo, hi = np.nanpercentile(boot, [50 * alpha, 100 - 50 * alpha])
            assert (p < alpha) == (lo > 0 or hi < 0), (p, alpha, lo, hi)
        if 0 < p < 1:  # at alpha = p one end of the interval sits on zero
            lo, hi = np.nanpercentile(boot, [50 * p, 100 - 50 * p])
            assert min(abs(lo), abs(hi)) <= 1e-9
    assert boot_p(np.full(10, 2.0)) == 0.0 and np.isnan(boot_p(np.full(5, np.nan)))
    assert boot_p(np.stack(cases[:3])).shape == (3,)


# --- the seeded split -------------------------------------------------------------------
def test_split_users_is_seeded_balanced_and_stratified():
    cats = ["a"] * 5 + ["b"] * 4 + ["c"] * 3
    s0 = split_users(12, 0, cats)
    assert np.array_equal(s0, split_users(12, 0, cats))  # fixed by the seed
    assert any(not np.array_equal(s0, split_users(12, k, cats)) for k in range(1, 6))
    assert s0.sum() == 6  # halves differ by at most one
    cats = np.asarray(cats)
    for c in "abc":  # every category lands in both halves (categories of 3 or more)
        assert 0 < s0[cats == c].sum() < (cats == c).sum()
    assert split_users(7, 0).sum() in (3, 4)
    assert split_users(1, 0).all()


# --- selected maxima measured on held-out user prompts ---------------------------------
def _context(S: int, U: int, n_boot: int, seed: int, lengths=None) -> an.Context:
    systems = pd.DataFrame({
        "name": [f"s{i}" for i in range(S)],
        "n_system_tokens": lengths if lengths is not None else np.arange(S) * 10 + 5,
        "family": None, "level": None, "tags": "", "tag_list": [()] * S,
    })
    users = [f"u{j}" for j in range(U)]
    pairs = pd.DataFrame([(i * U + j, f"s{i}", f"u{j}", "c") for i in range(S) for j in range(U)],
                         columns=["pair", "system", "user_id", "category"])
    return an.Context.draw(users, pairs, systems, "resid_post", n_boot, seed)


def _layers_frame(ctx: an.Context, means: np.ndarray, rng, noise: float = 0.15, user_sd: float = 0.1
                  ) -> pd.DataFrame:
    """component_change-like rows at `last` for one component: pair × layer, with a user
    effect shared by all layers of a user prompt and independent noise per pair and layer."""
    L = len(means)
    p = ctx.pairs
    user_eff = dict(zip(ctx.users, rng.normal(0, user_sd, len(ctx.users))))
    rows = p.loc[p.index.repeat(L)].reset_index(drop=True)
    rows["layer"] = np.tile(np.arange(L), len(p))
    rows["rel_change"] = (means[rows["layer"]] + rows["user_id"].map(user_eff).to_numpy()
                          + rng.normal(0, noise, len(rows)))
    rows["component"], rows["position"], rows["is_control"] = "resid_post", "last", False
    return rows


def test_held_out_peak_is_not_inflated_by_the_choice():
    """20 layers with the same true mean: the best layer's mean on the prompts it was chosen
    on is biased upwards; measured on the held-out half it is not, and its interval covers
    the truth. A real peak is found."""
    truth = 0.5
    in_sample, held, covered = [], [], []
    for k in range(30):
        ctx = _context(6, 12, 200, seed=k)
        cc = _layers_frame(ctx, np.full(20, truth), np.random.default_rng(100 + k), user_sd=0.02)
        d = an.held_out_peak(cc, ctx, "resid_post")
        assert d["selection"] == "split" and d["n_pairs"] == 6 * 6
        in_sample.append(d["mean_select"])
        held.append(d["mean"])
        covered.append(d["ci"][0] <= truth <= d["ci"][1])
    in_sample, held = np.array(in_sample), np.array(held)
    se = held.std(ddof=1) / np.sqrt(len(held))
    assert in_sample.mean() - truth > 5 * se  # the maximum of 20 noisy layer means is biased
    assert abs(held.mean() - truth) < 3 * se  # measured elsewhere it is not
    assert np.mean(covered) >= 0.8
    means = np.full(20, truth)
    means[7] = 0.8
    ctx = _context(6, 12, 200, seed=0)
    assert an.held_out_peak(_layers_frame(ctx, means, np.random.default_rng(0)), ctx, "resid_post")["layer"] == 7


def _internal_frames(ctx: an.Context, rng, planted_layer: int | None, L: int = 12):
    cc = _layers_frame(ctx, np.full(L, 0.5), rng, noise=0.3)
    kl = rng.gamma(2.0, 0.5, len(ctx.pairs))
    if planted_layer is not None:  # the output follows the change at one layer
        sel = cc["layer"] == planted_layer
        cc.loc[sel, "rel_change"] = 0.5 + 0.5 * (kl - kl.mean()) + rng.normal(0, 0.2, sel.sum())
    cc["cosine_centered"] = 1.0 - cc["rel_change"]
    imp = ctx.pairs.assign(kl=kl, top1_changed=rng.random(len(kl)) < 0.5)
    return cc, imp


def test_held_out_strongest_correlation():
    """The largest of many correlations under the null is large on the prompts it was
    chosen on, and its held-out interval includes zero in most runs; a planted relation is
    chosen and holds on the held-out prompts."""
    claims, chosen_r = 0, []
    for k in range(12):
        ctx = _context(6, 10, 200, seed=k)
        cc, imp = _internal_frames(ctx, np.random.default_rng(50 + k), None)
        table = an.internal_vs(cc, imp, ctx, outputs=("kl",))
        d = an.held_out_strongest(table, cc, imp, ctx)
        pearson = table[table["method"] == "pearson"]
        assert abs(d["r_select"]) == pytest.approx(pearson["r_select"].abs().max())
        assert d["n_pairs"] == 6 * 5 and d["n_select"] == 6 * 5
        chosen_r.append(abs(d["r_select"]))
        claims += d["ci"][0] > 0 or d["ci"][1] < 0
    assert np.mean(chosen_r) > 0.3  # selection finds sizeable r in noise ...
    assert claims <= 2  # ... that does not hold on held-out prompts
    ctx = _context(6, 10, 200, seed=0)
    cc, imp = _internal_frames(ctx, np.random.default_rng(0), planted_layer=4)
    d = an.held_out_strongest(an.internal_vs(cc, imp, ctx, outputs=("kl",)), cc, imp, ctx)
    assert d["layer"] == 4 and d["output"] == "kl"
    # rel_change rises with kl, cosine_centered (here 1 - rel_change) falls: either is the planted relation
    sign = 1 if d["measure"] == "rel_change" else -1
    assert sign * d["r"] > 0.5 and (d["ci"][0] > 0 if sign > 0 else d["ci"][1] < 0)


# --- planted length effects and what the findings say ----------------------------------
def _impact(ctx: an.Context, rng, slope: float, sys_effect, user_sd: float, noise_sd: float) -> pd.DataFrame:
    """impact of pair (s, u) = slope * length_s + a_s + b_u + e_su: a_s the system prompt's
    own effect (``sys_effect``: the values, or the sd of a normal draw), b_u the user prompt's."""
    length = dict(zip(ctx.systems["name"], ctx.systems["n_system_tokens"]))
    a = np.asarray(sys_effect) if np.ndim(sys_effect) else rng.normal(0, sys_effect, len(ctx.systems))
    a = dict(zip(ctx.systems["name"], a))
    b = dict(zip(ctx.users, rng.normal(0, user_sd, len(ctx.users))))
    p = ctx.pairs
    v = (slope * p["system"].map(length) + p["system"].map(a) + p["user_id"].map(b)
         + rng.normal(0, noise_sd, len(p))).to_numpy()
    return p.assign(impact=v, kl=np.exp(v), top1_changed=False)


def _length_findings(ctx: an.Context, imp: pd.DataFrame) -> tuple[dict, str]:
    _, lt = an.length_tables(imp, ctx)
    s = {"length": an.length_summary(lt), "sample": an.sample_summary(ctx)}
    return s, " ".join(findings(s))


def test_planted_null_length_effect_with_few_system_prompts_is_not_claimed():
    """8 system prompts whose own effects (not caused by length: slope 0) line up a little
    with length by chance (sample r about 0.3), and 16 user prompts that differ a lot:
    resampling user prompts alone gives a narrow interval that excludes zero (the overclaim);
    the crossed interval includes zero, and the findings say there is no evidence, with n."""
    ctx = _context(8, 16, 1000, seed=0, lengths=np.array([10, 25, 40, 60, 85, 110, 150, 200]))
    own = [-0.02, 0.02, -0.04, 0.03, -0.02, 0.04, -0.01, 0.01]  # each system prompt's own effect
    imp = _impact(ctx, np.random.default_rng(4), slope=0.0, sys_effect=own, user_sd=0.5, noise_sd=0.01)
    s, text = _length_findings(ctx, imp)
    assert s["length"]["pearson_r"] > 0.2, "the planted sample should show a chance correlation"
    lo, hi = s["length"]["ci"]
    assert lo < -0.2 and hi > 0.5 and s["length"]["p"] > 0.2
    assert "There is no evidence that the length of a system prompt goes with its internal change" in text
    assert "Longer system prompts go with" not in text and "Small sample" not in text
    assert "n = 8 system prompts × 16 user prompts, both resampled" in text
    # what resampling user prompts only would have claimed on the same data
    users_only = an.Context(w=ctx.w, users=ctx.users, pairs=ctx.pairs, systems=ctx.systems,
                            impact_component="resid_post")
    _, lt = an.length_tables(imp, users_only)
    row = lt[(lt.family == "all") & (lt.target == "impact") & (lt.method == "pearson")].iloc[0]
    assert row["ci_low"] > 0, "the planted case must be one that user-only resampling overclaims"


def test_no_length_claim_from_a_small_sample_of_system_prompts():
    """5 system prompts whose own effects happen to line up with length (r about 0.65): with
    so few system prompts the findings claim nothing, whatever the interval, and name the
    small sample; the crossed interval is still many times wider than the user-only one."""
    ctx = _context(5, 16, 1000, seed=0, lengths=np.array([12, 30, 55, 90, 160]))
    own = [-0.04, 0.02, -0.01, 0.05, 0.03]
    imp = _impact(ctx, np.random.default_rng(4), slope=0.0, sys_effect=own, user_sd=0.5, noise_sd=0.01)
    s, text = _length_findings(ctx, imp)
    assert s["length"]["pearson_r"] > 0.6
    assert "With 5 system prompts (fewer than 8) there are too few to tell a length effect from the system " \
           "prompts' own effects, so none is claimed" in text
    assert "Longer system prompts go with" not in text
    assert "Small sample: only 5 system prompts (fewer than 8)" in text
    users_only = an.Context(w=ctx.w, users=ctx.users, pairs=ctx.pairs, systems=ctx.systems,
                            impact_component="resid_post")
    _, lt = an.length_tables(imp, users_only)
    row = lt[(lt.family == "all") & (lt.target == "impact") & (lt.method == "pearson")].iloc[0]
    lo, hi = s["length"]["ci"]
    assert row["ci_low"] > 0 and hi - lo > 5 * (row["ci_high"] - row["ci_low"])


def test_planted_real_length_effect_is_claimed():
    ctx = _context(12, 10, 1000, seed=1, lengths=np.linspace(10, 250, 12).round().astype(int))
    imp = _impact(ctx, np.random.default_rng(2), slope=0.004, sys_effect=0.1, user_sd=0.5, noise_sd=0.05)
    s, text = _length_findings(ctx, imp)
    assert s["length"]["ci"][0] > 0 and s["length"]["p"] < 0.05
    assert "Longer system prompts go with larger internal change: Pearson r = " in text
    assert "n = 12 system prompts × 10 user prompts, both resampled" in text
    assert "no evidence" not in text and "Small sample" not in text


def test_null_length_claims_stay_rare_under_the_crossed_bootstrap():
    """Calibration: across 150 null sweeps (6 system prompts, strong user-prompt variation),
    the crossed 95% interval excludes zero in about 5% of them; the user-only interval in
    most of them."""
    S, U, B = 6, 12, 400
    x = np.linspace(10, 200, S)
    rng = np.random.default_rng(9)
    crossed = users_only = 0
    n_sim = 150
    for _ in range(n_sim):
        Y = rng.normal(0, 0.05, (S, 1)) + rng.normal(0, 0.5, (1, U)) + rng.normal(0, 0.05, (S, U))
        ws, wu = crossed_weights(S, U, B, int(rng.integers(1 << 31)))
        c = np.ones((S, U))
        r = across_corr(x, Y, c, ws, wu)["pearson"]
        crossed += r["ci_low"] > 0 or r["ci_high"] < 0
        r = across_corr(x, Y, c, np.ones_like(ws), wu)["pearson"]
        users_only += r["ci_low"] > 0 or r["ci_high"] < 0
    # binomial(150, 0.05) has sd 0.018: 0.12 is ~4 sd above the nominal rate
    assert crossed / n_sim <= 0.12
    assert users_only / n_sim >= 0.4


def test_one_unit_gives_no_interval_not_a_zero_width_one():
    """A bootstrap over a single user prompt (or conversation) has nothing to resample: every
    resampled statistic, its interval and its p-value are NaN; with two units they are not."""
    w1 = user_weights(1, 200, 0)
    assert w1.shape == (200, 1) and np.isnan(w1).all()
    sums, counts = np.array([[3.0]]), np.array([[2.0]])  # one system prompt's sums (M=1, U=1)
    mean, boot = mean_ci(sums, counts, w1)
    assert np.allclose(mean, 1.5)  # the point estimate stands
    lo, hi = percentile_ci(boot)
    assert np.isnan(lo).all() and np.isnan(hi).all() and np.isnan(boot_p(boot)).all()
    # crossed: many system prompts but one user prompt cannot speak for other user prompts
    ws, wu = crossed_weights(5, 1, 200, 0)
    _, cboot = crossed_mean(np.arange(5.0).reshape(1, 5, 1), np.ones((1, 5, 1)), ws, wu)
    assert np.isnan(cboot).all()
    w2 = user_weights(2, 200, 0)
    mean2, boot2 = mean_ci(np.array([[3.0, 1.0]]), np.array([[2.0, 1.0]]), w2)
    lo2, hi2 = percentile_ci(boot2)
    assert np.isfinite(boot2).all() and (hi2 > lo2).all()
