"""Analyses over the per-pair tables: which layers change most, length and tags vs impact,
position, internal vs output change, and the summary. Every interval is a bootstrap over
user prompts (see :mod:`promptshift.metrics.bootstrap`), with the same resamples for all.

``impact`` of a pair is the mean over layers of ``rel_change`` of ``resid_post`` at the last
prompt token: the residual stream there is what the next token is read from, and
``rel_change`` (unlike raw cosine) is not squashed towards 1 by anisotropy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from promptshift.errors import MetricsError
from promptshift.metrics.bootstrap import across_ci, corr_ci, mean_ci, percentile_ci
from promptshift.sweep.chat import REGIONS

RANK_METRICS = {"rel_change": False, "cosine_centered": True}  # metric -> smaller means more changed
INTERNAL = ("rel_change", "cosine_centered")
OUTPUTS = ("kl", "top1_changed")
# per-pair quantities set against system prompt length (length_tests) and compared with and
# without a tag or keyword feature (tag_impact; attention to the system tokens is a
# property of length more than of content, so it is tested against length only)
LENGTH_TARGETS = ("impact", "kl", "top1_changed", "attn_system")
TAG_TARGETS = ("impact", "kl")


@dataclass
class Context:
    """What every analysis needs: resample weights and where each pair belongs."""

    w: np.ndarray  # (B, U) user-prompt multiplicities per resample
    users: list[str]  # user ids in sweep order (columns of w)
    pairs: pd.DataFrame  # pair, system, user_id, category (variants only)
    systems: pd.DataFrame  # name, n_system_tokens, n_words, family, level, tags, tag_list, kw_*, kw_list,
    # system_uniform (variants only)
    impact_component: str

    def user_index(self, user_ids) -> np.ndarray:
        idx = pd.Index(self.users).get_indexer(pd.Index(user_ids))
        if (idx < 0).any():
            raise MetricsError("a result row names a user prompt that is not in the store's sweep")
        return idx.astype(np.int64)


def grouped_ci(df: pd.DataFrame, keys: list[str], value: str, ctx: Context) -> pd.DataFrame:
    """Mean of ``value`` over rows per ``keys``, with a bootstrap CI over user prompts."""
    cols = keys + ["mean", "ci_low", "ci_high", "n_pairs"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    d = df[keys + [value]].copy()
    d["_u"] = ctx.user_index(df["user_id"])
    sums = d.groupby(keys + ["_u"], sort=True)[value].agg(["sum", "count"]).reset_index()
    return _ci_from_sums(sums, keys, ctx)[cols]


def pair_impact(cc: pd.DataFrame, out: pd.DataFrame, ctx: Context, ach: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per pair: impact (mean over layers of resid_post rel_change at last), kl,
    top1_changed and attn_system (mean over layers of the last row's attention mass to the
    variant's system tokens, from ``attention_change``; NaN without it)."""
    sel = cc[(~cc["is_control"]) & (cc["position"] == "last") & (cc["component"] == ctx.impact_component)]
    imp = sel.groupby("pair", sort=True)["rel_change"].mean().rename("impact")
    res = ctx.pairs.set_index("pair").join(imp).join(out.set_index("pair")[["kl", "top1_changed"]])
    if ach is not None and len(ach):
        res = res.join(ach.groupby("pair", sort=True)["mass_system_variant"].mean().rename("attn_system"))
    else:
        res["attn_system"] = np.nan
    return res.reset_index()


def layer_ranking(cc: pd.DataFrame, ctx: Context) -> pd.DataFrame:
    pairs = cc[~cc["is_control"] & cc["position"].isin(["last", "suffix_mean"])]
    ctrl = cc[cc["is_control"] & (cc["position"] == "last")]
    parts = []
    for metric, smaller in RANK_METRICS.items():
        t = grouped_ci(pairs, ["component", "position", "layer"], metric, ctx)
        t.insert(2, "metric", metric)
        cm = ctrl.groupby(["component", "layer"])[metric].mean().rename("control_mean")
        t = t.join(cm, on=["component", "layer"])
        t.loc[t["position"] != "last", "control_mean"] = np.nan  # controls are compared at `last` only
        t["rank"] = (t.groupby(["component", "position"])["mean"]
                     .rank(ascending=smaller, method="first", na_option="bottom").astype(np.int64))
        parts.append(t)
    out = pd.concat(parts, ignore_index=True)
    cols = ["component", "layer", "metric", "position", "mean", "ci_low", "ci_high", "control_mean", "rank",
            "n_pairs"]
    return out[cols].sort_values(["component", "metric", "position", "layer"], kind="stable").reset_index(drop=True)


