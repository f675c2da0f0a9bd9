"""Analyses over the per-pair tables: which layers change most, length and tags vs impact,
position, internal vs output change, and the summary.

Every interval is a crossed (pigeonhole) bootstrap over system prompts and user prompts
(see :mod:`promptshift.metrics.bootstrap`), with one set of resamples drawn from the seed
and shared by every table; a per-system-prompt estimate resamples user prompts only.
p-values come from the same resamples (``boot_p``), so a p below 0.05 means the 95%
interval excludes zero and nothing else. A selected quantity (the most changed layer, the
layer and component whose change best predicts the output's) is chosen on one half of the
user prompts (``Context.select``) and measured, with its interval, on the other half.

``impact`` of a pair is the mean over layers of ``rel_change`` of ``resid_post`` at the last
prompt token: the residual stream there is what the next token is read from, and
``rel_change`` (unlike raw cosine) is not squashed towards 1 by anisotropy.

How other analyses use this (e.g. behaviour tables)::

    ctx = Context.draw(users, pairs, systems, impact_component, n_boot, seed, strata=categories)
    grouped_ci(df, ["system"], "adhered", ctx)          # per system prompt: user prompts resampled
    grouped_ci(df, ["layer"], "rel_change", ctx)        # over system prompts: crossed
    table = internal_vs(cc, imp, ctx, outputs=("kl", "adherence_change"))
    best = held_out_strongest(table, cc, imp, ctx)      # chosen on one half, measured on the other

Size: one module because every analysis here shares one :class:`Context` (the resamples,
the halves, the impact per pair) and the helpers that turn it into intervals; split by
analysis, each file would import the same dozen private helpers back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from promptshift.errors import MetricsError
from promptshift.jsonsafe import number
from promptshift.metrics.bootstrap import (
    LEVEL,
    SMALL,
    across_corr,
    boot_p,
    corr_ci,
    corr_r,
    crossed_mean_long,
    crossed_weights,
    estimate_weights,
    group_diff,
    pair_weights,
    percentile_ci,
    split_users,
    user_weights,
)
from promptshift.vocabulary import REGIONS

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
    """What every analysis needs: the resamples and where each pair belongs.

    ``w`` and ``ws`` are the user and system halves of each crossed resample; ``select``
    marks the user prompts a selected maximum is chosen on, ``w_est`` resamples the other
    half (zero on ``select``). Without ``ws`` the system prompts are held fixed (a bootstrap
    over user prompts only); without ``select`` a selection is chosen and measured on every
    user prompt, and the summary says so."""

    w: np.ndarray  # (B, U) user-prompt multiplicities per resample
    users: list[str]  # user ids in sweep order (columns of w)
    pairs: pd.DataFrame  # pair, system, user_id, category (variants only)
    systems: pd.DataFrame  # name, n_system_tokens, n_words, family, level, tags, tag_list, kw_*, kw_list,
    # system_uniform (variants only; columns of ws)
    impact_component: str
    ws: np.ndarray | None = None  # (B, S) system-prompt multiplicities per resample
    select: np.ndarray | None = None  # (U,) True: the user prompt belongs to the selection half
    w_est: np.ndarray | None = None  # (B, U) multiplicities of the measured half's user prompts
    seed: int = 0

    @classmethod
    def draw(cls, users, pairs: pd.DataFrame, systems: pd.DataFrame, impact_component: str, n_boot: int,
             seed: int, strata=None) -> Context:
        """Crossed resamples and the seeded split of the user prompts (stratified by
        ``strata``, e.g. each user prompt's category)."""
        users = list(users)
        ws, wu = crossed_weights(len(systems), len(users), n_boot, seed)
        select = split_users(len(users), seed, strata)
        w_est = estimate_weights(select, n_boot, seed) if (~select).any() else None
        return cls(w=wu, users=users, pairs=pairs, systems=systems, impact_component=impact_component, ws=ws,
                   select=select if w_est is not None else None, w_est=w_est, seed=seed)

    @property
    def n_boot(self) -> int:
        return len(self.w)

    @property
    def system_w(self) -> np.ndarray:
        """(B, S) system multiplicities (all ones when system prompts are held fixed)."""
        return self.ws if self.ws is not None else np.ones((len(self.w), len(self.systems)))

    def user_index(self, user_ids) -> np.ndarray:
        idx = pd.Index(self.users).get_indexer(pd.Index(user_ids))
        if (idx < 0).any():
            raise MetricsError("a result row names a user prompt that is not in the store's sweep")
        return idx.astype(np.int64)

    def system_index(self, names) -> np.ndarray:
        idx = pd.Index(self.systems["name"]).get_indexer(pd.Index(names))
        if (idx < 0).any():
            raise MetricsError("a result row names a system prompt that is not a variant of the store's sweep")
        return idx.astype(np.int64)

    def half(self, user_ids, estimate: bool) -> np.ndarray:
        """(n,) bool: rows whose user prompt is in the measured (``estimate``) or the
        selection half; every row when there is no split."""
        if self.select is None:
            return np.ones(len(user_ids), bool)
        sel = self.select[self.user_index(user_ids)]
        return ~sel if estimate else sel


def grouped_ci(df: pd.DataFrame, keys: list[str], value: str, ctx: Context, wu: np.ndarray | None = None
               ) -> pd.DataFrame:
    """Mean of ``value`` over rows (pairs) per ``keys``, with a 95% crossed-bootstrap CI:
    the rows' system prompts and user prompts are resampled. When ``system`` is one of the
    keys each group holds one system prompt, so only user prompts are resampled. ``wu``
    replaces the user weights (e.g. ``ctx.w_est`` for the measured half)."""
    cols = keys + ["mean", "ci_low", "ci_high", "n_pairs"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    d = df[keys + [value]].copy()
    d[value] = d[value].astype(np.float64)
    d = d[np.isfinite(d[value].to_numpy())]
    d["_s"] = ctx.system_index(df.loc[d.index, "system"])
    d["_u"] = ctx.user_index(df.loc[d.index, "user_id"])
    sums = d.groupby(keys + ["_s", "_u"], sort=True)[value].agg(["sum", "count"]).reset_index()
    return _ci_from_sums(sums, keys, ctx, wu=wu, systems_fixed="system" in keys)[cols]


def _ci_from_sums(sums: pd.DataFrame, keys: list[str], ctx: Context, wu: np.ndarray | None = None,
                  systems_fixed: bool = False) -> pd.DataFrame:
    """Like :func:`grouped_ci` for rows already summed per cell (``_s``, ``_u``, sum, count)."""
    g = sums.groupby(keys + ["_s", "_u"], sort=True)[["sum", "count"]].sum().reset_index()
    groups = g[keys].drop_duplicates().reset_index(drop=True)
    row = pd.MultiIndex.from_frame(groups).get_indexer(pd.MultiIndex.from_frame(g[keys])) if len(keys) > 1 \
        else pd.Index(groups[keys[0]]).get_indexer(g[keys[0]])
    ws = np.ones_like(ctx.system_w) if systems_fixed else ctx.system_w
    mean, boot = crossed_mean_long(row, g["_s"].to_numpy(), g["_u"].to_numpy(), g["sum"].to_numpy(),
                                   g["count"].to_numpy(), len(groups), ws, ctx.w if wu is None else wu)
    lo, hi = percentile_ci(boot)
    out = groups.copy()
    out["mean"], out["ci_low"], out["ci_high"] = mean, lo, hi
    out["n_pairs"] = np.bincount(row, weights=g["count"].to_numpy(), minlength=len(groups)).astype(np.int64)
    return out


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


def position_change(cc: pd.DataFrame, pos_sums: pd.DataFrame | None, index_region: dict[int, str],
                    ctx: Context) -> pd.DataFrame:
    """Mean rel_change per aligned token counted from the end (``axis`` from_end; ``region``
    names the region most tokens at that index belong to) and per region (``axis`` region).
    ``pos_sums`` holds rel_change summed per (component, layer, from_end, pair)."""
    cols = ["component", "layer", "axis", "from_end", "region", "mean", "ci_low", "ci_high", "n_pairs"]
    parts = []
    if pos_sums is not None and len(pos_sums):
        meta = ctx.pairs.set_index("pair").reindex(pos_sums["pair"].to_numpy())
        if meta["system"].isna().any():
            raise MetricsError("a position row names a pair that is not in the store's plan")
        sums = pos_sums.drop(columns="pair").assign(_s=ctx.system_index(meta["system"]),
                                                    _u=ctx.user_index(meta["user_id"]))
        t = _ci_from_sums(sums, ["component", "layer", "from_end"], ctx)
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


def cell_sums(imp: pd.DataFrame, target: str, ctx: Context) -> tuple[np.ndarray, np.ndarray]:
    """Sum and count of ``target`` per (system prompt, user prompt) cell -> (S, U), (S, U),
    rows in ``ctx.systems`` order, columns in ``ctx.users`` order; non-finite values left out."""
    v = pd.to_numeric(imp[target], errors="coerce").to_numpy(np.float64)
    ok = np.isfinite(v)
    s = ctx.system_index(imp["system"].to_numpy()[ok])
    u = ctx.user_index(imp["user_id"].to_numpy()[ok])
    S, U = len(ctx.systems), len(ctx.users)
    sums, counts = np.zeros((S, U)), np.zeros((S, U))
    np.add.at(sums, (s, u), v[ok])
    np.add.at(counts, (s, u), 1.0)
    return sums, counts


def length_tables(imp: pd.DataFrame, ctx: Context) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per system prompt: length, impact, kl; and the correlation of length with each across
    system prompts (all of them, and within each length family of 3 or more), with crossed
    bootstrap CIs and p-values from the same resamples. A family's resamples draw its own
    members (seeded from the run's seed and the family's position)."""
    sy = ctx.systems
    targets = [t for t in LENGTH_TARGETS if t in imp.columns]  # a caller may bring fewer per-pair columns
    cells = {t: cell_sums(imp, t, ctx) for t in targets}
    with np.errstate(invalid="ignore", divide="ignore"):
        means = {t: s.sum(1) / c.sum(1) for t, (s, c) in cells.items()}
    nan = np.full(len(sy), np.nan)
    means = {t: means.get(t, nan) for t in LENGTH_TARGETS}
    kw = [c for c in sy.columns if c.startswith("kw_") and c != "kw_list"]
    li = pd.DataFrame({
        "system": sy["name"].to_numpy(),
        "n_system_tokens": sy["n_system_tokens"].to_numpy(np.int64),
        "n_words": sy["n_words"].to_numpy(np.int64) if "n_words" in sy.columns else nan,
        "family": sy["family"].to_numpy(),
        "level": sy["level"].to_numpy(),
        "tags": sy["tags"].to_numpy(),
        **{c: sy[c].to_numpy(bool) for c in kw},
        "impact": means["impact"],
        "kl": means["kl"],
        "top1_change_rate": means["top1_changed"],
        "attn_system": means["attn_system"],
        "attn_system_uniform": sy["system_uniform"].to_numpy(np.float64) if "system_uniform" in sy.columns else nan,
        "n_pairs": imp.groupby("system").size().reindex(sy["name"]).fillna(0).to_numpy(np.int64),
    })
    x = sy["n_system_tokens"].to_numpy(np.float64)
    groups = [("all", np.ones(len(sy), bool), ctx.system_w)]
    fam = sy["family"].fillna("")
    for k, f in enumerate(sorted(set(fam) - {""})):
        m = (fam == f).to_numpy()
        if m.sum() >= 3:
            ws = user_weights(int(m.sum()), ctx.n_boot, [ctx.seed, 4, k]) if ctx.ws is not None \
                else np.ones((ctx.n_boot, int(m.sum())))
            wfull = np.zeros((ctx.n_boot, len(sy)))
            wfull[:, m] = ws
            groups.append((f, m, wfull))
    rows = []
    for family, m, ws in groups:
        for target in targets:
            sums, counts = cells[target]
            res = across_corr(x[m], sums[m], counts[m], ws[:, m], ctx.w)
            for method in ("pearson", "spearman"):
                rows.append(dict(family=family, target=target, method=method, **res[method]))
    tests = pd.DataFrame(rows, columns=["family", "target", "method", "r", "p", "ci_low", "ci_high", "n", "n_users"])
    return li, tests


def tag_impact(imp: pd.DataFrame, ctx: Context) -> pd.DataFrame:
    """Per declared tag (``source`` tag) and per keyword feature of the text (``source``
    keyword, :mod:`promptshift.metrics.features`) and target: mean over pairs of system
    prompts with it minus those without, with a crossed-bootstrap CI and p; ``p_adjusted``
    and the simultaneous interval correct for the k features of that source (Bonferroni:
    level 1 - 0.05 / k)."""
    cols = ["tag", "source", "target", "with_mean", "without_mean", "diff", "ci_low", "ci_high", "p", "p_adjusted",
            "ci_low_simultaneous", "ci_high_simultaneous", "n_with", "n_without", "n_systems_with",
            "n_systems_without"]
    rows = []
    for source, col in (("tag", "tag_list"), ("keyword", "kw_list")):
        if col not in ctx.systems.columns:
            continue
        lists = ctx.systems[col].tolist()
        names = sorted({t for ts in lists for t in ts})
        k = len(names)
        level = 1.0 - (1.0 - LEVEL) / max(k, 1)
        for target in TAG_TARGETS:
            sums, counts = cell_sums(imp, target, ctx)
            has_pairs = counts.sum(1) > 0
            for tag in names:
                member = np.array([tag in ts for ts in lists], bool)
                diff, boot = group_diff(sums, counts, member, ctx.system_w, ctx.w)
                lo, hi = percentile_ci(boot)
                slo, shi = percentile_ci(boot, level=level)
                p = float(boot_p(boot))
                with np.errstate(invalid="ignore", divide="ignore"):
                    mw = sums[member].sum() / counts[member].sum()
                    mo = sums[~member].sum() / counts[~member].sum()
                rows.append(dict(tag=tag, source=source, target=target, with_mean=float(mw), without_mean=float(mo),
                                 diff=diff, ci_low=float(lo), ci_high=float(hi), p=p, p_adjusted=min(1.0, k * p),
                                 ci_low_simultaneous=float(slo), ci_high_simultaneous=float(shi),
                                 n_with=int(counts[member].sum()), n_without=int(counts[~member].sum()),
                                 n_systems_with=int((member & has_pairs).sum()),
                                 n_systems_without=int((~member & has_pairs).sum())))
    return pd.DataFrame(rows, columns=cols)


def _internal_matrix(g: pd.DataFrame, measure: str, outp: pd.DataFrame, output: str):
    """(layers, pairs) internal change of one component, the output per pair, and the pairs' frame."""
    X = g.pivot(index="layer", columns="pair", values=measure).sort_index()  # (L, pairs)
    pairs = X.columns.to_numpy()
    meta = outp.loc[pairs]
    return X, meta[output].to_numpy(np.float64), meta


def internal_vs(cc: pd.DataFrame, imp: pd.DataFrame, ctx: Context, outputs=OUTPUTS) -> pd.DataFrame:
    """Across pairs: internal change at the last token (per component, layer, measure) vs
    each output column of ``imp`` (one row per pair with ``pair``, ``system``, ``user_id``).
    ``r`` on every pair, with a crossed-bootstrap CI and p; ``r_select`` is r on the
    selection half of the user prompts only, the value :func:`held_out_strongest` chooses by."""
    cols = ["component", "layer", "measure", "output", "method", "r", "p", "ci_low", "ci_high", "n", "r_select",
            "n_select"]
    last = cc[~cc["is_control"] & (cc["position"] == "last")]
    if last.empty or imp.empty:
        return pd.DataFrame(columns=cols)
    outp = imp.set_index("pair")
    parts = []
    for comp, g in last.groupby("component", sort=True):
        for measure in INTERNAL:
            for output in outputs:
                X, y, meta = _internal_matrix(g, measure, outp, output)
                wp = pair_weights(ctx.system_w, ctx.w, ctx.system_index(meta["system"]),
                                  ctx.user_index(meta["user_id"]))
                res = corr_ci(X.to_numpy(), y, wp)
                sel = ctx.half(meta["user_id"], estimate=False)
                for method in ("pearson", "spearman"):
                    d = res[method]
                    rs = corr_r(X.to_numpy()[:, sel], y[sel], method)
                    n_sel = int((np.isfinite(y[sel]) & np.isfinite(X.to_numpy()[:, sel]).all(0)).sum())
                    parts.append(pd.DataFrame({
                        "component": comp, "layer": X.index.to_numpy(np.int64), "measure": measure,
                        "output": output, "method": method, "r": d["r"], "p": d["p"], "ci_low": d["ci_low"],
                        "ci_high": d["ci_high"], "n": d["n"].astype(np.int64), "r_select": rs, "n_select": n_sel,
                    }))
    out = pd.concat(parts, ignore_index=True)[cols]
    return out.sort_values(["component", "layer", "measure", "output", "method"], kind="stable").reset_index(drop=True)


def internal_vs_output(cc: pd.DataFrame, imp: pd.DataFrame, ctx: Context) -> pd.DataFrame:
    """:func:`internal_vs` for the next-token outputs (``kl``, ``top1_changed``)."""
    return internal_vs(cc, imp, ctx, OUTPUTS)


def _selection_note(ctx: Context) -> str:
    return "split" if ctx.select is not None else "same"


def held_out_strongest(table: pd.DataFrame, cc: pd.DataFrame, imp: pd.DataFrame, ctx: Context,
                       method: str = "pearson") -> dict | None:
    """The row of an :func:`internal_vs` table with the largest ``|r_select|`` (chosen on the
    selection half), measured on the other half: r, crossed-bootstrap CI over its pairs
    (system prompts and the measured half's user prompts resampled) and p. Without a split,
    chosen and measured on every pair (``selection`` = ``same``)."""
    t = table[(table["method"] == method) & table["r_select"].notna()]
    if t.empty:
        return None
    row = t.iloc[int(np.argmax(t["r_select"].abs().to_numpy()))]
    g = cc[~cc["is_control"] & (cc["position"] == "last") & (cc["component"] == row["component"])]
    X, y, meta = _internal_matrix(g, row["measure"], imp.set_index("pair"), row["output"])
    est = ctx.half(meta["user_id"], estimate=True)
    x = X.loc[[row["layer"]]].to_numpy()[:, est]
    wu = ctx.w_est if ctx.select is not None else ctx.w
    wp = pair_weights(ctx.system_w, wu, ctx.system_index(meta["system"][est]), ctx.user_index(meta["user_id"][est]))
    d = corr_ci(x, y[est], wp)[method]
    return {"component": row["component"], "layer": int(row["layer"]), "measure": row["measure"],
            "output": row["output"], "method": method, "r": number(d["r"][0]), "ci": [number(d["ci_low"][0]),
            number(d["ci_high"][0])], "p": number(d["p"][0]), "n_pairs": int(d["n"][0]),
            "r_select": number(row["r_select"]), "n_select": int(row["n_select"]), "selection": _selection_note(ctx)}


def held_out_peak(cc: pd.DataFrame, ctx: Context, component: str, metric: str = "rel_change",
                  position: str = "last") -> dict | None:
    """The layer where ``metric`` of ``component`` changes most (highest mean rel_change,
    lowest mean cosine_centered), chosen on the selection half of the user prompts and
    measured on the other: mean over its pairs with a crossed-bootstrap CI."""
    g = cc[~cc["is_control"] & (cc["position"] == position) & (cc["component"] == component)]
    g = g[np.isfinite(g[metric].to_numpy(np.float64))]
    if g.empty:
        return None
    sel = g[ctx.half(g["user_id"], estimate=False)]
    if sel.empty:
        return None
    per_layer = sel.groupby("layer")[metric].mean()
    layer = int(per_layer.idxmin() if RANK_METRICS.get(metric, False) else per_layer.idxmax())
    est = g[ctx.half(g["user_id"], estimate=True) & (g["layer"] == layer).to_numpy()]
    t = grouped_ci(est, ["layer"], metric, ctx, wu=ctx.w_est if ctx.select is not None else ctx.w)
    if t.empty:
        return None
    r = t.iloc[0]
    return {"layer": layer, "mean": number(r["mean"]), "ci": [number(r["ci_low"]), number(r["ci_high"])],
            "n_pairs": int(r["n_pairs"]), "mean_select": number(per_layer.loc[layer]), "selection": _selection_note(ctx)}


def sample_summary(ctx: Context) -> dict:
    """How many units the intervals rest on, how they were resampled, and which are small."""
    S = int(ctx.pairs["system"].nunique()) if len(ctx.pairs) else 0
    U = int(ctx.pairs["user_id"].nunique()) if len(ctx.pairs) else 0
    small = [what for what, n in (("system prompts", S), ("user prompts", U)) if n < SMALL]
    return {"n_systems": S, "n_users": U, "n_pairs": int(len(ctx.pairs)), "n_boot": ctx.n_boot, "seed": ctx.seed,
            "level": LEVEL,
            "resampling": "crossed" if ctx.ws is not None else "user prompts",
            "min_units": SMALL, "small_systems": S < SMALL, "small_users": U < SMALL, "small": small}


def selection_summary(ctx: Context) -> dict:
    """The seeded split of the user prompts that selected maxima are chosen and measured on."""
    if ctx.select is None:
        return {"method": "same", "seed": ctx.seed, "select_users": list(ctx.users), "estimate_users": list(ctx.users),
                "n_select": len(ctx.users), "n_estimate": len(ctx.users)}
    sel = [u for u, s in zip(ctx.users, ctx.select) if s]
    est = [u for u, s in zip(ctx.users, ctx.select) if not s]
    return {"method": "split", "seed": ctx.seed, "select_users": sel, "estimate_users": est,
            "n_select": len(sel), "n_estimate": len(est)}


def length_summary(lt: pd.DataFrame) -> dict:
    """The ``all``/``impact`` rows of ``length_tests``: Pearson and Spearman r, crossed CIs, p."""
    rows = lt[(lt["family"] == "all") & (lt["target"] == "impact")].set_index("method")
    if "pearson" not in rows.index:
        return {"pearson_r": None, "ci": [None, None], "p": None, "spearman_r": None}
    pe = rows.loc["pearson"]
    out = {"pearson_r": number(pe["r"]), "ci": [number(pe["ci_low"]), number(pe["ci_high"])], "p": number(pe["p"]),
           "n_systems": number(pe["n"]), "n_users": number(pe.get("n_users"))}
    if "spearman" in rows.index:
        sp = rows.loc["spearman"]
        out.update(spearman_r=number(sp["r"]), spearman_ci=[number(sp["ci_low"]), number(sp["ci_high"])],
                   spearman_p=number(sp["p"]))
    else:
        out["spearman_r"] = None
    return out


def tags_summary(ti: pd.DataFrame, target: str = "impact") -> dict:
    """Every tag's difference for ``target``, with the Bonferroni-adjusted p and simultaneous
    CI: the declared tags when the sweep has any, else the keyword features of the texts."""
    t = ti[ti["target"] == target]
    source = "tag" if (t["source"] == "tag").any() else "keyword"
    t = t[t["source"] == source]
    items = []
    for _, r in t.iterrows():
        items.append({"tag": r["tag"], "diff": number(r["diff"]), "ci": [number(r["ci_low"]), number(r["ci_high"])],
                      "ci_simultaneous": [number(r["ci_low_simultaneous"]), number(r["ci_high_simultaneous"])],
                      "p": number(r["p"]), "p_adjusted": number(r["p_adjusted"]),
                      "n_systems_with": int(r["n_systems_with"]), "n_systems_without": int(r["n_systems_without"])})
    k = len(items)
    return {"target": target, "source": source, "n_tags": k, "level": 1.0 - (1.0 - LEVEL) / max(k, 1),
            "items": items}


def summary(tables: dict[str, pd.DataFrame], ctx: Context, n_controls: int, model: str,
            attention_shares: dict[str, float | None]) -> dict:
    """``summary.json`` (docs/RESULTS.md) from the per-pair and analysis tables;
    ``attention_shares`` is :func:`promptshift.metrics.attention.attention_shares` over the
    variants of the system-prompt pairs."""
    cc = tables["component_change"]
    lr = tables["layer_ranking"]
    most, floor = {}, {}
    ctrl = cc[cc["is_control"] & (cc["position"] == "last")] if len(cc) else cc
    for comp in sorted(lr["component"].unique()) if len(lr) else []:
        d = held_out_peak(cc, ctx, comp)
        if d is None:
            continue
        most[comp] = d
        c = ctrl[(ctrl["component"] == comp) & (ctrl["layer"] == d["layer"])]["rel_change"]
        floor[comp] = number(c.mean()) if len(c) else None
    comp = ctx.impact_component
    above, note = None, ""
    if comp in most:
        m, c, layer = most[comp]["mean"], floor[comp], most[comp]["layer"]
        lo = most[comp]["ci"][0]
        if c is None:
            note = f"no control pairs (a sweep needs two or more user prompts), so {comp} change has no floor"
        elif m is None:
            note = f"{comp} change at the last token is undefined"
        elif lo is not None and lo > c:
            above = True
            note = (f"{comp} rel_change at the last token peaks at layer {layer} with mean {m:.4g} over the measured "
                    f"half's pairs; its 95% CI lies above the control floor {c:.4g} (two unrelated user prompts)")
        else:
            above = False
            note = (f"NOT above control: {comp} rel_change at the last token (mean {m:.4g} at its most affected layer "
                    f"{layer}) " + (f"is above the control floor {c:.4g} but its 95% CI reaches down to "
                                    f"{lo if lo is None else format(lo, '.4g')}" if m > c else
                                    f"does not exceed the control floor {c:.4g}; the system prompts change the "
                                    "last-token residual stream less than swapping the user prompt does"))
    imp = pair_impact(cc, tables["output_change"], ctx, tables.get("attention_change"))
    io = tables["internal_vs_output"]
    strongest = held_out_strongest(io, cc, imp, ctx) if len(io) else None
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
        "sample": sample_summary(ctx),
        "selection": selection_summary(ctx),
        "most_affected_layer": most,
        "control_floor": floor,
        "effects_above_control": above,
        "effects_note": note,
        "length": length_summary(tables["length_tests"]),
        "tags": tags_summary(tables["tag_impact"]),
        "attention_shares": attention_shares,
        "strongest_internal_output": strongest,
        "output": {
            "mean_kl": number(oc["kl"].mean()) if len(oc) else None,
            "top1_change_rate": number(oc["top1_changed"].mean()) if len(oc) else None,
            "mean_gen_edit_distance": number(oc["gen_edit_distance"].mean()) if len(oc) else None,
        },
        "lens_shift_layer": shift,
        "impact_component": comp,
    }


__all__ = ["Context", "cell_sums", "grouped_ci", "held_out_peak", "held_out_strongest", "internal_vs",
           "internal_vs_output", "layer_ranking", "length_summary", "length_tables", "pair_impact", "position_change",
           "sample_summary", "selection_summary", "summary", "tag_impact", "tags_summary"]
