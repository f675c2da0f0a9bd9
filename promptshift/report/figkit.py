"""Helpers shared by the report's figure modules (:mod:`promptshift.report.figures`,
:mod:`promptshift.report.figures_behaviour`): figure size, notes and the scope line (n and
the resampling unit, `_scope`), the sweep's design read from summary.json, number
formatting, and the axes of layer and site plots. Private to the report package.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from promptshift.jsonsafe import is_number
from promptshift.report.tables import Results, not_control
from promptshift.vocabulary import COMPONENTS

Z95 = 1.959963984540054



def _components(values) -> list[str]:
    present = [str(v) for v in pd.unique(pd.Series(values).astype(str))]
    return [c for c in COMPONENTS if c in present] + sorted(c for c in present if c not in COMPONENTS)


def _mean_se(df: pd.DataFrame, by: list[str], value: str, unit: str = "user_id") -> pd.DataFrame:
    """Mean of `value` per `by` with a normal-approximation 95% CI across `unit`s.

    Rows are first averaged within each unit (a user prompt), so a user prompt with many
    rows (many system prompts, many tokens) counts once, as in the metrics bootstrap.
    """
    d = df[by + ([unit] if unit in df.columns else []) + [value]].copy()
    d[value] = pd.to_numeric(d[value], errors="coerce").astype(float)
    if unit in d.columns:
        d = d.groupby(by + [unit], observed=True, sort=False)[value].mean().reset_index()
    g = d.groupby(by, observed=True, sort=True)[value]
    out = g.agg(["mean", "std", "count"]).reset_index()
    se = out["std"].fillna(0.0) / np.sqrt(out["count"].clip(lower=1))
    out["ci_low"], out["ci_high"] = out["mean"] - Z95 * se, out["mean"] + Z95 * se
    return out


MAX_WIDTH_IN = 11.8  # the report's figure column is ~1140 CSS px; wider figures would be shrunk


def _fig(w: float, h: float) -> Figure:
    return Figure(figsize=(min(w, MAX_WIDTH_IN), h), layout="constrained")


def _note(fig: Figure, text: str) -> None:
    """A sentence the report prints under the figure (e.g. that a fallback was used)."""
    fig.promptshift_notes = [*getattr(fig, "promptshift_notes", []), text]


def _scope(fig: Figure, text: str) -> None:
    """What the figure rests on: its n and the unit its intervals resample. The report
    prints it at the head of the caption, so no figure is read without its sample size."""
    fig.promptshift_scope = text


def _design(res: Results) -> tuple[int | None, int | None, int | None]:
    """(system prompts, user prompts, pairs) of the sweep: summary.json's `sample` block, or
    counted from the first per-pair table there is."""
    d = res.summary.get("sample")
    if isinstance(d, dict) and all(isinstance(d.get(k), int) and not isinstance(d.get(k), bool)
                                   for k in ("n_systems", "n_users", "n_pairs")):
        return d["n_systems"], d["n_users"], d["n_pairs"]
    for name in ("output_change", "component_change", "length_impact"):
        if res.has(name):
            t = not_control(res.table(name))
            S = int(t["system"].nunique()) if "system" in t.columns else None
            U = int(t["user_id"].nunique()) if "user_id" in t.columns else None
            P = int(t["pair"].nunique()) if "pair" in t.columns else None
            return S, U, P
    return None, None, None


def _n(res: Results, pairs: bool = True) -> str:
    """`n = 14 system prompts × 18 user prompts (252 pairs)` (the parts that are known)."""
    S, U, P = _design(res)
    parts = [f"{S} system prompts" if S is not None else None, f"{U} user prompts" if U is not None else None]
    text = " × ".join(p for p in parts if p) or "n unknown"
    if pairs and P is not None:
        text += f" ({P} pairs)"
    return "n = " + text if text != "n unknown" else text


def _crossed(res: Results) -> str:
    """The resampling unit of the metrics tables' intervals, from summary.json's `sample`
    (results written before the crossed bootstrap resampled user prompts only)."""
    d = res.summary.get("sample")
    if isinstance(d, dict) and d.get("resampling") == "crossed":
        return "crossed bootstrap over system prompts and user prompts"
    return "bootstrap over user prompts"


def _causal_unit(res: Results, name: str) -> str:
    """The resampling unit of one causal analysis's intervals (summary.json `causal.<name>`)."""
    d = _causal(res, name)
    if isinstance(d, dict) and d.get("resampling") == "crossed":
        return "crossed bootstrap over system prompts and user prompts"
    return "bootstrap over user prompts"


