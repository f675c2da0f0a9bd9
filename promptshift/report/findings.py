"""The findings paragraph, in words, generated only from summary.json.

No claim in the report is written by hand: every sentence is a template over one block of
summary.json, every number in it is one value of summary.json formatted by `fmt`, `pct`
or `layer`, and a block that is missing or malformed drops its sentence instead of
printing a stale or invented number. The wording that depends on a value (e.g. "above"
vs "not above" the control floor) is chosen from that value, never assumed.
"""

from __future__ import annotations

import math
from numbers import Real

COMPONENT_ORDER = ("resid_pre", "attn_out", "mlp_out", "resid_post")


def fmt(x) -> str:
    """Three significant digits, no exponent for everyday magnitudes."""
    x = float(x)
    if not math.isfinite(x):
        return "n/a"
    if x == 0:
        return "0"
    a = abs(x)
    if a >= 1000 or a < 1e-3:
        return f"{x:.2e}"
    if a >= 100:
        return f"{x:.0f}"
    return f"{x:.3g}"


def pct(x) -> str:
    """A share in [0, 1] as a percentage with one decimal."""
    x = float(x)
    return "n/a" if not math.isfinite(x) else f"{100 * x:.1f}%"


def pval(p) -> str:
    p = float(p)
    if not math.isfinite(p):
        return "n/a"
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


def layer(x) -> str:
    return str(int(x))


def ci(c) -> str:
    lo, hi = c
    return f"95% CI {fmt(lo)} to {fmt(hi)}"


def _num(x) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(float(x))


def _ci_ok(c) -> bool:
    return isinstance(c, (list, tuple)) and len(c) == 2 and all(_num(v) for v in c)


def _ordered(keys):
    known = [k for k in COMPONENT_ORDER if k in keys]
    return known + sorted(k for k in keys if k not in COMPONENT_ORDER)


def _overview(s: dict) -> list[str]:
    parts = []
    if _num(s.get("n_pairs")):
        parts.append(f"compares {int(s['n_pairs'])} (user prompt, system prompt) pairs with their baselines")
    if _num(s.get("n_controls")):
        parts.append(f"uses {int(s['n_controls'])} control pairs (two unrelated user prompts under the baseline) "
                     "as the floor")
    if not parts:
        return []
    model = f" on {s['model']}" if isinstance(s.get("model"), str) and s["model"] else ""
    return [f"The sweep{model} " + " and ".join(parts) + "."]


def _layers(s: dict) -> list[str]:
    mal = s.get("most_affected_layer")
    if not isinstance(mal, dict):
        return []
    floor = s.get("control_floor") if isinstance(s.get("control_floor"), dict) else {}
    out = []
    for comp in _ordered(mal):
        d = mal[comp]
        if not isinstance(d, dict) or not _num(d.get("layer")) or not _num(d.get("mean")):
            continue
        text = f"`{comp}` changes most at layer {layer(d['layer'])}: mean relative change {fmt(d['mean'])}"
        if _ci_ok(d.get("ci")):
            text += f" ({ci(d['ci'])})"
        if _num(floor.get(comp)):
            text += f", against a control floor of {fmt(floor[comp])}"
        out.append(text + ".")
    return out


def _above(s: dict) -> list[str]:
    """The verdict of summary.json on the control floor, for the component it was made on
    (`impact_component`, resid_post by default), with the numbers it rests on."""
    v = s.get("effects_above_control")
    comp = s.get("impact_component") if isinstance(s.get("impact_component"), str) else "resid_post"
    mal = s.get("most_affected_layer") if isinstance(s.get("most_affected_layer"), dict) else {}
    floor = s.get("control_floor") if isinstance(s.get("control_floor"), dict) else {}
    d = mal.get(comp) if isinstance(mal.get(comp), dict) else {}
    numbers = ""
    if _num(d.get("mean")) and _num(floor.get(comp)):
        numbers = f" ({fmt(d['mean'])} against {fmt(floor[comp])})"
    if v is True:
        text = (f"At its most affected layer, `{comp}` changes more with a system prompt than between two unrelated "
                f"user prompts{numbers}: the effect lies above the control floor")
        if _ci_ok(d.get("ci")) and _num(floor.get(comp)) and float(d["ci"][0]) <= float(floor[comp]):
            text += f", but its 95% CI reaches down to {fmt(d['ci'][0])}, below the floor"
        return [text + "."]
    if v is False:
        return [f"The system-prompt effect on `{comp}` does not rise above the control floor{numbers}: it is no larger "
                "than the change between two unrelated user prompts, so the layer profiles should not be read as "
                "effects."]
    if v is None and "effects_above_control" in s:
        note = s.get("effects_note")
        return ["summary.json gives no verdict on the control floor"
                + (f" ({note})" if isinstance(note, str) and note else "") + "."]
    return []


