"""The report's figures. Each is a function `Results -> matplotlib Figure` registered in
FIGURES with a stable id (the HTML anchor and the file name in `figures/`), a title and a
caption that says how to read it.

Figures are built on `matplotlib.figure.Figure` directly, never through pyplot: nothing
global changes (a notebook that calls `build_report` keeps its backend), no figure leaks,
and rendering goes through Agg for PNG whatever backend pyplot would pick.

Where docs/RESULTS.md gives a confidence interval in the table (`layer_ranking`,
`length_tests`, `tag_impact`, `position_change`, `internal_vs_output`) the figure draws
that interval. Where the figure itself aggregates a per-prompt table (attention, logit
lens, entropy) the band is mean ± 1.96 standard errors across user prompts, and the
caption says so: it is an approximation, cheaper than a bootstrap and honest about it.

Every figure states its sample (`_scope`): n (system prompts × user prompts, pairs,
conversations) and the unit its intervals resample (crossed bootstrap over system and
user prompts, user prompts only, conversations), computed from the results it draws; the
report prints it at the head of the caption.

Size: a catalogue, not a mechanism: one independent function per figure (about sixty lines
each) and the registry that orders them; a figure is read and changed on its own. Shared
helpers live in :mod:`promptshift.report.figkit`, the behaviour figures in
:mod:`promptshift.report.figures_behaviour`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from promptshift.jsonsafe import is_number
from promptshift.report.figkit import (
    MAX_WIDTH_IN, _band_line, _causal, _causal_n, _causal_unit, _ci_text, _components, _crossed, _f, _fig, _heat_height, _layer_ticks, _mark_site, _mean_se, _n, _note, _num_cols, _p, _pearson, _scope, _site_axis, _summary_layer, _systems_order,
)
from promptshift.report.figures_behaviour import fig_behaviour, fig_behaviour_internal
from promptshift.report.style import (
    HIGHLIGHT, METRIC_LABELS, MUTED, NEUTRAL, component_color, region_color, short,
)
from promptshift.report.tables import (
    NotAvailable, Results, at_position, not_control, only_control, pick, system_info, without_prefixes,
)



@dataclass(frozen=True)
class FigureSpec:
    id: str  # HTML anchor and file stem in figures/
    title: str
    caption: str
    draw: Callable[[Results], Figure]


# ---------------------------------------------------------------------------------------
# 1. component change by layer


def _layer_profile(res: Results) -> tuple[pd.DataFrame, str]:
    """(component, layer, metric, mean, ci_low, ci_high, control_mean[, rank]) at `last`.

    Prefers `layer_ranking` (bootstrap CIs from metrics); falls back to aggregating
    `component_change` here, with normal-approximation CIs, when that table is missing.
    """
    if res.has("layer_ranking"):
        lr = res.table("layer_ranking", ["component", "layer", "metric", "ci_low", "ci_high"], finite=["mean"])
        lr = at_position(lr, "last")
        lr = lr[lr["metric"].isin(["rel_change", "cosine_centered"])]
        if lr.empty:
            raise NotAvailable("`layer_ranking.parquet` has no rows for rel_change/cosine_centered at `last`")
        return lr.copy(), f"95% CI, {_crossed(res)} (layer_ranking)"
    cc = res.table("component_change", ["component", "layer", "cosine_centered"], finite=["rel_change"])
    cc = at_position(cc, "last")
    rows = []
    for metric in ("rel_change", "cosine_centered"):
        m = _mean_se(not_control(cc), ["component", "layer"], metric)
        ctrl = only_control(cc).groupby(["component", "layer"])[metric].mean().rename("control_mean")
        m = m.join(ctrl, on=["component", "layer"])
        m["metric"] = metric
        rows.append(m)
    return pd.concat(rows, ignore_index=True), "mean ± 1.96 SE across user prompts (layer_ranking missing)"


def fig_component_layer(res: Results) -> Figure:
    lr, band = _layer_profile(res)
    fallback = not res.has("layer_ranking")
    metrics = [m for m in ("rel_change", "cosine_centered") if m in set(lr["metric"])]
    comps = _components(lr["component"])
    fig = _fig(3.1 * len(comps) + 0.6, 2.7 * len(metrics) + 0.7)
    axes = fig.subplots(len(metrics), len(comps), squeeze=False, sharex=True)
    for i, metric in enumerate(metrics):
        for j, comp in enumerate(comps):
            ax = axes[i, j]
            d = lr[(lr["metric"] == metric) & (lr["component"].astype(str) == comp)].sort_values("layer")
            if d.empty:
                ax.set_axis_off()
                continue
            col = component_color(comp)
            x = d["layer"].to_numpy(int)
            ax.fill_between(x, d["ci_low"], d["ci_high"], color=col, alpha=0.22, linewidth=0)
            ax.plot(x, d["mean"], color=col, marker="o", markersize=3)
            if "control_mean" in d and d["control_mean"].notna().any():
                ax.plot(x, d["control_mean"], color=NEUTRAL, linestyle="--", linewidth=1.3)
            held = _summary_layer(res, comp) if metric == "rel_change" else None
            if held is not None and held in set(d["layer"]):
                top = d[d["layer"] == held].iloc[0]  # summary.json's choice: made on one half of the user prompts
            elif "rank" in d and d["rank"].notna().any():
                top = d.loc[d["rank"].idxmin()]
            else:
                top = d.loc[d["mean"].idxmax() if metric != "cosine_centered" else d["mean"].idxmin()]
            ax.plot([top["layer"]], [top["mean"]], marker="*", markersize=13, color=HIGHLIGHT,
                    markeredgecolor="white", zorder=5)
            ax.annotate(f"L{int(top['layer'])}", (top["layer"], top["mean"]), textcoords="offset points",
                        xytext=(6, 6), fontsize=9, color=HIGHLIGHT, fontweight="bold")
            _layer_ticks(ax, x, nbins=6)
            if i == 0:
                ax.set_title(comp, color=col)
            if j == 0:
                ax.set_ylabel(METRIC_LABELS.get(metric, metric), fontsize=9)
            if i == len(metrics) - 1:
                ax.set_xlabel("layer")
    handles = [
        Line2D([], [], color=NEUTRAL, marker="o", markersize=3, label="mean over pairs (colour = component)"),
        Patch(color=NEUTRAL, alpha=0.22, label=band),
        Line2D([], [], color=NEUTRAL, linestyle="--", label="control floor (two unrelated user prompts)"),
        Line2D([], [], color=HIGHLIGHT, marker="*", linestyle="", markersize=11, label="most changed layer"),
    ]
    fig.legend(handles=handles, loc="outside upper center", ncols=4)
    if fallback:
        _note(fig, "`layer_ranking.parquet` is missing: means and normal-approximation CIs were computed here "
                   "from `component_change.parquet`.")
    _scope(fig, f"{_n(res)}; bands: {band}")
    return fig


# ---------------------------------------------------------------------------------------
# 2. component x system prompt


def _annotated_heatmap(ax, values: pd.DataFrame, title: str, cbar_label: str, show_cbar: bool) -> None:
    import seaborn as sns

    # colour by each column's own scale: components differ by an order of magnitude, and a
    # shared scale would paint every column but one flat; the numbers give the real values
    scaled = values / values.abs().max(axis=0).replace(0, np.nan)
    annot = values.map(lambda v: "" if not np.isfinite(v) else f"{v:.3g}") if len(values) <= 60 else False
    sns.heatmap(scaled, ax=ax, cmap="rocket_r", vmin=0, vmax=1, annot=annot, fmt="", annot_kws={"fontsize": 8},
                linewidths=0.4, linecolor="white", cbar=show_cbar,
                cbar_kws={"label": cbar_label, "shrink": 0.6} if show_cbar else None)
    ax.set_title(title)
    ax.set_xlabel("component")
    ax.set_ylabel("")
    ax.tick_params(axis="x", rotation=0)
    ax.tick_params(axis="y", rotation=0)
    ax.grid(False)


def fig_component_system(res: Results) -> Figure:
    cc = res.table("component_change", ["system", "component", "layer"], finite=["rel_change"])
    cc = not_control(at_position(cc, "last"))
    if cc.empty:
        raise NotAvailable("`component_change.parquet` has no system-prompt rows at position `last`")
    comps = _components(cc["component"])
    mean = cc.pivot_table(index="system", columns="component", values="rel_change", aggfunc="mean")[comps]
    at = {}
    labels = []
    for comp in comps:
        lay = _summary_layer(res, comp)
        if lay is None:
            lay = int(cc[cc["component"] == comp].groupby("layer")["rel_change"].mean().idxmax())
        d = cc[(cc["component"] == comp) & (cc["layer"] == lay)]
        at[comp] = d.groupby("system")["rel_change"].mean()
        labels.append(f"{comp}\nL{lay}")
    at = pd.DataFrame(at).reindex(mean.index)
    order = _systems_order(mean[comps[-1]])
    mean, at = mean.loc[order], at.loc[order]
    mean.index = [short(s) for s in mean.index]
    at.index = mean.index
    at.columns = labels
    fig = _fig(3.4 + 2 * 0.95 * len(comps) + 1.0, _heat_height(len(order)))
    ax1, ax2 = fig.subplots(1, 2, sharey=True)
    _annotated_heatmap(ax1, mean, "mean over layers", "", False)
    _annotated_heatmap(ax2, at, "at each component's most affected layer", "value / column maximum", True)
    ax2.set_ylabel("")
    ax1.set_ylabel("system prompt (sorted by " + comps[-1] + ")")
    _scope(fig, f"{_n(res)}; each cell a mean over user prompts, no interval")
    return fig


def fig_system_layer(res: Results) -> Figure:
    """System prompt x layer: relative change and raw cosine of one residual component at
    the last token, with the control floor as the last row."""
    import seaborn as sns

    cc = at_position(res.table("component_change", ["system", "component", "layer", "cosine"],
                               finite=["rel_change"]), "last")
    comp = res.summary.get("impact_component") or ("resid_post" if "resid_post" in set(cc["component"]) else None)
    d = cc[cc["component"].astype(str) == str(comp)] if comp else cc.iloc[:0]
    var = not_control(d)
    if var.empty:
        raise NotAvailable(f"`component_change.parquet` has no system-prompt rows for {comp} at `last`")
    panels = []
    for value in ("rel_change", "cosine"):
        grid = var.pivot_table(index="system", columns="layer", values=value, aggfunc="mean")
        ctrl = only_control(d)
        if len(ctrl):
            grid.loc["[control: other user prompt]"] = ctrl.groupby("layer")[value].mean()
        panels.append(grid)
    order = _systems_order(panels[0].drop(index="[control: other user prompt]", errors="ignore").mean(axis=1))
    order += [i for i in panels[0].index if i not in order]
    n_layers = panels[0].shape[1]
    fig = _fig(MAX_WIDTH_IN, _heat_height(len(order)))
    axes = fig.subplots(1, 2, sharey=True)
    titles = (f"relative change ‖v − b‖ / ‖b‖ of {comp}", f"raw cosine cos(v, b) of {comp} (as the notebook reports)")
    cmaps = ("rocket_r", "mako")
    for ax, grid, title, cmap, digits in zip(axes, panels, titles, cmaps, (2, 3)):
        grid = grid.loc[order]
        grid.index = [short(str(i), 28) for i in grid.index]
        annot = (grid.map(lambda v, d=digits: "" if not np.isfinite(v) else f"{v:.{d}f}") if n_layers <= 12
                 else False)
        sns.heatmap(grid, ax=ax, cmap=cmap, annot=annot, fmt="", annot_kws={"fontsize": 7}, linewidths=0,
                    cbar_kws={"shrink": 0.7})
        if "[control: other user prompt]" in order:
            ax.axhline(len(order) - 1, color="white", linewidth=3)
        ax.set_title(title, fontsize=9.5)
        ax.set_xlabel("layer")
        ax.set_ylabel("")
        ax.tick_params(axis="y", rotation=0)
        ax.tick_params(axis="x", rotation=0)
        ax.grid(False)
    axes[0].set_ylabel("system prompt (by mean relative change)")
    _scope(fig, f"{_n(res)}; each cell a mean over user prompts (the control row: over control pairs), no interval")
    return fig


# ---------------------------------------------------------------------------------------
# 3. length vs impact


def _length_tests(res: Results, target: str) -> tuple[dict | None, dict[str, dict]]:
    """(test over all system prompts, {family: test within that family}) for `target`;
    each test is {"pearson": row, "spearman": row} from `length_tests`.

    docs/RESULTS.md says "`family` rows isolate length within the length families"; the
    metrics stage writes a `family` column holding "all" for the test over all system
    prompts and a family name for the test within that family. A `subset`/`scope` column
    ("all" / "family") is read the same way.
    """
    if not res.has("length_tests"):
        return None, {}
    lt = res.table("length_tests", ["method", "target", "r"])
    lt = lt[lt["target"].astype(str) == target]
    col = next((c for c in ("family", "subset", "scope") if c in lt.columns), None)
    key = (lt[col].astype(object).where(lt[col].notna(), "all").astype(str) if col else
           pd.Series("all", index=lt.index))
    key = key.where(~key.isin(["", "None", "nan"]), "all")
    tests: dict[str, dict] = {}
    for k, sub in lt.groupby(key, sort=False):
        tests[str(k)] = {str(r["method"]): r for _, r in sub.iterrows()}
    return tests.pop("all", None), tests


def _n_boot(res: Results) -> int | None:
    d = res.summary.get("sample")
    n = d.get("n_boot") if isinstance(d, dict) else None
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def _test_text(t: dict | None, n_boot: int | None = None) -> str:
    if not t or t.get("pearson") is None:
        return ""
    p = t["pearson"]
    if not np.isfinite(float(p["r"])):
        return "Pearson r undefined (too few system prompts or no spread)"
    s = f"Pearson r = {_f(p['r'])}"
    if "ci_low" in p and pd.notna(p.get("ci_low")):
        s += f" [{_f(p['ci_low'])}, {_f(p['ci_high'])}]"
    if "p" in p and pd.notna(p.get("p")):
        pv = _p(p["p"], n_boot)
        s += f", p {pv}" if pv.startswith("<") else f", p = {pv}"
    if t.get("spearman") is not None:
        s += f", Spearman ρ = {_f(t['spearman']['r'])}"
    return s


def _labelled(d: pd.DataFrame, target: str, fams: list[str], fit) -> set[str]:
    """Which points get a name. Family points never do (the legend and the joining line
    name them, and short versions of different families sit on top of each other); the
    other points all do in a small sweep, and in a large one only those that stand out
    (furthest from the fit, the longest), so labels stay readable with 20+ system prompts."""
    solo = d[~d["family"].astype(str).isin(fams)]
    if len(solo) <= 12:
        return set(solo["system"])
    out: set[str] = set()
    if fit is not None:
        resid = (solo[target] - np.polyval(fit, solo["n_system_tokens"])).abs()
        out |= set(solo.loc[resid.nlargest(4).index, "system"])
    if len(solo):
        out |= {solo.loc[solo["n_system_tokens"].idxmax(), "system"]}
    return out


def fig_length_impact(res: Results) -> Figure:
    li = res.table("length_impact", ["system", "n_system_tokens", "impact"]).copy()
    li["system"] = li["system"].astype(str)
    li = not_control(li)
    if "family" not in li.columns:
        info = system_info(res.provenance)
        li = li.merge(info[["system", "family", "level"]], on="system", how="left")
    targets = [t for t in ("impact", "kl") if t in li.columns and np.isfinite(li[t].astype(float)).any()]
    if not targets or not np.isfinite(li["n_system_tokens"].astype(float)).any():
        raise NotAvailable("`length_impact.parquet` has no finite impact or kl values")
    fig = _fig(5.9 * len(targets), 5.6)
    axes = fig.subplots(1, len(targets), squeeze=False)[0]
    fams = [f for f in pd.unique(li["family"].dropna().astype(str)) if f not in ("", "None", "nan")]
    fam_colors = dict(zip(fams, _family_palette(len(fams))))
    markers = "osD^vP<>Xh"
    rng = np.random.default_rng(0)
    handles: dict[str, object] = {}  # figure legend: the same in both panels
    for ax, target in zip(axes, targets):
        d = li[["system", "n_system_tokens", target, "family"]].dropna(subset=["n_system_tokens", target])
        x, y = d["n_system_tokens"].to_numpy(float), d[target].to_numpy(float)
        overall, within = _length_tests(res, target)
        solo = d[~d["family"].astype(str).isin(fams)]
        handles["no length family"] = ax.scatter(solo["n_system_tokens"], solo[target], s=30, color=MUTED,
                                                 edgecolor="white", zorder=3)
        fam_handles = []
        for k, fam in enumerate(fams):
            f = d[d["family"].astype(str) == fam].sort_values("n_system_tokens")
            t = within.get(fam, {}).get("pearson")
            label = fam + (f": r = {_f(t['r'])}" if t is not None and np.isfinite(float(t["r"])) else "")
            (h,) = ax.plot(f["n_system_tokens"], f[target], color=fam_colors[fam], marker=markers[k % len(markers)],
                           markersize=7, linewidth=1.4, zorder=4, label=label)
            fam_handles.append(h)
        fit = None
        if len(d) >= 3 and np.std(x) > 0:
            fit = np.polyfit(x, y, 1)
            grid = np.linspace(x.min(), x.max(), 100)
            boots = []
            for _ in range(400):
                idx = rng.integers(0, len(x), len(x))
                if np.std(x[idx]) > 0:
                    boots.append(np.polyval(np.polyfit(x[idx], y[idx], 1), grid))
            if boots:
                lo, hi = np.percentile(np.array(boots), [2.5, 97.5], axis=0)
                handles["fit 95% band (bootstrap over system prompts)"] = ax.fill_between(
                    grid, lo, hi, color=NEUTRAL, alpha=0.12, linewidth=0)
            (handles["least-squares fit, all system prompts"],) = ax.plot(grid, np.polyval(fit, grid), color=NEUTRAL,
                                                                          linewidth=1.4)
        for _, r in d[d["system"].isin(_labelled(d, target, fams, fit))].iterrows():
            ax.annotate(short(r["system"], 22), (r["n_system_tokens"], r[target]), textcoords="offset points",
                        xytext=(5, 3), fontsize=7.5, color="#444444")
        line = (f"all system prompts: {_test_text(overall, _n_boot(res))}" if overall else
                f"Pearson r = {_f(_pearson(x, y))} (computed here; no CI: length_tests.parquet missing)")
        ax.set_title(METRIC_LABELS.get(target, target) + "\n" + line, fontsize=9, loc="left", fontweight="normal")
        if fam_handles:
            ax.legend(handles=fam_handles, loc="lower right", fontsize=8, title="length families"
                      + (" (within-family Pearson r)" if within else ""), title_fontsize=8)
        ax.set_xlabel("system prompt length (tokens)")
        ax.set_ylabel(METRIC_LABELS.get(target, target))
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=min(len(handles), 4))
    if not res.has("length_tests"):
        _note(fig, "`length_tests.parquet` is missing: the Pearson r in the titles was computed here, without CI "
                   "or p-value.")
    _scope(fig, f"{_n(res)}; one point per system prompt (its mean over user prompts); r's 95% CI and p: "
                f"{_crossed(res)}; fit band: bootstrap over system prompts")
    return fig


def fig_length_output_attention(res: Results) -> Figure:
    """The notebook's other two length views: top-1 change rate and attention to the
    system tokens against system prompt length, one point per system prompt."""
    li = not_control(res.table("length_impact", ["system", "n_system_tokens"]).copy())
    li["system"] = li["system"].astype(str)
    panels = [(t, col) for t, col in (("top1_changed", "top1_change_rate"), ("attn_system", "attn_system"))
              if col in li.columns and np.isfinite(pd.to_numeric(li[col], errors="coerce").astype(float)).any()]
    if not panels:
        raise NotAvailable("`length_impact.parquet` has no top1_change_rate or attn_system column (metrics from an "
                           "earlier version)")
    fig = _fig(5.9 * len(panels), 4.8)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (target, col) in zip(axes, panels):
        d = li.dropna(subset=["n_system_tokens", col])
        x, y = d["n_system_tokens"].to_numpy(float), d[col].to_numpy(float)
        ax.scatter(x, y, s=34, color=region_color("system"), edgecolor="white", zorder=3,
                   label="system prompt (mean over user prompts)")
        if col == "attn_system" and "attn_system_uniform" in d.columns:
            ax.scatter(x, d["attn_system_uniform"].to_numpy(float), s=26, facecolor="none", edgecolor=MUTED,
                       zorder=2, label="its share of the visible keys (uniform attention)")
        if len(d) >= 3 and np.std(x) > 0:
            fit = np.polyfit(x, y, 1)
            grid = np.linspace(x.min(), x.max(), 50)
            ax.plot(grid, np.polyval(fit, grid), color=NEUTRAL, linewidth=1.2, label="least-squares fit")
        if len(d) <= 12:
            for _, r in d.iterrows():
                ax.annotate(short(r["system"], 22), (r["n_system_tokens"], r[col]), textcoords="offset points",
                            xytext=(5, 3), fontsize=7.5, color="#444444")
        overall, _ = _length_tests(res, target)
        line = (f"all system prompts: {_test_text(overall, _n_boot(res))}" if overall else
                f"Pearson r = {_f(_pearson(x, y))} (computed here; length_tests has no {target} rows)")
        what = ("top-1 change rate (share of user prompts whose next token changes)" if col == "top1_change_rate"
                else "attention from the last token to the system tokens")
        ax.set_title(what + "\n" + line, fontsize=9, loc="left", fontweight="normal")
        ax.set_xlabel("system prompt length (tokens)")
        ax.set_ylabel("top-1 change rate" if col == "top1_change_rate" else "attention mass (mean over layers, heads)")
        ax.set_ylim(bottom=0)
        ax.legend(loc="best", fontsize=8)
    _scope(fig, f"{_n(res)}; one point per system prompt (its mean over user prompts); r's 95% CI and p: "
                f"{_crossed(res)}")
    return fig


def _family_palette(n: int) -> list[str]:
    base = ["#E69F00", "#0072B2", "#009E73", "#CC79A7", "#D55E00", "#56B4E9", "#8c564b", "#F0E442"]
    return [base[i % len(base)] for i in range(n)]


# ---------------------------------------------------------------------------------------
# 4. tags


def fig_tag_impact(res: Results) -> Figure:
    ti = res.table("tag_impact", ["tag", "ci_low", "ci_high"], finite=["diff"]).copy()
    ti["ci_low"], ti["ci_high"] = ti["ci_low"].fillna(ti["diff"]), ti["ci_high"].fillna(ti["diff"])
    ti["tag"] = ti["tag"].astype(str)
    if "source" in ti.columns:  # declared tags and keyword features of the text, told apart
        ti["tag"] = ti["tag"] + np.where(ti["source"].astype(str) == "keyword", " (keyword)", " (tag)")
    if "target" not in ti.columns:
        ti["target"] = "impact"
    targets = [t for t in ("impact", "kl") if t in set(ti["target"])] + \
        sorted(t for t in set(ti["target"].astype(str)) if t not in ("impact", "kl"))
    first = ti[ti["target"] == targets[0]].set_index("tag")["diff"]
    order = list(first.sort_values().index) + sorted(set(ti["tag"]) - set(first.index))
    simultaneous = {"ci_low_simultaneous", "ci_high_simultaneous"} <= set(ti.columns)
    if simultaneous:
        for c in ("ci_low_simultaneous", "ci_high_simultaneous"):
            ti[c] = pd.to_numeric(ti[c], errors="coerce").fillna(ti["diff"])
    by_system = {"n_systems_with", "n_systems_without"} <= set(ti.columns)
    fig = _fig(4.6 * len(targets) + 1.5, max(3.0, 1.4 + 0.32 * len(order)))
    axes = fig.subplots(1, len(targets), squeeze=False, sharey=True)[0]
    ypos = {t: i for i, t in enumerate(order)}
    for ax, target in zip(axes, targets):
        d = ti[ti["target"] == target]
        y = d["tag"].map(ypos).to_numpy()
        # the interval the findings use: corrected for the number of tags of its kind when there is one
        lo, hi = ("ci_low_simultaneous", "ci_high_simultaneous") if simultaneous else ("ci_low", "ci_high")
        sig = ((d[lo] > 0) | (d[hi] < 0)).to_numpy()
        what = "simultaneous 95% CI (Bonferroni)" if simultaneous else "95% CI"
        for s, col in ((True, HIGHLIGHT), (False, MUTED)):
            m = sig == s
            ax.errorbar(d["diff"].to_numpy()[m], y[m],
                        xerr=[(d["diff"] - d[lo]).to_numpy()[m], (d[hi] - d["diff"]).to_numpy()[m]],
                        fmt="o", color=col, ecolor=col, capsize=3, markersize=6,
                        label=f"{what} excludes 0" if s else f"{what} includes 0")
        ax.axvline(0, color=NEUTRAL, linewidth=1)
        ax.set_title(f"{target}: with tag − without tag")
        ax.set_xlabel(f"difference in mean {target}")
        ax.legend(loc="lower right")
    labels = []
    for t in order:
        r = ti[(ti["tag"] == t) & (ti["target"] == targets[0])]
        cols = ("n_systems_with", "n_systems_without") if by_system else ("n_with", "n_without")
        if set(cols) <= set(ti.columns) and len(r):
            labels.append(f"{short(t, 24)}  ({int(r[cols[0]].iloc[0])} vs {int(r[cols[1]].iloc[0])})")
        else:
            labels.append(short(t, 24))
    axes[0].set_yticks(range(len(order)), labels)
    axes[0].set_ylabel(f"tag or keyword  (n {'system prompts' if by_system else 'pairs'} with vs without)")
    axes[0].set_ylim(-0.7, len(order) - 0.3)
    _scope(fig, f"{_n(res)}; bars: "
                + ("simultaneous 95% CI over the tags (or keywords) tested (Bonferroni), " if simultaneous
                   else "95% CI, ") + _crossed(res))
    return fig


# ---------------------------------------------------------------------------------------
# 5. attention


def _attention_last(res: Results) -> pd.DataFrame:
    ar = res.table("attention_regions", ["role", "system", "layer", "region", "scope"], finite=["mass"])
    ar = ar[ar["scope"].astype(str) == "last"]
    if ar.empty:
        raise NotAvailable("`attention_regions.parquet` has no rows with scope `last`")
    if "uniform" in ar.columns:
        # a region with no keys in a prompt (no system turn in the baseline) has mass 0 by
        # construction; averaging those zeros in would read as "not attended to"
        ar = ar[~(pd.to_numeric(ar["uniform"], errors="coerce") == 0)]
    return ar


def fig_attention_regions(res: Results) -> Figure:
    ar = _attention_last(res)
    regions = [r for r in ("sink", "system", "prefix", "user", "gen_prompt") if r in set(ar["region"].astype(str))]
    if not regions:
        raise NotAvailable("`attention_regions.parquet` has none of the regions sink, system, user, gen_prompt")
    al = res.raw("attention_layers")
    al = without_prefixes(al) if al is not None else None  # system-prompt pairs, as every other panel
    recent = al is not None and "recent_mass" in al.columns and al["recent_mass"].notna().any()
    fig = _fig(3.3 * (len(regions) + recent) + 0.4, 3.6)
    axes = fig.subplots(1, len(regions) + recent, squeeze=False, sharex=True)[0]
    if recent:
        # the notebook's "recent tokens": the last k keys, whatever region they belong to
        ax = axes[-1]
        k = res.provenance.get("metrics_recent_k")
        for role, ls in (("variant", "-"), ("baseline", "--")):
            r = al[al["role"].astype(str) == role]
            if r.empty:
                continue
            m = _mean_se(r, ["layer"], "recent_mass")
            ax.fill_between(m["layer"], m["ci_low"], m["ci_high"], color=NEUTRAL, alpha=0.2, linewidth=0)
            ax.plot(m["layer"], m["mean"], color=NEUTRAL, linestyle=ls)
        u = al[al["role"].astype(str) == "variant"].groupby("layer")["recent_uniform"].mean()
        ax.plot(u.index, u.to_numpy(), color=MUTED, linestyle=":", linewidth=1.3)
        ax.set_title(f"→ recent (last {k if k else 'k'})", color=NEUTRAL)
        ax.set_xlabel("layer")
        ax.set_ylim(bottom=0)
        _layer_ticks(ax, al["layer"])
    for ax, region in zip(axes, regions):
        d = ar[ar["region"].astype(str) == region]
        col = region_color(region)
        for role, ls in (("variant", "-"), ("baseline", "--")):
            r = d[d["role"].astype(str) == role]
            if r.empty:
                continue
            m = _mean_se(r, ["layer"], "mass")
            ax.fill_between(m["layer"], m["ci_low"], m["ci_high"], color=col, alpha=0.2, linewidth=0)
            ax.plot(m["layer"], m["mean"], color=col, linestyle=ls)
        if "uniform" in d.columns:
            v = d[d["role"].astype(str) == "variant"]
            u = (v if len(v) else d).groupby("layer")["uniform"].mean()
            ax.plot(u.index, u.to_numpy(), color=MUTED, linestyle=":", linewidth=1.3)
        ax.set_title(f"→ {region}", color=col)
        ax.set_xlabel("layer")
        ax.set_ylim(bottom=0)
        _layer_ticks(ax, d["layer"])
    axes[0].set_ylabel("attention mass from the last token")
    handles = [Line2D([], [], color=NEUTRAL, label="with system prompt (variant)"),
               Line2D([], [], color=NEUTRAL, linestyle="--", label="baseline"),
               Line2D([], [], color=MUTED, linestyle=":", label="uniform attention over visible keys (variants)"),
               Patch(color=NEUTRAL, alpha=0.2, label="mean ± 1.96 SE across user prompts")]
    fig.legend(handles=handles, loc="outside upper center", ncols=4)
    _scope(fig, f"{_n(res)}, and the baselines; bands: mean ± 1.96 SE across user prompts (normal approximation, "
                "user prompts as the unit)")
    return fig


def fig_attention_system_heatmap(res: Results) -> Figure:
    import seaborn as sns

    ar = _attention_last(res)
    d = ar[ar["region"].astype(str) == "system"].copy()
    if d.empty:
        raise NotAvailable("no attention to a `system` region at scope `last` (no system prompt tokens?)")
    value = "mass_nosink" if "mass_nosink" in d.columns and d["mass_nosink"].notna().any() else "mass"
    var = d[d["role"].astype(str) == "variant"]
    if var.empty:
        raise NotAvailable("`attention_regions.parquet` has no variant rows with a system region")
    grid = var.pivot_table(index="system", columns="layer", values=value, aggfunc="mean")
    grid = grid.loc[_systems_order(grid.mean(axis=1))]
    base = d[d["role"].astype(str) == "baseline"]
    if not base.empty:
        # a baseline with a system region carries a default system prompt from the template
        b = base.pivot_table(index="system", columns="layer", values=value, aggfunc="mean")
        b.index = [f"[baseline] {s}" for s in b.index]
        grid = pd.concat([grid, b])
    grid.index = [short(s) for s in grid.index]
    fig = _fig(max(8.0, 2.5 + 0.32 * grid.shape[1]), _heat_height(len(grid)))
    ax = fig.subplots()
    label = ("share of non-sink attention\nto system tokens" if value == "mass_nosink"
             else "attention mass\nto system tokens")
    sns.heatmap(grid, ax=ax, cmap="viridis", vmin=0, linewidths=0, cbar_kws={"label": label, "shrink": 0.7})
    if not base.empty:
        ax.axhline(len(grid) - len(b), color="white", linewidth=3)
    ax.set_xlabel("layer")
    ax.set_ylabel("system prompt (by mean)")
    ax.tick_params(axis="y", rotation=0)
    ax.tick_params(axis="x", rotation=0)
    ax.grid(False)
    _scope(fig, f"{_n(res)}; each cell a mean over user prompts and heads, no interval")
    return fig


def fig_attention_entropy(res: Results) -> Figure:
    if res.has("attention_regions") and "entropy" in res.table("attention_regions").columns:
        ar = _attention_last(res)
        keys = [c for c in ("prompt", "role", "system", "user_id", "layer") if c in ar.columns]
        d = ar.drop_duplicates(keys)  # entropy is per prompt x layer, repeated on each region row
        d = d[np.isfinite(d["entropy"].astype(float))]
        source = "last query row"
    else:
        d = res.table("attention_layers", ["role", "system", "layer"], finite=["entropy"])
        source = "all query rows"
    if "user_id" not in d.columns:
        d = d.assign(user_id=d.get("prompt", pd.Series(range(len(d)), index=d.index)))
    per_prompt = d.groupby(["role", "system", "user_id"], observed=True)["entropy"].mean().reset_index()
    var = per_prompt[per_prompt["role"].astype(str) == "variant"]
    if var.empty:
        raise NotAvailable("no variant rows with entropy")
    m = _mean_se(var, ["system"], "entropy").set_index("system").sort_values("mean")
    fig = _fig(7.5, max(3.0, 1.4 + 0.3 * len(m)))
    ax = fig.subplots()
    y = np.arange(len(m))
    ax.errorbar(m["mean"], y, xerr=[m["mean"] - m["ci_low"], m["ci_high"] - m["mean"]], fmt="o",
                color=region_color("system"), ecolor=NEUTRAL, capsize=3, label="with system prompt (mean ± 1.96 SE)")
    base = per_prompt[per_prompt["role"].astype(str) == "baseline"]
    if not base.empty:
        bm = _mean_se(base.assign(k="b"), ["k"], "entropy").iloc[0]
        ax.axvspan(bm["ci_low"], bm["ci_high"], color=MUTED, alpha=0.25, linewidth=0)
        ax.axvline(bm["mean"], color=NEUTRAL, linestyle="--", linewidth=1.3, label="baseline (± 1.96 SE)")
    ax.set_yticks(y, [short(s) for s in m.index])
    ax.set_ylim(-0.7, len(m) - 0.3)
    ax.set_xlabel(f"attention entropy, {source}, mean over layers and heads (nats)")
    ax.legend(loc="lower right")
    _scope(fig, f"{_n(res)}; error bars: ± 1.96 SE across user prompts (normal approximation)")
    return fig


# ---------------------------------------------------------------------------------------
# 5b. instruction placement


def fig_placement(res: Results) -> Figure:
    """The same instruction as a system prompt and as a prefix of the user turn."""
    pc = res.table("placement_compare", ["system_prompt", "prefix", "measure", "diff", "ci_low", "ci_high"])
    pl = res.table("placement_layers", ["system", "placement", "instruction", "component", "layer", "mean"])
    pc = pc[pc["system_prompt"].astype(str) != "all"]
    if pc.empty:
        raise NotAvailable("`placement_compare.parquet` has no instruction held both as a system prompt and as a "
                           "prefix (match them by name or with `same_as`)")
    matches = list(dict.fromkeys(zip(pc["system_prompt"].astype(str), pc["prefix"].astype(str))))
    comp = res.summary.get("impact_component") or "resid_post"
    if comp not in set(pl["component"].astype(str)):
        comp = str(pl["component"].iloc[0])
    colors = _family_palette(len(matches))
    forests = [(m, lab) for m, lab in (("kl", "next-token KL"), ("top1_changed", "top-1 change rate"),
                                        (f"depth:{comp}", "depth of the change (layer)"),
                                        ("onset:patching_suffix", "onset, suffix patching"),
                                        ("onset:patching_last", "onset, last-token patching"),
                                        ("stops_mattering:knockout", "knockout stops mattering"))
               if m in set(pc["measure"].astype(str))]
    # one row: the layer profile and up to three comparisons; a second row for the causal ones
    cols = min(3, len(forests))
    rows = 1 + (len(forests) > 3)
    fig = _fig(MAX_WIDTH_IN, rows * max(3.6, 1.9 + 0.35 * len(matches)))
    grid = fig.add_gridspec(rows, 1 + cols, width_ratios=[1.6] + [1] * cols)
    axes = [fig.add_subplot(grid[:, 0])] + [fig.add_subplot(grid[k // cols, 1 + k % cols])
                                            for k in range(len(forests))]
    ax = axes[0]
    handles = []
    for (sys_name, pre_name), col in zip(matches, colors):
        for label, ls in ((sys_name, "-"), (f"prefix:{pre_name}", "--")):
            d = pl[(pl["system"].astype(str) == label) & (pl["component"].astype(str) == comp)].sort_values("layer")
            if d.empty:
                continue
            if {"ci_low", "ci_high"} <= set(d.columns):
                ax.fill_between(d["layer"], d["ci_low"], d["ci_high"], color=col, alpha=0.12, linewidth=0)
            ax.plot(d["layer"], d["mean"], color=col, linestyle=ls)
        handles.append(Line2D([], [], color=col, label=short(sys_name if sys_name == pre_name
                                                            else f"{sys_name} / {pre_name}", 26)))
    handles += [Line2D([], [], color=NEUTRAL, label="as system prompt"),
                Line2D([], [], color=NEUTRAL, linestyle="--", label="as prefix of the user turn")]
    ax.set_title(f"relative change of {comp} at the last token", fontsize=9.5)
    ax.set_xlabel("layer")
    ax.set_ylabel("mean ‖v − b‖ / ‖b‖ (95% CI)")
    ax.set_ylim(bottom=0)
    _layer_ticks(ax, pl["layer"])
    ax.legend(handles=handles, fontsize=7.5, loc="upper left")
    y = np.arange(len(matches))
    names = [short(a if a == b else f"{a} / {b}", 22) for a, b in matches]
    for ax, (m, lab) in zip(axes[1:], forests):
        d = pc[pc["measure"].astype(str) == m].set_index(["system_prompt", "prefix"]).reindex(matches)
        diff = d["diff"].to_numpy(float)
        lo, hi = d["ci_low"].to_numpy(float), d["ci_high"].to_numpy(float)
        sig = (lo > 0) | (hi < 0)
        for k in range(len(matches)):
            c = HIGHLIGHT if sig[k] else MUTED
            ax.errorbar(diff[k], y[k], xerr=[[diff[k] - lo[k]], [hi[k] - diff[k]]], fmt="o", color=c, ecolor=c,
                        capsize=3)
        ax.axvline(0, color=NEUTRAL, linewidth=1)
        ax.set_title(f"{lab}:\nprefix − system", fontsize=9)
        first_col = axes.index(ax) % cols == 1 or cols == 1
        ax.set_yticks(y, names if first_col else [""] * len(y))
        ax.set_ylim(-0.7, len(matches) - 0.3)
        ax.invert_yaxis()
    _scope(fig, f"{_n(res)}; {len(matches)} instruction(s) held in both places; bands and intervals: 95%, "
                "bootstrap over user prompts (a user prompt's system and prefix pairs drawn together)")
    return fig


# ---------------------------------------------------------------------------------------
# 6. logit lens


def fig_lens(res: Results) -> Figure:
    lc = not_control(res.table("lens_change", ["layer", "top1_agree"], finite=["kl_lens"]))
    if lc.empty:
        raise NotAvailable("`lens_change.parquet` has no pair rows")
    kl = _mean_se(lc, ["layer"], "kl_lens")
    agree = _mean_se(lc.assign(top1_agree=lc["top1_agree"].astype(float)), ["layer"], "top1_agree")
    shift = res.summary.get("lens_shift_layer")
    fig = _fig(12.0, 3.9)
    ax1, ax2 = fig.subplots(1, 2, sharex=True)
    col = component_color("resid_post")
    ax1.fill_between(kl["layer"], kl["ci_low"].clip(lower=0), kl["ci_high"], color=col, alpha=0.2, linewidth=0)
    ax1.plot(kl["layer"], kl["mean"], color=col, marker="o", markersize=3, label="mean over pairs")
    ax1.set_ylabel("logit-lens KL(variant ‖ baseline)")
    ax1.set_title("how far the lens distributions move")
    ax2.fill_between(agree["layer"], 100 * agree["ci_low"].clip(0, 1), 100 * agree["ci_high"].clip(0, 1), color=col,
                     alpha=0.2, linewidth=0)
    ax2.plot(agree["layer"], 100 * agree["mean"], color=col, marker="o", markersize=3, label="mean over pairs")
    ax2.set_ylabel("lens top-1 token agrees (% of pairs)")
    ax2.set_ylim(-3, 103)
    ax2.set_title("variant and baseline agree on the lens top-1")
    for ax in (ax1, ax2):
        ax.set_xlabel("layer")
        _layer_ticks(ax, kl["layer"])
        if isinstance(shift, (int, float)) and not isinstance(shift, bool):
            ax.axvline(shift, color=HIGHLIGHT, linestyle="--", linewidth=1.5,
                       label=f"output shift appears (layer {int(shift)})")
        ax.legend(loc="best")
    _scope(fig, f"{_n(res)}; bands: ± 1.96 SE across user prompts (normal approximation)")
    return fig


# ---------------------------------------------------------------------------------------
# 7. internal vs output


def _pair_internal(res: Results) -> tuple[pd.DataFrame, pd.DataFrame]:
    cc = res.table("component_change", ["pair", "component", "layer"], finite=["rel_change"])
    cc = not_control(at_position(cc, "last"))
    oc = not_control(res.table("output_change", ["pair"], finite=["kl"]))
    return cc, oc


def _r_by_layer(res: Results, cc: pd.DataFrame, oc: pd.DataFrame) -> tuple[pd.DataFrame, bool]:
    """Pearson r of rel_change vs kl per component x layer: from the table when present."""
    if res.has("internal_vs_output"):
        iv = res.table("internal_vs_output", ["component", "layer"], finite=["r"])
        icol = pick(iv, ("internal", "internal_measure", "measure", "metric"), "internal_vs_output",
                    "internal-measure")
        ocol = pick(iv, ("output", "output_measure", "target"), "internal_vs_output", "output-measure")
        d = iv[(iv[icol].astype(str) == "rel_change") & (iv[ocol].astype(str) == "kl")]
        if "method" in d.columns:
            d = d[d["method"].astype(str) == "pearson"]
        d = at_position(d, "last")
        if not d.empty:
            return d.copy(), True
    m = cc.merge(oc[["pair", "kl"]], on="pair")
    rows = [dict(component=c, layer=lay, r=_pearson(g["rel_change"], g["kl"]))
            for (c, lay), g in m.groupby(["component", "layer"])]
    return pd.DataFrame(rows), False


def fig_internal_output(res: Results) -> Figure:
    cc, oc = _pair_internal(res)
    rl, from_table = _r_by_layer(res, cc, oc)
    comps = _components(rl["component"])
    strongest = res.summary.get("strongest_internal_output") or {}
    if not isinstance(strongest, dict) or strongest.get("measure", "rel_change") != "rel_change" \
            or strongest.get("output", "kl") != "kl":
        strongest = {}  # the summary's strongest pair is about another measure: not what these panels show
    fig = _fig(3.2 * max(len(comps), 3) + 0.4, 7.6)
    gs = fig.add_gridspec(2, len(comps), height_ratios=[1, 1.15])
    top = fig.add_subplot(gs[0, :])
    for comp in comps:
        d = rl[rl["component"].astype(str) == comp].sort_values("layer")
        col = component_color(comp)
        if from_table and {"ci_low", "ci_high"} <= set(d.columns):
            top.fill_between(d["layer"], d["ci_low"], d["ci_high"], color=col, alpha=0.15, linewidth=0)
        top.plot(d["layer"], d["r"], color=col, marker="o", markersize=3, label=comp)
    top.axhline(0, color=NEUTRAL, linewidth=0.8)
    top.set_xlabel("layer")
    top.set_ylabel("Pearson r (rel_change at `last` vs KL)")
    top.set_title("correlation across pairs, per layer" +
                  (" (bands: 95% CI from internal_vs_output)" if from_table else " (computed here, no CI)"))
    _layer_ticks(top, rl["layer"])
    top.legend(loc="best", ncols=len(comps))
    merged = cc.merge(oc[["pair", "kl"]], on="pair")
    for j, comp in enumerate(comps):
        ax = fig.add_subplot(gs[1, j])
        d = rl[rl["component"].astype(str) == comp].dropna(subset=["r"])
        if d.empty:
            ax.set_axis_off()
            continue
        best = int(d.loc[d["r"].abs().idxmax(), "layer"])
        if strongest.get("component") == comp and isinstance(strongest.get("layer"), (int, float)):
            best = int(strongest["layer"])
        pts = merged[(merged["component"].astype(str) == comp) & (merged["layer"] == best)]
        pts = pts[np.isfinite(pts["rel_change"].astype(float)) & np.isfinite(pts["kl"].astype(float))]
        col = component_color(comp)
        ax.scatter(pts["rel_change"], pts["kl"], s=14, color=col, alpha=0.6, edgecolor="none")
        x, y = pts["rel_change"].to_numpy(float), pts["kl"].to_numpy(float)
        if len(x) >= 3 and np.std(x) > 0:
            g = np.linspace(np.nanmin(x), np.nanmax(x), 50)
            ax.plot(g, np.polyval(np.polyfit(x, y, 1), g), color=NEUTRAL, linewidth=1.2)
        star = " ★" if strongest.get("component") == comp and int(strongest.get("layer", -1)) == best else ""
        ax.set_title(f"{comp} L{best}: r = {_f(_pearson(x, y))}{star}", color=col, fontsize=10)
        ax.set_xlabel(f"rel_change of {comp} at layer {best}")
        if j == 0:
            ax.set_ylabel("KL(variant ‖ baseline), next token")
    if not from_table:
        _note(fig, "`internal_vs_output.parquet` is missing (or has no rel_change × kl rows): r per layer was "
                   "computed here from `component_change` and `output_change`, without CI.")
    scope = f"{_n(res)}; top bands: 95% CI, {_crossed(res)}"
    if strongest.get("selection") == "split" and isinstance(strongest.get("n_pairs"), int):
        scope += (f"; ★ chosen on one half of the user prompts, its r measured on the other half "
                  f"({strongest['n_pairs']} pairs)")
    scope += ("; bottom panels without ★: each component's layer of largest |r| on all pairs, chosen and shown "
              "on the same pairs (optimistic)")
    _scope(fig, scope)
    return fig


# ---------------------------------------------------------------------------------------
# 8. position


def fig_position(res: Results) -> Figure:
    import seaborn as sns

    pc = res.table("position_change", ["component", "layer"])
    if "axis" in pc.columns:  # metrics writes per-token rows (axis from_end) and per-region rows (axis region)
        pc = pc[pc["axis"].astype(str) == "from_end"]
        if pc.empty:
            raise NotAvailable("`position_change.parquet` has no per-token rows (axis `from_end`); was the store "
                               "written with `keep: last` only?")
    pos = pick(pc, ("pos_from_end", "position_from_end", "from_end", "index_from_end", "pos_bin", "bin", "position"),
               "position_change", "position-bin")
    val = pick(pc, ("mean", "rel_change"), "position_change", "value")
    pc = pc.copy()
    pc[pos] = pd.to_numeric(pc[pos], errors="coerce")
    pc[val] = pd.to_numeric(pc[val], errors="coerce")
    pc = pc[np.isfinite(pc[pos].astype(float)) & np.isfinite(pc[val].astype(float))]
    if pc.empty:
        raise NotAvailable(f"`position_change.parquet` has no numeric `{pos}` values")
    last = int(pc[pos].min())  # the index of the last prompt token (0 or 1, by convention)
    pc["x"] = -(pc[pos] - last)  # last prompt token at x = 0, earlier tokens to the left
    comps = _components(pc["component"])
    fig = _fig(13.0, 4.6)
    ax1, ax2 = fig.subplots(1, 2, width_ratios=[1.1, 1])
    if "region" in pc.columns:
        reg = pc.groupby("x")["region"].agg(lambda s: s.astype(str).mode().iloc[0]).sort_index()
        start = None
        for i, (x, r) in enumerate(reg.items()):
            nxt = reg.iloc[i + 1] if i + 1 < len(reg) else None
            start = x if start is None else start
            if nxt != r:
                ax1.axvspan(start - 0.5, x + 0.5, color=region_color(r), alpha=0.12, linewidth=0)
                ax1.text((start + x) / 2, 1.0, r, transform=ax1.get_xaxis_transform(), ha="center", va="bottom",
                         fontsize=9, color=region_color(r), fontweight="bold")
                start = None
    for comp in comps:
        d = pc[pc["component"].astype(str) == comp]
        lay = _summary_layer(res, comp)
        if lay is None or lay not in set(d["layer"]):
            lay = int(d.groupby("layer")[val].mean().idxmax())
        d = d[d["layer"] == lay].groupby("x")[[c for c in (val, "ci_low", "ci_high") if c in d.columns]].mean()
        col = component_color(comp)
        if {"ci_low", "ci_high"} <= set(d.columns):
            ax1.fill_between(d.index, d["ci_low"], d["ci_high"], color=col, alpha=0.18, linewidth=0)
        ax1.plot(d.index, d[val], color=col, marker="o", markersize=3, label=f"{comp} (layer {lay})")
    ax1.xaxis.set_major_locator(MaxNLocator(nbins=10, integer=True))
    ax1.set_xlabel("aligned token, counted back from the last prompt token (0 = last)")
    ax1.set_ylabel("relative change ‖v − b‖ / ‖b‖")
    ax1.legend(loc="upper left", title="at the most affected layer")
    heat_comp = next((c for c in ("resid_post", "resid_pre") if c in comps), comps[0])
    h = pc[pc["component"].astype(str) == heat_comp].pivot_table(index="layer", columns="x", values=val, aggfunc="mean")
    h = h.sort_index(ascending=False)
    sns.heatmap(h, ax=ax2, cmap="rocket_r", vmin=0, cbar_kws={"label": f"relative change of {heat_comp}"})
    ax2.set_title(f"{heat_comp}: layer × token position")
    ax2.set_xlabel("aligned token from the end (0 = last)")
    ax2.set_ylabel("layer")
    ax2.tick_params(axis="y", rotation=0)
    ax2.tick_params(axis="x", rotation=0)
    ax2.grid(False)
    _scope(fig, f"{_n(res)} (fewer at token indices only longer suffixes reach); bands: 95% CI, {_crossed(res)}")
    return fig


# ---------------------------------------------------------------------------------------
# 9. causal analyses (`promptshift causal`; tables causal_* and multiturn_*)

MODE_COLORS = {"suffix": "#0072B2", "last": "#D55E00"}
MODE_LABELS = {"suffix": "suffix: every aligned suffix position patched", "last": "last: last position only"}
CONDITION_COLORS = {"system": "#E69F00", "system_plain": "#0072B2", "no_system": "#7a7a7a"}
CONDITION_LABELS = {
    "system": "system: rule as system prompt, history obeys it",
    "system_plain": "system_plain: rule as system prompt, history without the rule's marker",
    "no_system": "no_system: empty system turn, history obeys the rule",
}
SYSTEM_PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9", "#8c564b", "#F0E442"]


def fig_causal_patching(res: Results) -> Figure:
    pc = res.table("causal_patching_curve", ["mode", "site"], finite=["recovered_kl"])
    pc = _num_cols(pc, [c for c in pc.columns if c.startswith("recovered")])
    modes = [m for m in ("suffix", "last") if m in set(pc["mode"].astype(str))] + \
        sorted(set(pc["mode"].astype(str)) - {"suffix", "last"})
    has_lp = "recovered_lp" in pc.columns and np.isfinite(pc["recovered_lp"]).any()
    fig = _fig(11.8 if has_lp else 7.2, 4.3)
    axes = fig.subplots(1, 2 if has_lp else 1, squeeze=False, sharex=True)[0]
    thr = _causal(res, "patching", "threshold")
    thr = float(thr) if is_number(thr) else 0.5
    handles, undefined = [], []
    for mode in modes:
        d = pc[pc["mode"].astype(str) == mode].sort_values("site")
        col = MODE_COLORS.get(mode, NEUTRAL)
        x = d["site"].to_numpy(int)
        handles.append(_band_line(axes[0], x, d, "recovered_kl", col, MODE_LABELS.get(mode, mode)))
        if has_lp:
            _band_line(axes[1], x, d, "recovered_lp", col, None)
        onset = _causal(res, "patching", "modes", mode, "onset") or {}
        site = onset.get("site") if isinstance(onset, dict) else None
        for ax in axes:
            h = _mark_site(ax, site, onset.get("ci") if isinstance(onset, dict) else None, col,
                           f"{mode}: onset at site {int(site)} ({_ci_text(onset.get('ci'))})"
                           if is_number(site) else "")
        if h is not None:
            handles.append(h)
        elif isinstance(_causal(res, "patching", "modes", mode), dict):
            undefined.append(mode)
    for ax in axes:
        ax.axhline(0, color=NEUTRAL, linewidth=0.8)
        ax.axhline(1, color=MUTED, linewidth=0.8, linestyle=":")
        _site_axis(ax, pc["site"])
    axes[0].axhline(thr, color=MUTED, linewidth=1.0, linestyle="-.")
    axes[0].set_ylabel("recovered: 1 − ΣKL(v ‖ patched) / ΣKL(v ‖ b)")
    axes[0].set_title("output change recovered (KL)")
    if has_lp:
        axes[1].set_ylabel("recovered log-prob of the variant's top-1 token")
        axes[1].set_title("variant's top-1 token log-prob recovered")
    handles.append(Line2D([], [], color=MUTED, linestyle="-.", label=f"onset threshold ({_f(thr)})"))
    handles.append(Patch(color=NEUTRAL, alpha=0.2, label=f"95% CI, {_causal_unit(res, 'patching')}"))
    fig.legend(handles=handles, loc="outside upper center", ncols=min(len(handles), 3), fontsize=8.5)
    for mode in undefined:
        _note(fig, f"Mode `{mode}` never reaches the onset threshold ({_f(thr)}) before the final residual: "
                   "its onset is undefined in summary.json.")
    if _causal(res, "patching") is None:
        _note(fig, "summary.json has no `causal.patching` section: onsets are not marked.")
    _scope(fig, f"{_causal_n(res, 'patching')}; bands and onset CI: 95%, {_causal_unit(res, 'patching')}")
    return fig


def fig_causal_continuation(res: Results) -> Figure:
    cc = res.table("causal_continuation_curve", ["mode", "site", "recovered_cont"], finite=["recovered_cont"])
    cc = _num_cols(cc, [c for c in cc.columns if c.startswith("recovered") or c == "site"])
    modes = [m for m in ("suffix", "last") if m in set(cc["mode"].astype(str))] + \
        sorted(set(cc["mode"].astype(str)) - {"suffix", "last"})
    pc = res.table("causal_patching_curve") if res.has("causal_patching_curve") else None
    fig = _fig(8.6, 4.5)
    ax = fig.subplots(1, 1)
    thr = _causal(res, "continuation", "threshold")
    thr = float(thr) if is_number(thr) else 0.5
    handles = []
    for mode in modes:
        d = cc[cc["mode"].astype(str) == mode].sort_values("site")
        col = MODE_COLORS.get(mode, NEUTRAL)
        handles.append(_band_line(ax, d["site"].to_numpy(int), d, "recovered_cont", col,
                                  f"{mode}: the reply (mean log-prob of its tokens)"))
        if pc is not None and {"mode", "site", "recovered_kl"} <= set(pc.columns):
            p = _num_cols(pc[pc["mode"].astype(str) == mode], ["site", "recovered_kl"]).sort_values("site")
            handles.append(ax.plot(p["site"], p["recovered_kl"], color=col, linestyle=":", linewidth=1.2,
                                   label=f"{mode}: first token only (patching, KL)")[0])
        onset = _causal(res, "continuation", "modes", mode, "onset") or {}
        site = onset.get("site") if isinstance(onset, dict) else None
        h = _mark_site(ax, site, onset.get("ci") if isinstance(onset, dict) else None, col,
                       f"{mode}: reply onset at site {int(site)} ({_ci_text(onset.get('ci'))})"
                       if is_number(site) else "")
        if h is not None:
            handles.append(h)
        elif isinstance(_causal(res, "continuation", "modes", mode), dict):
            _note(fig, f"Mode `{mode}` never recovers half of the reply's log-probability before the final residual: "
                       "its continuation onset is undefined.")
    ax.axhline(0, color=NEUTRAL, linewidth=0.8)
    ax.axhline(1, color=MUTED, linewidth=0.8, linestyle=":")
    ax.axhline(thr, color=MUTED, linewidth=1.0, linestyle="-.")
    _site_axis(ax, cc["site"])
    ax.set_ylabel("recovered: Σ(lp_patched − lp_b) / Σ(lp_v − lp_b)")
    n_tok = _causal(res, "continuation", "max_tokens")
    ax.set_title("the variant's reply recovered" + (f" (first {int(n_tok)} tokens, teacher-forced)"
                                                    if is_number(n_tok) else ""))
    handles.append(Patch(color=NEUTRAL, alpha=0.2, label=f"95% CI, {_causal_unit(res, 'continuation')}"))
    fig.legend(handles=handles, loc="outside upper center", ncols=2, fontsize=8)
    _scope(fig, f"{_causal_n(res, 'continuation')}; bands and onset CI: 95%, {_causal_unit(res, 'continuation')}")
    return fig


def fig_causal_knockout(res: Results) -> Figure:
    kc = res.table("causal_knockout_curve", ["start"], finite=["effect_left"])
    kc = _num_cols(kc, [c for c in kc.columns if c != "start"]).sort_values("start")
    fig = _fig(11.8, 4.2)
    ax1, ax2 = fig.subplots(1, 2, sharex=True)
    col = region_color("system")
    x = kc["start"].to_numpy(int)
    _band_line(ax1, x, kc, "effect_left", col, "effect left (95% CI)")
    thr = _causal(res, "knockout", "threshold")
    thr = float(thr) if is_number(thr) else 0.1
    ax1.axhline(thr, color=MUTED, linestyle="-.", linewidth=1.0, label=f"threshold ({_f(thr)})")
    ax1.axhline(0, color=NEUTRAL, linewidth=0.8)
    stop = _causal(res, "knockout", "stops_mattering") or {}
    site = stop.get("site") if isinstance(stop, dict) else None
    h = _mark_site(ax1, site, stop.get("ci") if isinstance(stop, dict) else None, HIGHLIGHT,
                   f"stops mattering from layer {int(site)} ({_ci_text(stop.get('ci'))})" if is_number(site) else "")
    hs, _ = ax1.get_legend_handles_labels()
    ax1.legend(handles=hs + ([h] if h is not None else []), loc="upper right", fontsize=8.5)
    ax1.set_ylabel("effect left: ΣKL(v ‖ ko from start) / ΣKL(v ‖ ko from 0)")
    ax1.set_title("how much of the full knockout's effect is left")
    if "kl_mean" in kc.columns and (kc["kl_mean"] > 0).any():
        ax2.plot(x, kc["kl_mean"].where(kc["kl_mean"] > 0), color=col, marker="o", markersize=3.5,
                 label="mean KL(variant ‖ knocked-out)")
        ax2.set_yscale("log")
        ax2.set_ylabel("mean KL (nats, log scale)")
        ax2.set_title("distance of the knocked-out run from the variant")
        if res.has("causal_knockout") and {"pair", "kl_vb"} <= set(res.table("causal_knockout").columns):
            kb = res.table("causal_knockout").drop_duplicates("pair")
            vb = float(pd.to_numeric(kb["kl_vb"], errors="coerce").mean())
            if np.isfinite(vb) and vb > 0:
                ax2.axhline(vb, color=NEUTRAL, linestyle="--", linewidth=1.2,
                            label="mean KL(variant ‖ baseline)")
        ax2.legend(loc="lower left", fontsize=8.5)
    else:
        _band_line(ax2, x, kc, "recovered_kl", col, "recovered (95% CI)")
        ax2.set_ylabel("recovered: 1 − ΣKL(v ‖ ko) / ΣKL(v ‖ b)")
        ax2.set_title("output change recovered")
    for ax in (ax1, ax2):
        _site_axis(ax, kc["start"], what="start")
    if not isinstance(stop, dict) or not stop:
        _note(fig, "summary.json has no `causal.knockout.stops_mattering`: the layer is not marked.")
    elif not is_number(site):
        _note(fig, "The effect left never stays below the threshold: `stops_mattering` is undefined.")
    _scope(fig, f"{_causal_n(res, 'knockout')}; bands and layer CI: 95%, {_causal_unit(res, 'knockout')}")
    return fig


def _phrase_selection(rank: pd.DataFrame, max_systems: int = 6, max_bars: int = 36) -> tuple[list[str], int]:
    """The systems with the most phrases (ties: the largest single-phrase effect), at most
    `max_systems` of them and about `max_bars` phrases in all; and how many were split."""
    multi = rank[rank["n_phrases"] > 1]
    g = multi.groupby("system", sort=False).agg(n=("phrase", "size"), top=("kl_removed", "max"))
    g = g.sort_values(["n", "top"], ascending=[False, False])
    chosen, bars = [], 0
    for s, r in g.iterrows():
        if len(chosen) >= max_systems or (chosen and bars + int(r["n"]) > max_bars):
            break
        chosen.append(str(s))
        bars += int(r["n"])
    return chosen, len(g)


def fig_causal_phrases(res: Results) -> Figure:
    rank = res.table("causal_phrase_rank", ["system", "phrase", "text", "n_phrases"], finite=["kl_removed"])
    rank = _num_cols(rank, [c for c in rank.columns if c.startswith(("kl_removed", "importance"))])
    rank["system"] = rank["system"].astype(str)
    chosen, n_split = _phrase_selection(rank)
    if not chosen:
        raise NotAvailable("no system prompt in `causal_phrase_rank.parquet` has more than one phrase: there is "
                           "nothing to rank within a prompt")
    whole = None
    if res.has("causal_phrases") and {"system", "kl_vb"} <= set(res.table("causal_phrases").columns):
        ph = res.table("causal_phrases")
        keys = [c for c in ("system", "user_id") if c in ph.columns]
        whole = pd.to_numeric(ph.drop_duplicates(keys)["kl_vb"], errors="coerce").groupby(
            ph.drop_duplicates(keys)["system"].astype(str)).mean()
    tokens = None
    if res.has("causal_tokens") and {"system", "token", "attribution"} <= set(res.table("causal_tokens").columns):
        tokens = _num_cols(res.table("causal_tokens"), ["attribution", "ci_low", "ci_high"])
        tokens = tokens[np.isfinite(tokens["attribution"])]
        tokens = tokens if len(tokens) else None
    sel = rank[rank["system"].isin(chosen)]
    n_rows = len(sel) + len(chosen)
    has_imp = {"importance_output", "importance_internal"} <= set(rank.columns)
    height = max(4.2, 1.3 + 0.24 * n_rows) + (3.0 if tokens is not None else 0.0)
    fig = _fig(11.8, height)
    if tokens is not None:
        gs = fig.add_gridspec(2, 2, width_ratios=[1.7, 1], height_ratios=[max(3.0, 0.24 * n_rows), 2.8])
    else:
        gs = fig.add_gridspec(1, 2, width_ratios=[1.7, 1])
    ax = fig.add_subplot(gs[0, 0])
    colors = {s: SYSTEM_PALETTE[i % len(SYSTEM_PALETTE)] for i, s in enumerate(chosen)}
    y, yt, yl, bold = 0, [], [], []
    for s in chosen:
        d = sel[sel["system"] == s].sort_values("phrase")
        yt.append(y)
        yl.append(f"{short(s, 30)}  ({int(d['n_phrases'].iloc[0])} phrases)")
        bold.append(True)
        top = d["kl_removed"].max()
        ys = np.arange(y + 1, y + 1 + len(d))
        err = None
        if {"kl_removed_ci_low", "kl_removed_ci_high"} <= set(d.columns):
            err = np.vstack([(d["kl_removed"] - d["kl_removed_ci_low"]).clip(lower=0).fillna(0),
                             (d["kl_removed_ci_high"] - d["kl_removed"]).clip(lower=0).fillna(0)])
        ax.barh(ys, d["kl_removed"], color=colors[s], alpha=0.85, height=0.72, xerr=err,
                error_kw=dict(ecolor=NEUTRAL, capsize=2, linewidth=0.9))
        for yy, v in zip(ys, d["kl_removed"]):
            if v == top:
                ax.plot([v], [yy], marker="*", color=HIGHLIGHT, markersize=9, markeredgecolor="white", zorder=5,
                        linestyle="")
        if whole is not None and s in whole.index and np.isfinite(whole[s]):
            ax.plot([whole[s]] * 2, [y + 0.6, y + len(d) + 0.4], color=NEUTRAL, linestyle=":", linewidth=1.4)
        for yy, t in zip(ys, d["text"].astype(str)):
            yt.append(yy)
            yl.append(short(" ".join(t.split()), 44))
            bold.append(False)
        y += len(d) + 1
    ax.set_yticks(yt, yl)
    for lab, b in zip(ax.get_yticklabels(), bold):
        if b:
            lab.set_fontweight("bold")
            lab.set_color(colors.get(next((s for s in chosen if lab.get_text().startswith(short(s, 30))), ""),
                                     NEUTRAL))
        else:
            lab.set_fontsize(8)
    ax.set_ylim(y - 0.5, -0.7)
    ax.set_xlim(left=0)
    ax.set_xlabel("KL(variant ‖ variant without the phrase), mean over user prompts")
    ax.set_title("remove one phrase: how far the output moves", fontsize=10)
    ax.grid(axis="y", visible=False)
    leg = [Patch(color=NEUTRAL, alpha=0.85, label="phrase removed (95% CI)"),
           Line2D([], [], marker="*", color=HIGHLIGHT, linestyle="", markersize=9, label="largest in its prompt")]
    if whole is not None:
        leg.append(Line2D([], [], color=NEUTRAL, linestyle=":",
                          label="whole prompt removed\n(KL(variant ‖ baseline))"))
    right = gs[0, 1].subgridspec(2, 1, height_ratios=[1.0, max(0.35, 0.024 * n_rows)])
    ax2 = fig.add_subplot(right[0])
    axl = fig.add_subplot(right[1])
    axl.set_axis_off()
    axl.legend(handles=leg, loc="upper left", fontsize=8, title="left panel", title_fontsize=8)
    if has_imp:
        multi = rank[rank["n_phrases"] > 1]
        other = multi[~multi["system"].isin(chosen)]
        if len(other):
            ax2.scatter(other["importance_internal"], other["importance_output"], s=18, color=MUTED,
                        edgecolor="none", alpha=0.7, label="other split prompts")
        for s in chosen:
            d = multi[multi["system"] == s]
            ax2.scatter(d["importance_internal"], d["importance_output"], s=26, color=colors[s], edgecolor="white",
                        label=short(s, 18))
        lim = np.nanpercentile(np.r_[multi["importance_internal"], multi["importance_output"]], [0, 100])
        if np.all(np.isfinite(lim)):
            lo, hi = min(lim[0], 0.0), max(lim[1], 1.0)
            ax2.plot([lo, hi], [lo, hi], color=NEUTRAL, linewidth=0.9, linestyle="--")
        ax2.axhline(0, color=MUTED, linewidth=0.6)
        ax2.axvline(0, color=MUTED, linewidth=0.6)
        ax2.set_xlabel("internal importance (last-token residual)")
        ax2.set_ylabel("output importance (next-token KL)")
        ax2.set_title("change lost without the phrase", fontsize=10)
        ax2.legend(loc="upper left", fontsize=7.5)
    else:
        ax2.set_axis_off()
    if tokens is not None:
        top_sys = [s for s in chosen if s in set(tokens["system"].astype(str))][:3]
        sub = gs[1, :].subgridspec(1, max(len(top_sys), 1))
        for k, s in enumerate(top_sys):
            axk = fig.add_subplot(sub[0, k])
            t = tokens[tokens["system"].astype(str) == s]
            t = t.loc[t["attribution"].abs().sort_values(ascending=False).index[:8]].iloc[::-1]
            yy = np.arange(len(t))
            err = None
            if {"ci_low", "ci_high"} <= set(t.columns):
                err = np.vstack([(t["attribution"] - t["ci_low"]).clip(lower=0).fillna(0),
                                 (t["ci_high"] - t["attribution"]).clip(lower=0).fillna(0)])
            axk.barh(yy, t["attribution"], color=np.where(t["attribution"] >= 0, colors[s], MUTED), height=0.7,
                     xerr=err, error_kw=dict(ecolor=NEUTRAL, capsize=2, linewidth=0.8))
            labels = [f"{short(repr(str(tok).strip() or str(tok))[1:-1], 14)}" +
                      (f"  ·p{int(p)}" if "phrase" in t.columns and is_number(p) and p >= 0 else "")
                      for tok, p in zip(t["token"], t["phrase"] if "phrase" in t.columns else [None] * len(t))]
            axk.set_yticks(yy, labels, fontsize=8)
            axk.axvline(0, color=NEUTRAL, linewidth=0.8)
            axk.set_title(f"{short(s, 26)}: top tokens", fontsize=9.5, color=colors[s])
            axk.set_xlabel("attribution (gradient × input)", fontsize=8.5)
            axk.grid(axis="y", visible=False)
            axk.xaxis.set_major_locator(MaxNLocator(nbins=4))
    if n_split > len(chosen):
        _note(fig, f"{len(chosen)} of the {n_split} system prompts split into more than one phrase are shown (those "
                   "with the most phrases); every phrase is in `causal_phrase_rank`.")
    n_users = int(res.table("causal_phrases")["user_id"].nunique()) if res.has("causal_phrases") and \
        "user_id" in res.table("causal_phrases").columns else None
    _scope(fig, f"n = {n_split} system prompts split into phrases"
                + (f" × {n_users} user prompts" if n_users is not None else "")
                + "; CIs: 95%, bootstrap over user prompts (each phrase within its own system prompt)")
    return fig


def fig_causal_steering(res: Results) -> Figure:
    sc = res.table("causal_steering_curve", ["site"], finite=["recovered_kl"])
    sc = _num_cols(sc, [c for c in sc.columns if c.startswith("recovered")]).sort_values("site")
    norms = None
    if res.has("causal_steering_norms"):
        norms = res.table("causal_steering_norms", ["system", "site"], finite=["norm"])
    fig = _fig(11.8 if norms is not None else 7.0, 4.3)
    axes = fig.subplots(1, 2 if norms is not None else 1, squeeze=False)[0]
    ax = axes[0]
    col = "#009E73"
    x = sc["site"].to_numpy(int)
    _band_line(ax, x, sc, "recovered_kl", col, "recovered, KL (95% CI)")
    if "recovered_lp" in sc.columns and np.isfinite(sc["recovered_lp"]).any():
        ax.plot(x, sc["recovered_lp"], color=col, linestyle="--", linewidth=1.2, alpha=0.8,
                label="recovered, top-1 log-prob")
    ax.axhline(0, color=NEUTRAL, linewidth=0.8)
    ax.axhline(1, color=MUTED, linewidth=0.8, linestyle=":")
    best = _causal(res, "steering", "best")
    if isinstance(best, dict) and is_number(best.get("site")) and is_number(best.get("recovered")):
        ax.plot([best["site"]], [best["recovered"]], marker="*", color=HIGHLIGHT, markersize=14,
                markeredgecolor="white", zorder=5, linestyle="",
                label=f"best site before the final residual: {int(best['site'])}")
    ax.set_ylabel("recovered: 1 − ΣKL(v ‖ steered) / ΣKL(v ‖ b)")
    ax.set_title("baseline + steering vector at one site")
    _site_axis(ax, sc["site"])
    ax.legend(loc="upper left", fontsize=8.5)
    if norms is not None:
        axn = axes[1]
        systems = list(dict.fromkeys(norms["system"].astype(str)))
        for i, s in enumerate(systems):
            d = norms[norms["system"].astype(str) == s].sort_values("site")
            axn.plot(d["site"], d["norm"], color=SYSTEM_PALETTE[i % len(SYSTEM_PALETTE)] if len(systems) <= 8
                     else MUTED, linewidth=0.9, alpha=0.85, label=short(s, 20) if len(systems) <= 8 else None)
        m = norms.groupby("site")["norm"].mean()
        axn.plot(m.index, m.to_numpy(), color=NEUTRAL, linewidth=2.2, label="mean over system prompts")
        axn.set_ylabel("‖steering vector‖ (residual units)")
        axn.set_title("steering vector norm by site, one line per system prompt")
        _site_axis(axn, norms["site"])
        axn.legend(loc="upper left", fontsize=7.5, ncols=2 if len(systems) > 4 else 1)
    _scope(fig, f"{_causal_n(res, 'steering')}; bands: 95%, {_causal_unit(res, 'steering')}")
    return fig


def fig_multiturn(res: Results) -> Figure:
    import seaborn as sns

    mt = res.table("multiturn_turns", ["condition", "turn"], finite=["obey_rate"])
    mt = _num_cols(mt, [c for c in mt.columns if c not in ("condition",)])
    conds = [c for c in ("system", "system_plain", "no_system") if c in set(mt["condition"].astype(str))] + \
        sorted(set(mt["condition"].astype(str)) - set(CONDITION_COLORS))
    heat = None
    if res.has("multiturn_attention") and {"condition", "turn", "layer", "sys_mass"} <= \
            set(res.table("multiturn_attention").columns):
        ma = res.table("multiturn_attention")
        ma = ma[(ma["condition"].astype(str) == "system")]
        ma = _num_cols(ma, ["sys_mass"])
        if np.isfinite(ma["sys_mass"]).any():
            heat = ma.pivot_table(index="layer", columns="turn", values="sys_mass", aggfunc="mean") \
                .sort_index(ascending=False)
    fig = _fig(11.8, 4.4)
    axes = fig.subplots(1, 3 if heat is not None else 2, width_ratios=[1, 1, 0.8] if heat is not None else None)
    ax1, ax2 = axes[0], axes[1]
    no_tokens = []
    for cond in conds:
        d = mt[mt["condition"].astype(str) == cond].sort_values("turn")
        col = CONDITION_COLORS.get(cond, NEUTRAL)
        x = d["turn"].to_numpy(int)
        has_sys = "sys_mass" in d.columns and np.isfinite(d["sys_mass"]).any() and not (
            "uniform_share" in d.columns and (d["uniform_share"].fillna(0) == 0).all())
        if has_sys:
            _band_line(ax1, x, d, "sys_mass", col, None)
            if "uniform_share" in d.columns:
                ax1.plot(x, d["uniform_share"], color=col, linestyle=":", linewidth=1.4)
        else:
            no_tokens.append(cond)
        _band_line(ax2, x, d.assign(**{c: d[c] * 100 for c in ("obey_rate", "obey_rate_ci_low", "obey_rate_ci_high")
                                      if c in d.columns}), "obey_rate", col, None)
    ax1.set_ylabel("last token's attention share to system prompt")
    ax1.set_title("attention to the system prompt (sink excluded)", fontsize=10)
    ax1.set_ylim(bottom=0)
    ax2.set_ylabel("rule obeyed (% of conversations)")
    ax2.set_ylim(-3, 103)
    ax2.set_title("rule adherence", fontsize=10)
    for ax in (ax1, ax2):
        ax.set_xlabel("turn (user messages so far)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if heat is not None:
        ax3 = axes[2]
        sns.heatmap(heat, ax=ax3, cmap="viridis", vmin=0, cbar_kws={"label": "share to system prompt", "shrink": 0.8})
        ax3.set_title("condition `system`: layer × turn", fontsize=10)
        ax3.set_xlabel("turn")
        ax3.set_ylabel("layer")
        ax3.tick_params(axis="y", rotation=0)
        ax3.tick_params(axis="x", rotation=0)
        ax3.grid(False)
    handles = [Line2D([], [], color=CONDITION_COLORS.get(c, NEUTRAL), marker="o", markersize=3.5,
                      label=CONDITION_LABELS.get(c, c) + (" (no system tokens)" if c in no_tokens else ""))
               for c in conds]
    handles += [Line2D([], [], color=NEUTRAL, linestyle=":", label="uniform attention over visible keys"),
                Patch(color=NEUTRAL, alpha=0.2, label="95% bootstrap CI over conversations")]
    fig.legend(handles=handles, loc="outside upper center", ncols=2, fontsize=8)
    rule = _causal(res, "multiturn", "rule")
    if isinstance(rule, str) and rule:
        _note(fig, f"Rule: {rule}")
    n_conv, n_turns = _causal(res, "multiturn", "n_conversations"), _causal(res, "multiturn", "n_turns")
    _scope(fig, (f"n = {n_conv} conversations × {n_turns} turns per condition" if is_number(n_conv)
                 and is_number(n_turns) else "n unknown") + "; bands: 95% CI, bootstrap over conversations")
    return fig


# ---------------------------------------------------------------------------------------

FIGURES: tuple[FigureSpec, ...] = (
    FigureSpec(
        "fig-behaviour", "Does the model do what the system prompt asks, and stay right?",
        "Left: for each system prompt that declares checks of its instruction (in brackets: `max_words:15`, "
        "`language:fr`, `json`, ...), the share of its checks the replies pass with the system prompt (filled) and, "
        "for the same user prompts, without it (hollow: how often the model does it unasked). Right: the share of "
        "replies that give the user prompt's expected answer, with and without each system prompt. Replies are the "
        "stored greedy continuations; a reply cut at the token budget whose verdict more tokens could change is "
        "left out (note below). Sorted by the change; the bottom row pools the system prompts, and only its "
        "interval speaks for system prompts in general. A filled dot far right of its hollow one: the instruction "
        "is followed; far left on the right panel: it costs correct answers.",
        fig_behaviour),
    FigureSpec(
        "fig-behaviour-internal", "Does internal change predict behaviour change?",
        "Correlation across pairs between a component's relative change at the last prompt token (per layer) and "
        "the pair's change in behaviour: adherence to the declared checks, correctness, reply length (variant minus "
        "baseline), with its 95% CI band. A layer whose r is high predicts which pairs change their behaviour, not "
        "only their next token (compare with the internal-vs-output figure). ★ marks the layer and component "
        "summary.json names for each behaviour: chosen on one half of the user prompts, with the r and interval "
        "measured on the other half; the rest of each curve is computed on every pair.",
        fig_behaviour_internal),
    FigureSpec(
        "fig-component-layer", "Where the system prompt changes the model: change by layer and component",
        "Each panel is one component (colour) and one metric, at the last prompt token. The line is the mean over "
        "(user prompt, system prompt) pairs of the change between the run with the system prompt (v) and the "
        "baseline (b); the band is its 95% confidence interval. The dashed line is the control floor: the same "
        "metric between two unrelated user prompts, i.e. what an unrelated input does. Higher relative change and "
        "lower centred cosine mean more change; the star marks the most changed layer (for relative change, the "
        "layer summary.json names: chosen on one half of the user prompts; its held-out value is in the findings).",
        fig_component_layer),
    FigureSpec(
        "fig-component-system", "Which system prompts change which component",
        "Rows are system prompts (sorted by their effect on the last component), columns are components. Numbers "
        "are the mean relative change at the last prompt token, averaged over user prompts and over all layers "
        "(left) or at each component's most affected layer (right, layer under the name). Colour is scaled per "
        "column (value / column maximum), so compare colours down a column and numbers across columns.",
        fig_component_system),
    FigureSpec(
        "fig-system-layer", "Which system prompts change which layer",
        "Rows are system prompts (sorted by their mean relative change), columns layers; each cell is the mean "
        "over user prompts, at the last prompt token, of the relative change (left) and of the raw cosine "
        "similarity (right) between the residual stream with the system prompt (v) and the baseline (b). The last "
        "row, under the white line, is the control: two unrelated user prompts. Raw cosine is the notebook's "
        "measure and is shown so numbers compare with it; it stays near 1 for unrelated inputs (anisotropy), so "
        "read differences between rows and against the control row, not its distance from 1.",
        fig_system_layer),
    FigureSpec(
        "fig-length-impact", "Does a longer system prompt change more?",
        "One point per system prompt: its length in tokens against its impact (mean relative change of resid_post "
        "at the last token, averaged over layers; left) and its next-token KL (right). Points of one length family "
        "(the same instruction written short, medium and long) are joined by a line, so a rising line means length "
        "matters with the content held fixed; the legend in each panel gives the within-family correlation when the "
        "metrics stage computed it. The black line is a least-squares fit over all system prompts with a "
        "bootstrap band; the title gives the correlation and its 95% CI from the metrics stage.",
        fig_length_impact),
    FigureSpec(
        "fig-length-output-attention", "Does a longer system prompt change the output more, and get more attention?",
        "One point per system prompt against its length in tokens. Left: the top-1 change rate, the share of user "
        "prompts whose most likely next token differs from the baseline's. Right: the attention mass from the last "
        "prompt token to the system prompt's tokens (mean over layers, heads and user prompts), with hollow circles "
        "at the share of the visible keys those tokens hold, i.e. what uniform attention would give: a longer "
        "prompt gets more attention by being longer, so compare each point with its circle. Titles give the "
        "correlation with its 95% bootstrap CI from the metrics stage.",
        fig_length_output_attention),
    FigureSpec(
        "fig-tag-impact", "Which kinds of system prompt matter (tags and keyword features)",
        "For each declared tag (tag) and each keyword feature found in the texts (keyword: persona, format, "
        "thinking, constraint, brevity; docs/RESULTS.md lists the patterns): mean over pairs whose system prompt "
        "has it minus mean over those without, with its bootstrap interval: the simultaneous 95% interval over the "
        "tags (or keywords) tested, Bonferroni-corrected, when the metrics stage gives it, which is what the "
        "findings use. Sorted by the left panel. Red: the interval excludes zero; grey: it does not. The numbers "
        "beside a name count the system prompts with and without it (pairs, for results of earlier versions).",
        fig_tag_impact),
    FigureSpec(
        "fig-attention-regions", "Where the last token looks: attention to each region by layer",
        "Attention mass from the last prompt token (the one that predicts the first answer token) to each key "
        "region, averaged over heads and prompts. Solid: with a system prompt; dashed: the baseline; dotted: what "
        "uniform attention would give. The sink is the first token, which soaks up attention in most layers; "
        "mass to `system` exists in the baseline only when the template injects a default system prompt. The last "
        "panel (grey) is the notebook's \"recent tokens\": the mass on the last k keys whatever their region "
        "(k = `metrics --recent-k`, default 5; with a chat template these are mostly the assistant header), with "
        "mean ± 1.96 SE across user prompts.",
        fig_attention_regions),
    FigureSpec(
        "fig-attention-system", "How much each system prompt is attended to, layer by layer",
        "Each row is a system prompt, each column a layer; colour is the share of the last token's attention "
        "(without the sink) that goes to the system prompt's tokens, averaged over heads and user prompts. Rows "
        "under the white line are baselines whose template injects a default system prompt.",
        fig_attention_system_heatmap),
    FigureSpec(
        "fig-attention-entropy", "How focused attention is under each system prompt",
        "Entropy of the attention distribution (nats; lower = more focused on few tokens), averaged over layers "
        "and heads, per system prompt; error bars are ± 1.96 standard errors across user prompts. The dashed line "
        "and grey band are the baseline.",
        fig_attention_entropy),
    FigureSpec(
        "fig-placement", "The same instruction in two places: system prompt or start of the user turn",
        "For each instruction the sweep holds both as a system prompt and as a prefix of the user turn (matched by "
        "name or `same_as`), both compared with the same baseline. Left: mean relative change of the residual stream "
        "at the last prompt token by layer, solid as a system prompt, dashed as a prefix, with 95% bootstrap CIs "
        "over user prompts: where in depth each placement moves the model. Right: prefix minus system, paired by "
        "user prompt, for the next-token KL and the top-1 change rate (how much each placement changes the output) "
        "and for the change-weighted mean layer of the residual change (where in depth it sits), with 95% CIs; red "
        "where the CI excludes zero. When the store holds the causal analyses, the second row compares the "
        "activation-patching onsets (first site recovering half of the output change) and the knockout's "
        "stops-mattering layer (from which blocking attention to the instruction's tokens no longer matters) of the "
        "two placements.",
        fig_placement),
    FigureSpec(
        "fig-lens", "When the output shift appears: logit lens by layer",
        "Each layer's residual stream at the last token, read through the final norm and unembedding (logit lens). "
        "Left: mean KL between the variant's and the baseline's lens distributions (a top-k approximation that is "
        "coarse where the lens distribution is flat, in early layers: read it there as an ordering, not as nats); "
        "right: share of pairs whose lens top-1 token is the same. Bands are ± 1.96 standard errors across user prompts. The red dashed line "
        "is the layer where the output shift appears (summary `lens_shift_layer`).",
        fig_lens),
    FigureSpec(
        "fig-internal-output", "Does internal change predict output change?",
        "Top: correlation across pairs between a component's relative change at the last token and the "
        "next-token KL, per layer. Bottom: one point per pair at each component's layer of largest |r|, with a "
        "least-squares line; r is computed from the points shown. ★ marks the layer and component summary.json "
        "names: chosen on one half of the user prompts, with its r and interval measured on the other half; the "
        "other panels pick their layer on the same pairs they show, so their r is optimistic.",
        fig_internal_output),
    FigureSpec(
        "fig-position", "Which tokens change: change along the aligned user tokens",
        "The user prompt and everything after it are the same tokens in both runs, so their change is caused by "
        "the system prompt alone. Left: mean relative change per aligned token, counted back from the last prompt "
        "token, at each component's most affected layer, with 95% CI; shaded spans show the token region. Right: "
        "the same for one residual component at every layer.",
        fig_position),
    FigureSpec(
        "fig-causal-patching", "Where the system prompt's effect is carried: activation patching",
        "The baseline run (no system prompt) is re-run with its residual stream replaced by the variant's at one site; "
        "site l < L is the input of layer l and site L the final residual. The curve is the share of the output change "
        "this recovers, 1 − ΣKL(variant ‖ patched) / ΣKL(variant ‖ baseline) over pairs (0: nothing, 1: the variant's "
        "next-token distribution), with a 95% bootstrap CI (its resampling unit heads this caption); the right panel "
        "is the same for the "
        "log-probability of the variant's top-1 token. One line per mode: `suffix` patches every aligned position after"
        " the system prompt, `last` only the last prompt token. The dashed line and shaded span mark the onset (first "
        "site reaching the threshold, dash-dotted) and its bootstrap CI. A `suffix` curve high early means the effect "
        "has already been written into the user tokens; a `last` curve that rises only late means the last token picks "
        "it up late.",
        fig_causal_patching),
    FigureSpec(
        "fig-causal-continuation", "Which site carries the reply, not only the first token: patching scored on the "
        "continuation",
        "The same patches as the activation-patching figure (the baseline re-run with the variant's residual stream "
        "at one site, at every aligned suffix position or the last prompt position), each run continued with the "
        "variant's own greedy reply and scored by the mean log-probability it gives that reply's tokens. The curve "
        "is the share recovered, Σ(patched − baseline) / Σ(variant − baseline) over pairs (0: as unlikely as "
        "without the system prompt; 1: as likely as with it), with its 95% CI; dotted, the first-token curve of "
        "the patching figure. The dashed line and span mark the onset (first site recovering half) and its CI. A "
        "reply onset later than the first-token onset means the reply keeps needing the instruction after its "
        "first token.",
        fig_causal_continuation),
    FigureSpec(
        "fig-causal-knockout", "Until which layer the model reads the system prompt: attention knockout",
        "The variant is re-run with attention from later tokens to the system-prompt tokens blocked in every layer "
        "≥ start (start = L: no knockout). Left: effect left, the KL between the variant and the knocked-out run "
        "relative to knocking out from layer 0, with a 95% bootstrap CI; the red dashed line and "
        "span mark the layer from which it stays below the threshold (the system prompt stops mattering through "
        "attention) and its CI. Right: the mean KL(variant ‖ knocked-out) on a log scale, against the mean "
        "KL(variant ‖ baseline) (dashed): a full knockout that lands near the dashed line removes the system "
        "prompt's whole effect.",
        fig_causal_knockout),
    FigureSpec(
        "fig-causal-phrases", "Which phrase of a system prompt matters: phrase ablation and token attribution",
        "For system prompts made of more than one phrase (at most six shown, those with the most phrases): each "
        "bar is KL(variant ‖ variant with that phrase removed), mean over user prompts, with a 95% bootstrap CI; "
        "the star marks the largest in its prompt, the dotted line the KL when the whole prompt is removed "
        "(the baseline). Right: per phrase, the share of the output change (next-token KL) and of the internal "
        "change (last-token residual) lost without it; points on the dashed diagonal lose as much inside as on "
        "the output. Bottom: for up to three of these prompts, the tokens with the largest |attribution| "
        "(gradient × input of KL(variant ‖ baseline) at the token's embedding; ·pN = phrase N), with CIs.",
        fig_causal_phrases),
    FigureSpec(
        "fig-causal-steering", "Can the system prompt be replaced by one vector? Steering",
        "For each system prompt and site the steering vector is the mean last-token residual difference "
        "(variant − baseline) over the other user prompts (leave one out); it is added to the baseline's last "
        "token at one site (site l < L: input of layer l; site L: final residual). Left: the share of the output "
        "change recovered, 1 − ΣKL(variant ‖ steered) / ΣKL(variant ‖ baseline), with a 95% bootstrap CI "
        "(dashed: the same for the top-1 log-probability); the star marks the best site before the "
        "final residual, where steering edits the output directly. Right: the vector's norm by site, one thin "
        "line per system prompt, and their mean.",
        fig_causal_steering),
    FigureSpec(
        "fig-multiturn", "Does the system prompt fade over a conversation? Multi-turn decay",
        "Scripted conversations under a rule, turn by turn. Left: share of the last prompt token's attention that "
        "goes to the system prompt (sink excluded and renormalised, mean over layers and heads), with its 95% "
        "bootstrap CI over conversations; dotted lines are what uniform attention over the visible keys would give, "
        "so a solid line that falls with its dotted line only dilutes with length. Middle: share of conversations "
        "whose reply obeys the rule, with 95% CI. Conditions: `system` (rule as system prompt, history obeys it), "
        "`system_plain` (rule as system prompt, history without the rule's marker), `no_system` (empty system turn, "
        "history obeys it: imitation alone). Right: attention to the system prompt per layer and turn, condition "
        "`system`, mean over conversations.",
        fig_multiturn),
)