def _ci_from_sums(sums: pd.DataFrame, keys: list[str], ctx: Context) -> pd.DataFrame:
    """Like :func:`grouped_ci` for rows already summed per user prompt (``_u``, sum, count)."""
    g = sums.groupby(keys + ["_u"], sort=True)[["sum", "count"]].sum()
    U = len(ctx.users)
    S = g["sum"].unstack("_u").reindex(columns=range(U)).fillna(0.0)
    N = g["count"].unstack("_u").reindex(columns=range(U)).fillna(0.0)
    mean, boot = mean_ci(S.to_numpy(), N.to_numpy(), ctx.w)
    lo, hi = percentile_ci(boot)
    out = S.index.to_frame(index=False)
    out["mean"], out["ci_low"], out["ci_high"] = mean, lo, hi
    out["n_pairs"] = N.to_numpy().sum(1).astype(np.int64)
    return out


def position_change(cc: pd.DataFrame, pos_sums: pd.DataFrame | None, index_region: dict[int, str],
                    ctx: Context) -> pd.DataFrame:
    """Mean rel_change per aligned token counted from the end (``axis`` from_end; ``region``
    names the region most tokens at that index belong to) and per region (``axis`` region)."""
    cols = ["component", "layer", "axis", "from_end", "region", "mean", "ci_low", "ci_high", "n_pairs"]
    parts = []
    if pos_sums is not None and len(pos_sums):
        t = _ci_from_sums(pos_sums, ["component", "layer", "from_end"], ctx)
        t["axis"] = "from_end"
        t["region"] = t["from_end"].map(index_region)
        parts.append(t)
    reg = cc[~cc["is_control"] & cc["position"].isin(REGIONS)].rename(columns={"position": "region"})
    if len(reg):
        t = grouped_ci(reg, ["component", "layer", "region"], "rel_change", ctx)
        t["axis"] = "region"
        t["from_end"] = pd.NA
        parts.append(t)
    if not parts:
        return pd.DataFrame(columns=cols)
    out = pd.concat(parts, ignore_index=True)[cols]
    out["from_end"] = out["from_end"].astype("Int64")
    out["_r"] = out["region"].map({r: i for i, r in enumerate(REGIONS)})
    out = out.sort_values(["component", "axis", "from_end", "_r", "layer"], kind="stable", na_position="last")
    return out.drop(columns="_r").reset_index(drop=True)


def _per_system(imp: pd.DataFrame, target: str, ctx: Context):
    """(systems in ctx order) mean of target and its resampled means (S, B)."""
    d = imp[["system", "user_id", target]].copy()
    d[target] = d[target].astype(np.float64)
    d["_u"] = ctx.user_index(d["user_id"])
    g = d.groupby(["system", "_u"])[target].agg(["sum", "count"])
    U = len(ctx.users)
    names = ctx.systems["name"].tolist()
    S = g["sum"].unstack("_u").reindex(index=names, columns=range(U)).fillna(0.0).to_numpy()
    N = g["count"].unstack("_u").reindex(index=names, columns=range(U)).fillna(0.0).to_numpy()
    return mean_ci(S, N, ctx.w)


def length_tables(imp: pd.DataFrame, ctx: Context) -> tuple[pd.DataFrame, pd.DataFrame]:
    sy = ctx.systems
    means = {t: _per_system(imp, t, ctx) for t in LENGTH_TARGETS}
    kw = [c for c in sy.columns if c.startswith("kw_") and c != "kw_list"]
    li = pd.DataFrame({
        "system": sy["name"].to_numpy(),
        "n_system_tokens": sy["n_system_tokens"].to_numpy(np.int64),
        "n_words": sy["n_words"].to_numpy(np.int64),
        "family": sy["family"].to_numpy(),
        "level": sy["level"].to_numpy(),
        "tags": sy["tags"].to_numpy(),
        **{c: sy[c].to_numpy(bool) for c in kw},
        "impact": means["impact"][0],
        "kl": means["kl"][0],
        "top1_change_rate": means["top1_changed"][0],
        "attn_system": means["attn_system"][0],
        "attn_system_uniform": sy["system_uniform"].to_numpy(np.float64),
        "n_pairs": imp.groupby("system").size().reindex(sy["name"]).fillna(0).to_numpy(np.int64),
    })
    x = sy["n_system_tokens"].to_numpy(np.float64)
    groups = [("all", np.ones(len(sy), bool))]
    fam = sy["family"].fillna("")
    for f in sorted(set(fam) - {""}):
        m = (fam == f).to_numpy()
        if m.sum() >= 3:
            groups.append((f, m))
    rows = []
    for family, m in groups:
        for target in LENGTH_TARGETS:
            mean, boot = means[target]
            res = across_ci(x[m], boot[m], mean[m])
            for method in ("pearson", "spearman"):
                rows.append(dict(family=family, target=target, method=method, **res[method]))
    tests = pd.DataFrame(rows, columns=["family", "target", "method", "r", "p", "ci_low", "ci_high", "n"])
    return li, tests


