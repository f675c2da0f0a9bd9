"""The report's behaviour figures: does the model do what each system prompt asks and stay
right (``behaviour_systems``), and which internal change predicts the change in behaviour
(``internal_vs_behaviour``, with the layer summary.json chooses on held-out user prompts).
Registered in :data:`promptshift.report.figures.FIGURES` with the other figures.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from promptshift.jsonsafe import is_number
from promptshift.report.figkit import (
    _ci_pair, _components, _crossed, _f, _fig, _layer_ticks, _n, _note, _num_cols, _scope,
)
from promptshift.report.style import MUTED, NEUTRAL, component_color, short
from promptshift.results import NotAvailable, Results

ALL_SYSTEMS = "__all__"  # behaviour_systems rows pooled over the system prompts
BEHAVIOUR_OUTPUTS = (("adherence_change", "adherence change (checks passed)"),
                     ("correct_change", "correctness change (expected answers)"),
                     ("words_change", "reply length change (words)"))
VARIANT_COLOR, BASELINE_COLOR = "#0072B2", "#7a7a7a"


def _behaviour_rows(sy: pd.DataFrame, measure: str) -> pd.DataFrame:
    d = sy[sy["measure"].astype(str) == measure]
    return _num_cols(d, ["mean", "ci_low", "ci_high", "n_pairs", "n_undecided"]).set_index("system")


def _paired_dots(ax, sy: pd.DataFrame, what: str, systems: list[str], label_of) -> None:
    """Variant (filled) and baseline (hollow) means with their intervals, one row per system
    prompt, the pooled row last (below a line)."""
    v, b = _behaviour_rows(sy, f"{what}_variant"), _behaviour_rows(sy, f"{what}_baseline")
    rows = systems + ([ALL_SYSTEMS] if ALL_SYSTEMS in v.index else [])
    y = np.arange(len(rows))[::-1]
    for yy, name in zip(y, rows):
        for t, col, face, dy in ((b, BASELINE_COLOR, "white", -0.14), (v, VARIANT_COLOR, VARIANT_COLOR, 0.14)):
            if name not in t.index or not np.isfinite(t.loc[name, "mean"]):
                continue
            r = t.loc[name]
            if np.isfinite(r["ci_low"]) and np.isfinite(r["ci_high"]):
                ax.plot([r["ci_low"], r["ci_high"]], [yy + dy] * 2, color=col, linewidth=1.6)
            ax.plot(r["mean"], yy + dy, "o", color=col, markerfacecolor=face, markersize=5.5)
    ax.set_yticks(y)
    ax.set_yticklabels([label_of(n) for n in rows], fontsize=8)
    if ALL_SYSTEMS in rows:
        ax.axhline(y[-1] + 0.5, color=NEUTRAL, linewidth=0.8)
    ax.set_xlim(-0.04, 1.04)
    ax.xaxis.set_major_formatter(lambda x, _: f"{100 * x:.0f}%")
    ax.grid(axis="y", visible=False)


def fig_behaviour(res: Results) -> Figure:
    sy = res.table("behaviour_systems", ["system", "measure", "mean", "ci_low", "ci_high", "n_pairs"])
    sy = sy.assign(system=sy["system"].astype(str))
    checks = sy.drop_duplicates("system").set_index("system")["checks"].fillna("") if "checks" in sy.columns \
        else pd.Series(dtype=str)
    adh = _behaviour_rows(sy, "adherence_change")
    with_checks = [s for s in adh.index if s != ALL_SYSTEMS and str(checks.get(s, ""))
                   and np.isfinite(_behaviour_rows(sy, "adherence_variant").get("mean", pd.Series()).get(s, np.nan))]
    with_checks.sort(key=lambda s: -adh.loc[s, "mean"] if np.isfinite(adh.loc[s, "mean"]) else 0.0)
    cor = _behaviour_rows(sy, "correct_change")
    with_answers = [s for s in cor.index if s != ALL_SYSTEMS and np.isfinite(cor.loc[s, "mean"])]
    with_answers.sort(key=lambda s: cor.loc[s, "mean"])
    if not with_checks and not with_answers:
        raise NotAvailable("no system prompt declares checks and no user prompt has an expected answer "
                           "(`checks:` on system prompts, `expected:` on user prompts)")
    n_rows = max(len(with_checks), len(with_answers)) + 1
    fig = _fig(12.4, max(3.8, 1.5 + 0.3 * n_rows))
    axes = fig.subplots(1, 2, squeeze=True)
    all_label = {"adherence": "all system prompts with checks", "correct": "all system prompts"}
    for ax, what, systems, title in ((axes[0], "adherence", with_checks, "declared checks passed"),
                                     (axes[1], "correct", with_answers, "expected answer given")):
        if not systems:
            ax.set_axis_off()
            ax.text(0.5, 0.5, "nothing to judge: no declared checks" if what == "adherence" else
                    "nothing to judge: no expected answers", ha="center", va="center", transform=ax.transAxes)
            continue
        def label(name, what=what):
            if name == ALL_SYSTEMS:
                return all_label[what]
            c = str(checks.get(name, "")) if what == "adherence" else ""
            return f"{short(name, 26)}  [{short(c, 22)}]" if c else short(name, 30)
        _paired_dots(ax, sy, what, systems, label)
        ax.set_title(title)
        ax.set_xlabel("share of replies")
    fig.legend(handles=[Line2D([], [], marker="o", color=VARIANT_COLOR, label="with the system prompt"),
                        Line2D([], [], marker="o", color=BASELINE_COLOR, markerfacecolor="white",
                               label="baseline (same user prompts, same checks)")],
               loc="outside upper center", ncols=2, fontsize=8.5)
    und = _behaviour_rows(sy, "adherence_variant")
    if "n_undecided" in und.columns:
        k = int(np.nansum([und.loc[s, "n_undecided"] for s in with_checks]))
        if k:
            _note(fig, f"{k} variant replies were cut at the token budget before their checks could be decided and "
                       "are left out; raise `behaviour.max_new_tokens` in the sweep to judge them.")
    _scope(fig, f"{_n(res)}; bars: 95% CI, bootstrap over user prompts (each system prompt); bottom row: "
                f"{_crossed(res)}")
    return fig


def fig_behaviour_internal(res: Results) -> Figure:
    iv = res.table("internal_vs_behaviour", ["component", "layer", "measure", "output", "method", "r"])
    iv = iv[(iv["measure"].astype(str) == "rel_change") & (iv["method"].astype(str) == "pearson")]
    iv = _num_cols(iv, ["layer", "r", "ci_low", "ci_high", "n"])
    outs = [(o, lab) for o, lab in BEHAVIOUR_OUTPUTS if np.isfinite(iv.loc[iv["output"] == o, "r"]).any()]
    if not outs:
        raise NotAvailable("`internal_vs_behaviour` has no defined correlation (no declared checks, expected answers "
                           "or length changes with spread)")
    strongest = res.summary.get("behaviour", {}).get("strongest_internal", {}) \
        if isinstance(res.summary.get("behaviour"), dict) else {}
    fig = _fig(4.6 * len(outs) + 0.6, 4.8)
    axes = fig.subplots(1, len(outs), squeeze=False, sharey=True)[0]
    comps = _components(iv["component"])
    for ax, (o, lab) in zip(axes, outs):
        d = iv[iv["output"] == o]
        for comp in comps:
            g = d[d["component"].astype(str) == comp].sort_values("layer")
            col = component_color(comp)
            if {"ci_low", "ci_high"} <= set(g.columns):
                ax.fill_between(g["layer"], g["ci_low"], g["ci_high"], color=col, alpha=0.12, linewidth=0)
            ax.plot(g["layer"], g["r"], color=col, marker="o", markersize=2.5, label=comp)
        ax.axhline(0, color=NEUTRAL, linewidth=0.8)
        st = strongest.get(o) if isinstance(strongest, dict) else None
        title = lab
        if isinstance(st, dict) and is_number(st.get("layer")) and is_number(st.get("r")):
            col = component_color(str(st.get("component")))
            ax.plot([st["layer"]], [st["r"]], marker="*", markersize=13, color=col, markeredgecolor="black",
                    linestyle="none")
            title += f"\n★ {st.get('component')} L{int(st['layer'])}: held-out r = {_f(st['r'])}\n" \
                     f"({_ci_text_r(st.get('ci'))})"
        ax.set_title(title, fontsize=9.5)
        ax.set_xlabel("layer")
        _layer_ticks(ax, d["layer"])
        n = int(d["n"].max()) if "n" in d.columns and np.isfinite(d["n"]).any() else None
        if n is not None:
            ax.text(0.02, 0.02, f"{n} pairs", transform=ax.transAxes, fontsize=8, color=MUTED)
    axes[0].set_ylabel("Pearson r: rel_change at the last token vs behaviour change")
    axes[0].legend(loc="best", fontsize=8)
    _scope(fig, f"{_n(res)} (pairs where the behaviour is defined); bands: 95% CI, {_crossed(res)}; ★ chosen on one "
                "half of the user prompts, its r and CI measured on the other half")
    return fig


def _ci_text_r(ci) -> str:
    c = _ci_pair(ci)
    return "CI undefined" if c is None else f"95% CI {_f(c[0])} to {_f(c[1])}"