def _length(s: dict) -> list[str]:
    d = s.get("length")
    if not isinstance(d, dict) or not _num(d.get("pearson_r")):
        return []
    r = float(d["pearson_r"])
    direction = "larger" if r > 0 else "smaller" if r < 0 else "neither larger nor smaller"
    text = f"Longer system prompts go with {direction} internal change: Pearson r = {fmt(r)}"
    extra = []
    if _ci_ok(d.get("ci")):
        extra.append(ci(d["ci"]))
    if _num(d.get("p")):
        extra.append(f"p = {pval(d['p'])}")
    if extra:
        text += f" ({', '.join(extra)})"
    if _num(d.get("spearman_r")):
        text += f"; Spearman r = {fmt(d['spearman_r'])}"
    text += "."
    if _ci_ok(d.get("ci")):
        lo, hi = map(float, d["ci"])
        if lo <= 0 <= hi:
            text += " The confidence interval includes zero, so this sweep does not establish a length effect."
    return [text]


def _tag(s: dict) -> list[str]:
    d = s.get("top_tag")
    if not isinstance(d, dict) or not d.get("tag") or not _num(d.get("diff")):
        return []
    diff = float(d["diff"])
    word = "more" if diff >= 0 else "less"
    text = (f"The tag with the largest effect is `{d['tag']}`: system prompts with it change the model by "
            f"{fmt(abs(diff))} {word} than those without")
    if _ci_ok(d.get("ci")):
        text += f" (difference {fmt(diff)}, {ci(d['ci'])})"
    return [text + "."]


def _attention(s: dict) -> list[str]:
    d = s.get("attention_shares")
    if not isinstance(d, dict):
        return []
    items = sorted(((k, float(v)) for k, v in d.items() if _num(v)), key=lambda kv: -kv[1])
    if not items:
        return []
    return ["Attention mass by key region: " + ", ".join(f"{k} {pct(v)}" for k, v in items) + "."]


def _internal_output(s: dict) -> list[str]:
    d = s.get("strongest_internal_output")
    if not isinstance(d, dict) or not _num(d.get("r")) or not d.get("component") or not _num(d.get("layer")):
        return []
    out = d.get("output") or "output change"
    measure = f"`{d['measure']}` of " if isinstance(d.get("measure"), str) else ""
    text = (f"Internal change tracks output change most closely at {measure}`{d['component']}` layer "
            f"{layer(d['layer'])}: r = {fmt(d['r'])} with `{out}`")
    if _ci_ok(d.get("ci")):
        text += f" ({ci(d['ci'])})"
    return [text + "."]


def _output(s: dict) -> list[str]:
    d = s.get("output")
    if not isinstance(d, dict):
        return []
    parts = []
    if _num(d.get("mean_kl")):
        parts.append(f"shifts the next-token distribution by a mean KL(variant ‖ baseline) of {fmt(d['mean_kl'])}")
    if _num(d.get("top1_change_rate")):
        parts.append(f"changes the top-1 next token in {pct(d['top1_change_rate'])} of pairs")
    if _num(d.get("mean_gen_edit_distance")):
        parts.append(f"changes the greedy continuation by a mean normalised edit distance of "
                     f"{fmt(d['mean_gen_edit_distance'])}")
    if not parts:
        return []
    if len(parts) > 1:
        parts[-1] = "and " + parts[-1]
    return ["On the output, a system prompt " + ", ".join(parts) + "."]


def _lens(s: dict) -> list[str]:
    if "lens_shift_layer" not in s:
        return []
    v = s["lens_shift_layer"]
    if v is None:
        return ["The logit lens shows no layer at which the output shift appears."]
    if _num(v):
        return [f"Read through the logit lens, the output shift appears at layer {layer(v)}."]
    return []


SECTIONS = (_overview, _layers, _above, _length, _tag, _attention, _internal_output, _output, _lens)


def findings(summary: dict) -> list[str]:
    """Sentences stating what summary.json says, in a fixed order.

    Each sentence comes from one block of the summary; a missing or malformed block drops
    its sentences (it never raises), so a partial summary gives a partial list.
    """
    if not isinstance(summary, dict):
        return []
    out: list[str] = []
    for section in SECTIONS:
        try:
            out.extend(section(summary))
        except (KeyError, TypeError, ValueError):
            continue
    return out