def tag_impact(imp: pd.DataFrame, ctx: Context) -> pd.DataFrame:
    """Per declared tag (``source`` tag) and per keyword feature of the text (``source``
    keyword, :mod:`promptshift.metrics.features`): mean over pairs with and without it."""
    cols = ["tag", "source", "target", "with_mean", "without_mean", "diff", "ci_low", "ci_high", "n_with",
            "n_without"]
    u = ctx.user_index(imp["user_id"])
    U = len(ctx.users)
    rows = []
    features = []
    for source, col in (("tag", "tag_list"), ("keyword", "kw_list")):
        of = dict(zip(ctx.systems["name"], ctx.systems[col]))
        features += [(source, t, of) for t in sorted({t for ts in ctx.systems[col] for t in ts})]
    for source, tag, of in features:
        has = imp["system"].map(lambda s: tag in of.get(s, ())).to_numpy(bool)
        for target in TAG_TARGETS:
            v = imp[target].to_numpy(np.float64)
            ok = np.isfinite(v)
            stats = []
            for m in (has & ok, ~has & ok):
                S = np.bincount(u[m], weights=v[m], minlength=U)[None, :]
                N = np.bincount(u[m], minlength=U).astype(np.float64)[None, :]
                stats.append(mean_ci(S, N, ctx.w))
            (mw, bw), (mo, bo) = stats
            lo, hi = percentile_ci(bw[0] - bo[0])
            rows.append(dict(tag=tag, source=source, target=target, with_mean=float(mw[0]), without_mean=float(mo[0]),
                             diff=float(mw[0] - mo[0]), ci_low=float(lo), ci_high=float(hi),
                             n_with=int((has & ok).sum()), n_without=int((~has & ok).sum())))
    return pd.DataFrame(rows, columns=cols)


def internal_vs_output(cc: pd.DataFrame, imp: pd.DataFrame, ctx: Context) -> pd.DataFrame:
    """Across pairs: internal change at the last token (per component, layer) vs output change."""
    cols = ["component", "layer", "measure", "output", "method", "r", "p", "ci_low", "ci_high", "n"]
    last = cc[~cc["is_control"] & (cc["position"] == "last")]
    if last.empty or imp.empty:
        return pd.DataFrame(columns=cols)
    outp = imp.set_index("pair")
    parts = []
    for comp, g in last.groupby("component", sort=True):
        for measure in INTERNAL:
            X = g.pivot(index="layer", columns="pair", values=measure).sort_index()  # (L, pairs)
            pairs = X.columns.to_numpy()
            users = ctx.user_index(outp.loc[pairs, "user_id"])
            for output in OUTPUTS:
                y = outp.loc[pairs, output].to_numpy(np.float64)
                res = corr_ci(X.to_numpy(), y, users, ctx.w)
                for method in ("pearson", "spearman"):
                    d = res[method]
                    parts.append(pd.DataFrame({
                        "component": comp, "layer": X.index.to_numpy(np.int64), "measure": measure,
                        "output": output, "method": method, "r": d["r"], "p": d["p"], "ci_low": d["ci_low"],
                        "ci_high": d["ci_high"], "n": d["n"].astype(np.int64),
                    }))
    out = pd.concat(parts, ignore_index=True)[cols]
    return out.sort_values(["component", "layer", "measure", "output", "method"], kind="stable").reset_index(drop=True)


def _num(x):
    """JSON-safe number: NaN/inf -> None, numpy scalars -> Python."""
    if x is None:
        return None
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    x = float(x)
    return x if math.isfinite(x) else None


