"""One look for every figure: component and region colours, fonts, sizes.

Colours follow the Okabe-Ito palette (distinguishable with the common colour-vision
deficiencies) and are fixed per name, so `attn_out` is the same orange in every figure
and a reader learns the code once.
"""

from __future__ import annotations

COMPONENT_COLORS = {
    "resid_pre": "#7a7a7a",
    "attn_out": "#D55E00",
    "mlp_out": "#009E73",
    "resid_post": "#0072B2",
}

REGION_COLORS = {
    "sink": "#404040",
    "template": "#b0b0b0",
    "system": "#E69F00",
    "user": "#56B4E9",
    "assistant": "#8c564b",
    "gen_prompt": "#CC79A7",
    "prefix": "#009E73",
}

METRIC_LABELS = {
    "rel_change": "relative change ‖v − b‖ / ‖b‖",
    "cosine_centered": "centred cosine cos(v − μ, b − μ)",
    "cosine": "cosine cos(v, b)",
    "kl": "KL(variant ‖ baseline) of next token",
    "kl_lens": "logit-lens KL(variant ‖ baseline)",
    "impact": "impact (mean rel. change, resid_post)",
}

NEUTRAL = "#333333"
HIGHLIGHT = "#C0392B"
MUTED = "#9a9a9a"

RC = {
    "font.family": "DejaVu Sans",
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.titleweight": "bold",
    "axes.labelsize": 10,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 9,
    "legend.frameon": False,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "lines.linewidth": 1.8,
    "figure.facecolor": "white",
    "axes.facecolor": "white",
    "savefig.facecolor": "white",
    # deterministic SVG element ids, so reruns on the same tables give identical files
    "svg.hashsalt": "promptshift",
    # SVG text stays text (searchable, editable when a figure goes into a paper) and the
    # files are written ~20% faster than with glyphs converted to paths
    "svg.fonttype": "none",
}


def component_color(name: str) -> str:
    return COMPONENT_COLORS.get(name, NEUTRAL)


def region_color(name: str) -> str:
    return REGION_COLORS.get(name, NEUTRAL)


def short(name: str, n: int = 28) -> str:
    """Long system-prompt names would eat half of a heatmap; the full name is in the tables."""
    name = str(name)
    return name if len(name) <= n else name[: n - 1] + "…"