def _causal_n(res: Results, name: str) -> str:
    d = _causal(res, name)
    if not isinstance(d, dict):
        return "n unknown"
    parts = []
    if isinstance(d.get("n_systems"), int) and isinstance(d.get("n_users"), int):
        parts.append(f"{d['n_systems']} system prompts × {d['n_users']} user prompts")
    if isinstance(d.get("n_pairs"), int):
        parts.append(f"({d['n_pairs']} pairs)" if parts else f"{d['n_pairs']} pairs")
    return "n = " + " ".join(parts) if parts else "n unknown"


def _systems_order(values: pd.Series) -> list[str]:
    """System prompts sorted by `values` (descending), for heatmaps that read top-down."""
    return list(values.sort_values(ascending=False).index.astype(str))


def _heat_height(n_rows: int) -> float:
    return max(3.6, 1.6 + 0.27 * n_rows)


def _pearson(x, y) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.std(x[ok]) == 0 or np.std(y[ok]) == 0:
        return float("nan")
    return float(np.corrcoef(x[ok], y[ok])[0, 1])


def _f(x, digits: int = 2) -> str:
    x = float(x)
    if not np.isfinite(x):
        return "n/a"
    return f"{x:.{digits}f}" if abs(x) >= 10 ** -digits or x == 0 else f"{x:.1e}"


def _p(p, n_boot: int | None = None) -> str:
    """A p-value; a bootstrap p of 0 (no resample on the other side of zero) is shown as
    below the resolution of the resamples, 1 / n_boot, never as 0."""
    p = float(p)
    if not np.isfinite(p):
        return "n/a"
    if p == 0:
        return f"< {1 / n_boot:.2g}" if n_boot else "< 1/n_boot"
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


def _summary_layer(res: Results, comp: str) -> int | None:
    d = (res.summary.get("most_affected_layer") or {}).get(comp)
    if isinstance(d, dict) and isinstance(d.get("layer"), (int, float)) and not isinstance(d.get("layer"), bool):
        return int(d["layer"])
    return None


def _layer_ticks(ax, layers, nbins: int = 8) -> None:
    """Integer layer ticks, at most ~`nbins` of them, so 30+ layers stay legible in a narrow panel."""
    layers = np.asarray(sorted(set(int(v) for v in layers)))
    if len(layers) == 0:
        return
    ax.xaxis.set_major_locator(MaxNLocator(nbins=nbins, integer=True))
    ax.set_xlim(layers.min() - 0.5, layers.max() + 0.5)


# ---------------------------------------------------------------------------------------
# causal summaries, numbers, sites


def _causal(res: Results, *path: str):
    """summary.json's `causal.<path>`, or None when any level is missing or not an object."""
    d = res.summary.get("causal")
    for key in path:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def _ci_pair(c) -> tuple[float, float] | None:
    if isinstance(c, (list, tuple)) and len(c) == 2 and all(is_number(v) for v in c):
        return float(c[0]), float(c[1])
    return None


def _num_cols(df: pd.DataFrame, cols) -> pd.DataFrame:
    df = df.copy()
    for c in cols:
        if c in df.columns:
            df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    return df


def _band_line(ax, x, d: pd.DataFrame, value: str, color: str, label: str | None, linestyle: str = "-",
               marker: str = "o", alpha: float = 0.2):
    lo, hi = f"{value}_ci_low", f"{value}_ci_high"
    if lo in d.columns and hi in d.columns:
        ax.fill_between(x, d[lo], d[hi], color=color, alpha=alpha, linewidth=0)
    return ax.plot(x, d[value], color=color, linestyle=linestyle, marker=marker, markersize=3.5, label=label)[0]


def _site_axis(ax, sites, what: str = "site") -> None:
    sites = np.asarray(sorted(set(int(v) for v in sites)))
    if len(sites) == 0:
        return
    L = int(sites.max())
    ax.xaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))
    ax.set_xlim(sites.min() - 0.4, L + 0.4)
    if what == "site":
        ax.set_xlabel(f"site l  (l < {L}: input of layer l; l = {L}: final residual)")
    else:
        ax.set_xlabel(f"knockout in layers ≥ start  (start = {L}: no knockout)")


def _mark_site(ax, site, ci, color: str, label: str) -> Line2D | None:
    """A vertical line at `site` and a span over its CI; None (nothing drawn) when undefined."""
    if not is_number(site):
        return None
    c = _ci_pair(ci)
    if c is not None and c[1] > c[0]:
        ax.axvspan(c[0] - 0.15, c[1] + 0.15, color=color, alpha=0.1, linewidth=0)
    ax.axvline(float(site), color=color, linestyle="--", linewidth=1.3)
    return Line2D([], [], color=color, linestyle="--", label=label)


def _ci_text(ci) -> str:
    c = _ci_pair(ci)
    if c is None:
        return "CI undefined"
    lo, hi = (_f(v, 0) if v.is_integer() else _f(v) for v in c)
    return f"95% CI {lo}–{hi}"