def summary(tables: dict[str, pd.DataFrame], ctx: Context, n_controls: int, model: str) -> dict:
    lr = tables["layer_ranking"]
    top = lr[(lr["metric"] == "rel_change") & (lr["position"] == "last") & (lr["rank"] == 1)]
    most, floor = {}, {}
    for _, r in top.sort_values("component").iterrows():
        most[r["component"]] = {"layer": int(r["layer"]), "mean": _num(r["mean"]), "ci": [_num(r["ci_low"]),
                                                                                           _num(r["ci_high"])]}
        floor[r["component"]] = _num(r["control_mean"])
    comp = ctx.impact_component
    above, note = None, ""
    if comp in most:
        m, c, layer = most[comp]["mean"], floor[comp], most[comp]["layer"]
        if c is None:
            note = f"no control pairs (a sweep needs two or more user prompts), so {comp} change has no floor"
        elif m is None:
            note = f"{comp} change at the last token is undefined"
        else:
            above = bool(m > c)
            lo = most[comp]["ci"][0]
            if above:
                note = (f"{comp} rel_change at the last token peaks at layer {layer} with mean {m:.4g} over pairs, "
                        f"above the control floor {c:.4g} (two unrelated user prompts)"
                        + ("" if lo is not None and lo > c else "; but the 95% CI reaches the floor"))
            else:
                note = (f"NOT above control: {comp} rel_change at the last token (mean {m:.4g} at its most affected "
                        f"layer {layer}) does not exceed the control floor {c:.4g}; the system prompts change the "
                        f"last-token residual stream less than swapping the user prompt does")
    lt = tables["length_tests"]
    lt_all = lt[(lt["family"] == "all") & (lt["target"] == "impact")].set_index("method")
    length = {
        "pearson_r": _num(lt_all.loc["pearson", "r"]) if "pearson" in lt_all.index else None,
        "ci": [_num(lt_all.loc["pearson", "ci_low"]), _num(lt_all.loc["pearson", "ci_high"])]
        if "pearson" in lt_all.index else [None, None],
        "p": _num(lt_all.loc["pearson", "p"]) if "pearson" in lt_all.index else None,
        "spearman_r": _num(lt_all.loc["spearman", "r"]) if "spearman" in lt_all.index else None,
    }
    ti = tables["tag_impact"]
    ti = ti[(ti["target"] == "impact") & ti["diff"].notna()]
    # declared tags when the sweep has any, else the keyword features of the texts
    ti = ti[ti["source"] == ("tag" if (ti["source"] == "tag").any() else "keyword")]
    top_tag = None
    if len(ti):
        r = ti.sort_values(["diff", "tag"], ascending=[False, True], kind="stable").iloc[0]
        top_tag = {"tag": r["tag"], "source": r["source"], "diff": _num(r["diff"]),
                   "ci": [_num(r["ci_low"]), _num(r["ci_high"])]}
    ar = tables["attention_regions"]
    sel = ar[(ar["role"] == "variant") & (ar["scope"] == "last")]
    shares = {reg: _num(sel.loc[sel["region"] == reg, "mass"].mean()) for reg in
              ("sink", "system", "user", "gen_prompt", "template")}
    al = tables["attention_layers"]
    if "recent_mass" in al.columns:
        shares["recent"] = _num(al.loc[al["role"] == "variant", "recent_mass"].mean())
    io = tables["internal_vs_output"]
    io = io[(io["method"] == "pearson") & io["r"].notna()]
    strongest = None
    if len(io):
        r = io.iloc[int(np.argmax(io["r"].abs().to_numpy()))]
        strongest = {"component": r["component"], "layer": int(r["layer"]), "measure": r["measure"],
                     "output": r["output"], "r": _num(r["r"]), "ci": [_num(r["ci_low"]), _num(r["ci_high"])]}
    oc = tables["output_change"]
    lc = tables["lens_change"]
    shift = None
    if len(lc):
        per_layer = lc.groupby("layer")["kl_lens"].mean()
        if per_layer.notna().any():
            half = 0.5 * per_layer.max()
            shift = int(per_layer[per_layer >= half].index.min())
    return {
        "n_pairs": int(len(ctx.pairs)),
        "n_controls": int(n_controls),
        "model": model,
        "most_affected_layer": most,
        "control_floor": floor,
        "effects_above_control": above,
        "effects_note": note,
        "length": length,
        "top_tag": top_tag,
        "attention_shares": shares,
        "strongest_internal_output": strongest,
        "output": {
            "mean_kl": _num(oc["kl"].mean()) if len(oc) else None,
            "top1_change_rate": _num(oc["top1_changed"].mean()) if len(oc) else None,
            "mean_gen_edit_distance": _num(oc["gen_edit_distance"].mean()) if len(oc) else None,
        },
        "lens_shift_layer": shift,
        "impact_component": comp,
    }


__all__ = ["Context", "grouped_ci", "internal_vs_output", "layer_ranking", "length_tables", "pair_impact",
           "position_change", "summary", "tag_impact"]
