"""The findings paragraph, in words, generated only from summary.json.

No claim in the report is written by hand: every sentence is a template over one block of
summary.json, every number in it is one value of summary.json formatted by `fmt`, `pct`,
`pp` or `layer`, and a block that is missing or malformed drops its sentence instead of
printing a stale or invented number. The wording that depends on a value (e.g. "above"
vs "not above" the control floor) is chosen from that value, never assumed.

A sentence states an effect only when its interval excludes zero (for the control floor:
lies above the floor) under the resampling summary.json names (``sample``: system prompts
and user prompts together); otherwise it says there is no evidence, with the numbers and
n. A selected quantity (most changed layer, best-tracking layer and component) is said to
be chosen on one half of the user prompts and measured on the other (``selection``), and
a small sample (``sample.small``) is named as such.

Size: one short function per finding, each deciding from summary.json alone whether its
claim is supported (interval, sample size, selection) and how to word it; they share the
number formatting and the claim rules at the top.
"""

from __future__ import annotations

import math

from promptshift.jsonsafe import is_number
from promptshift.vocabulary import COMPONENTS



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


def pp(x) -> str:
    """A difference of two shares in percentage points, signed, one decimal."""
    x = float(x)
    return "n/a" if not math.isfinite(x) else f"{100 * x:+.1f}"


def layer(x) -> str:
    return str(int(x))


def ci(c) -> str:
    lo, hi = c
    return f"95% CI {fmt(lo)} to {fmt(hi)}"


def _ci_ok(c) -> bool:
    return isinstance(c, (list, tuple)) and len(c) == 2 and all(is_number(v) for v in c)


def _ordered(keys):
    known = [k for k in COMPONENTS if k in keys]
    return known + sorted(k for k in keys if k not in COMPONENTS)


def _overview(s: dict) -> list[str]:
    parts = []
    if is_number(s.get("n_pairs")):
        parts.append(f"compares {int(s['n_pairs'])} (user prompt, system prompt) pairs with their baselines")
    if is_number(s.get("n_controls")):
        parts.append(f"uses {int(s['n_controls'])} control pairs (two unrelated user prompts under the baseline) "
                     "as the floor")
    if not parts:
        return []
    model = f" on {s['model']}" if isinstance(s.get("model"), str) and s["model"] else ""
    return [f"The sweep{model} " + " and ".join(parts) + "."]


def _sample_block(s: dict) -> dict:
    d = s.get("sample")
    return d if isinstance(d, dict) else {}


def _p(p, s: dict) -> str:
    """`p = 0.03`, or `p < 0.001` when no resample fell on the other side of zero (p = 0 is
    the resolution of the bootstrap, 1 / n_boot, not a probability of zero)."""
    n_boot = _sample_block(s).get("n_boot")
    if float(p) == 0 and is_number(n_boot) and float(n_boot) > 0:
        return f"p < {pval(1.0 / float(n_boot))}"
    return f"p = {pval(p)}"


def _units(s: dict) -> str:
    """`14 system prompts × 18 user prompts, both resampled`, from summary.json's sample."""
    d = _sample_block(s)
    if not (is_number(d.get("n_systems")) and is_number(d.get("n_users"))):
        return ""
    text = f"{int(d['n_systems'])} system prompts × {int(d['n_users'])} user prompts"
    if d.get("resampling") == "crossed":
        text += ", both resampled"
    return text


def _sample(s: dict) -> list[str]:
    """How the intervals were obtained, and which samples are small."""
    d = _sample_block(s)
    if not d:
        return []
    out = []
    if d.get("resampling") == "crossed" and is_number(d.get("n_systems")) and is_number(d.get("n_users")):
        boots = f" ({int(d['n_boot'])} resamples)" if is_number(d.get("n_boot")) else ""
        out.append(f"Intervals are 95% crossed bootstrap intervals{boots}: the {int(d['n_systems'])} system prompts "
                   f"and the {int(d['n_users'])} user prompts are resampled together, so an interval speaks for other "
                   "system prompts as well as other user prompts; each p-value comes from the same resamples and so "
                   "agrees with its interval.")
    small = [(what, int(d[key])) for what, key, flag in (("system prompts", "n_systems", "small_systems"),
                                                           ("user prompts", "n_users", "small_users"))
             if d.get(flag) is True and is_number(d.get(key))]
    if small and is_number(d.get("min_units")):
        items = " and ".join(f"{n} {what}" for what, n in small)
        out.append(f"Small sample: only {items} (fewer than {int(d['min_units'])}); intervals over so few prompts are "
                   "rough, and where this report finds no evidence of an effect that is weak evidence that there is "
                   "none.")
    return out


def _selection(s: dict) -> str:
    """How a selected quantity was chosen, in words, or "" without a selection block."""
    d = s.get("selection")
    if not isinstance(d, dict):
        return ""
    if d.get("method") == "split" and is_number(d.get("n_select")) and is_number(d.get("n_estimate")):
        seed = f", seed {int(d['seed'])}" if is_number(d.get("seed")) else ""
        return (f"chosen on {int(d['n_select'])} of the user prompts and measured on the other {int(d['n_estimate'])} "
                f"(a fixed split{seed})")
    if d.get("method") == "same":
        return "chosen and measured on the same user prompts (too few to split), so its value is optimistic"
    return ""


def _layers(s: dict) -> list[str]:
    mal = s.get("most_affected_layer")
    if not isinstance(mal, dict):
        return []
    floor = s.get("control_floor") if isinstance(s.get("control_floor"), dict) else {}
    out = []
    how = _selection(s)
    if how and any(isinstance(d, dict) for d in mal.values()):
        out.append(f"Each component's most changed layer (highest mean relative change at the last prompt token) is "
                   f"{how}, so choosing the layer does not inflate its change.")
    held = " on the held-out user prompts" if how.startswith("chosen on") else ""
    for comp in _ordered(mal):
        d = mal[comp]
        if not isinstance(d, dict) or not is_number(d.get("layer")) or not is_number(d.get("mean")):
            continue
        text = f"`{comp}` changes most at layer {layer(d['layer'])}: mean relative change {fmt(d['mean'])}{held}"
        if _ci_ok(d.get("ci")):
            text += f" ({ci(d['ci'])})"
        if is_number(floor.get(comp)):
            text += f", against a control floor of {fmt(floor[comp])}"
        out.append(text + ".")
    return out


def _above(s: dict) -> list[str]:
    """The verdict of summary.json on the control floor, for the component it was made on
    (`impact_component`, resid_post by default), with the numbers it rests on: above only
    when the whole interval is."""
    v = s.get("effects_above_control")
    comp = s.get("impact_component") if isinstance(s.get("impact_component"), str) else "resid_post"
    mal = s.get("most_affected_layer") if isinstance(s.get("most_affected_layer"), dict) else {}
    floor = s.get("control_floor") if isinstance(s.get("control_floor"), dict) else {}
    d = mal.get(comp) if isinstance(mal.get(comp), dict) else {}
    numbers = ""
    if is_number(d.get("mean")) and is_number(floor.get(comp)):
        numbers = f" ({fmt(d['mean'])} against {fmt(floor[comp])})"
    if v is True:
        text = (f"At its most affected layer, `{comp}` changes more with a system prompt than between two unrelated "
                f"user prompts{numbers}: the effect lies above the control floor")
        if _ci_ok(d.get("ci")):
            text += f", with its whole 95% CI ({fmt(d['ci'][0])} to {fmt(d['ci'][1])}) above it"
        few = _too_few_systems(s)
        if few is not None:
            text += (f"; with {few[0]} system prompts (fewer than {few[1]}) this holds for these system prompts, not "
                     "for system prompts in general")
        return [text + "."]
    if v is False:
        if is_number(d.get("mean")) and is_number(floor.get(comp)) and float(d["mean"]) > float(floor[comp]) \
                and _ci_ok(d.get("ci")):
            n = f" ({int(d['n_pairs'])} pairs)" if is_number(d.get("n_pairs")) else ""
            return [f"There is no evidence that the system-prompt effect on `{comp}` rises above the control floor: "
                    f"its mean exceeds the floor{numbers}, but its 95% CI reaches down to {fmt(d['ci'][0])}{n}."]
        return [f"The system-prompt effect on `{comp}` does not rise above the control floor{numbers}: it is no larger "
                "than the change between two unrelated user prompts, so the layer profiles should not be read as "
                "effects."]
    if v is None and "effects_above_control" in s:
        note = s.get("effects_note")
        return ["summary.json gives no verdict on the control floor"
                + (f" ({note})" if isinstance(note, str) and note else "") + "."]
    return []


def _too_few_systems(s: dict) -> tuple[int, int] | None:
    """(system prompts, minimum) when summary.json names the system prompts a small sample.
    A percentile bootstrap over fewer units undercovers (its resamples hold few distinct
    system prompts), so an effect across system prompts is then not claimed, whatever its
    interval says."""
    d = _sample_block(s)
    if d.get("small_systems") is True and is_number(d.get("n_systems")) and is_number(d.get("min_units")):
        return int(d["n_systems"]), int(d["min_units"])
    return None


def _excludes_zero(c) -> bool:
    return _ci_ok(c) and (float(c[0]) > 0 or float(c[1]) < 0)


def _length(s: dict) -> list[str]:
    """A length effect is stated only when its crossed interval excludes zero and there are
    enough system prompts to resample; otherwise the sentence says there is no evidence (or
    too few system prompts), with the numbers and n."""
    d = s.get("length")
    if not isinstance(d, dict) or not is_number(d.get("pearson_r")):
        return []
    r = float(d["pearson_r"])
    stats = [ci(d["ci"])] if _ci_ok(d.get("ci")) else []
    if is_number(d.get("p")):
        stats.append(_p(d["p"], s))
    units = _units(s)
    if units:
        stats.append(f"n = {units}")
    detail = f" ({'; '.join(stats)})" if stats else ""
    few = _too_few_systems(s)
    if few is not None:
        text = (f"With {few[0]} system prompts (fewer than {few[1]}) there are too few to tell a length effect from "
                f"the system prompts' own effects, so none is claimed: Pearson r = {fmt(r)}{detail}")
    elif _excludes_zero(d.get("ci")):
        direction = "larger" if r > 0 else "smaller"
        text = f"Longer system prompts go with {direction} internal change: Pearson r = {fmt(r)}{detail}"
    elif _ci_ok(d.get("ci")):
        text = (f"There is no evidence that the length of a system prompt goes with its internal change: Pearson "
                f"r = {fmt(r)}, and its interval includes zero{detail}")
    else:
        text = (f"Length and internal change correlate with Pearson r = {fmt(r)} across system prompts, but the "
                f"correlation has no interval{detail}, so no length effect is claimed")
    if is_number(d.get("spearman_r")):
        text += f"; Spearman r = {fmt(d['spearman_r'])}"
        if _ci_ok(d.get("spearman_ci")):
            text += f" ({ci(d['spearman_ci'])})"
    return [text + "."]


def _tag(s: dict) -> list[str]:
    """Tags whose simultaneous interval (Bonferroni over the tags) excludes zero, with two or
    more system prompts on each side; otherwise that there is no evidence for any tag."""
    d = s.get("tags")
    if not isinstance(d, dict) or not isinstance(d.get("items"), list) or not is_number(d.get("n_tags")):
        return []
    k = int(d["n_tags"])
    if k == 0:
        return []
    items = [t for t in d["items"] if isinstance(t, dict) and isinstance(t.get("tag"), str) and is_number(t.get("diff"))]
    testable = [t for t in items if is_number(t.get("n_systems_with")) and is_number(t.get("n_systems_without"))
                and int(t["n_systems_with"]) >= 2 and int(t["n_systems_without"]) >= 2]
    few = _too_few_systems(s)
    if few is not None:
        return [f"With {few[0]} system prompts (fewer than {few[1]}) there are too few to tell the effect of a tag "
                f"from the system prompts' own effects, so no tag effect is claimed ({k} tag{'' if k == 1 else 's'} in "
                "the tables)."]
    found = [t for t in testable if _excludes_zero(t.get("ci_simultaneous"))]
    over = f"{k} tag{'' if k == 1 else 's'}"
    out = []
    for t in sorted(found, key=lambda t: -abs(float(t["diff"]))):
        diff = float(t["diff"])
        word = "more" if diff > 0 else "less"
        lo, hi = t["ci_simultaneous"]
        text = (f"System prompts tagged `{t['tag']}` change the model {word} than those without: difference "
                f"{fmt(diff)} (simultaneous 95% CI over {over} {fmt(lo)} to {fmt(hi)}")
        if is_number(t.get("p_adjusted")):
            text += f", Bonferroni-adjusted {_p(t['p_adjusted'], s)}"
        out.append(text + f"; {int(t['n_systems_with'])} against {int(t['n_systems_without'])} system prompts).")
    rest = len(testable) - len(found)
    units = _units(s)
    n = f"; n = {units}" if units else ""
    if not found and testable:
        out.append(f"No tag changes the model distinguishably from zero: none of the {len(testable)} testable tags has "
                   f"a simultaneous 95% interval (Bonferroni over {over}) that excludes zero{n}.")
    elif rest:
        out.append(f"For the other {rest} testable tag{'' if rest == 1 else 's'} there is no evidence of an effect.")
    lone = sorted(t["tag"] for t in items if t not in testable)
    if lone:
        names = ", ".join(f"`{x}`" for x in lone)
        out.append(f"Not tested: {names} — carried by fewer than two system prompts, or by all but one, so the tag's "
                   "effect cannot be told apart from those prompts' own.")
    return out



def _attention(s: dict) -> list[str]:
    d = s.get("attention_shares")
    if not isinstance(d, dict):
        return []
    items = sorted(((k, float(v)) for k, v in d.items() if is_number(v)), key=lambda kv: -kv[1])
    if not items:
        return []
    return ["Attention mass by key region: " + ", ".join(f"{k} {pct(v)}" for k, v in items) + "."]


def _internal_output(s: dict) -> list[str]:
    """The layer and component whose change tracks output change best: chosen on one half of
    the user prompts, its correlation measured on the other; a relation is stated only when
    the held-out interval excludes zero."""
    d = s.get("strongest_internal_output")
    if not isinstance(d, dict) or not is_number(d.get("r")) or not d.get("component") or not is_number(d.get("layer")):
        return []
    out = d.get("output") or "output change"
    measure = f"`{d['measure']}` of " if isinstance(d.get("measure"), str) else ""
    where = f"{measure}`{d['component']}` layer {layer(d['layer'])}"
    how = _selection(s)
    if d.get("selection") == "split" and how.startswith("chosen on"):
        sel = f" (r = {fmt(d['r_select'])} there)" if is_number(d.get("r_select")) else ""
        text = (f"The layer and component whose change tracks `{out}` most closely, {how}, is {where}{sel}; on the "
                f"held-out prompts r = {fmt(d['r'])}")
    else:
        text = (f"Internal change tracks `{out}` most closely at {where}: r = {fmt(d['r'])}, the largest of all "
                "layers and components, chosen and measured on the same pairs, so it is optimistic")
    stats = [ci(d["ci"])] if _ci_ok(d.get("ci")) else []
    if is_number(d.get("p")):
        stats.append(_p(d["p"], s))
    if is_number(d.get("n_pairs")):
        stats.append(f"{int(d['n_pairs'])} pairs")
    if stats:
        text += f" ({'; '.join(stats)})"
    if _ci_ok(d.get("ci")):
        text += (": the relation holds on prompts it was not chosen on" if _excludes_zero(d["ci"]) else
                 ": the interval includes zero, so there is no evidence of the relation beyond the prompts it was "
                 "chosen on")
        few = _too_few_systems(s)
        if few is not None and _excludes_zero(d["ci"]):
            text += f", for these {few[0]} system prompts (fewer than {few[1]}: not for system prompts in general)"
    return [text + "."]


def _output(s: dict) -> list[str]:
    d = s.get("output")
    if not isinstance(d, dict):
        return []
    parts = []
    if is_number(d.get("mean_kl")):
        parts.append(f"shifts the next-token distribution by a mean KL(variant ‖ baseline) of {fmt(d['mean_kl'])}")
    if is_number(d.get("top1_change_rate")):
        parts.append(f"changes the top-1 next token in {pct(d['top1_change_rate'])} of pairs")
    if is_number(d.get("mean_gen_edit_distance")):
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
    if is_number(v):
        return [f"Read through the logit lens, the output shift appears at layer {layer(v)}."]
    return []


# ---------------------------------------------------------------------------------------
# causal analyses: summary.json's `causal` section (promptshift/metrics/causal.py)

PATCH_MODES = {"suffix": "patching every aligned position after the system prompt",
               "last": "patching the last prompt token only"}
CONDITIONS = {
    "system": "the rule as system prompt, with a history that obeys it",
    "system_plain": "the rule as system prompt, with the rule's marker removed from the history",
    "no_system": "an empty system turn, with a history that obeys the rule",
}


def _causal(s: dict, name: str) -> dict:
    c = s.get("causal")
    d = c.get(name) if isinstance(c, dict) else None
    return d if isinstance(d, dict) else {}


def _site_ci(d: dict, word: str = "site") -> str:
    """`(95% CI of the site a to b)`, or why there is none."""
    c = d.get("ci")
    if _ci_ok(c):
        text = f"95% CI of the {word} {layer(c[0]) if float(c[0]).is_integer() else fmt(c[0])} to " \
               f"{layer(c[1]) if float(c[1]).is_integer() else fmt(c[1])}"
    else:
        text = "its CI is undefined: too few bootstrap resamples reach the threshold"
    if is_number(d.get("undefined_share")) and float(d["undefined_share"]) > 0:
        text += f"; undefined in {pct(d['undefined_share'])} of resamples"
    return f"({text})"


def _value_ci(v, c) -> str:
    """A share as a percentage with its CI in the same unit, or a note that the CI is undefined."""
    if _ci_ok(c):
        return f"{pct(v)} (95% CI {pct(c[0])} to {pct(c[1])})"
    return f"{pct(v)} (CI undefined)"


def _causal_sample(s: dict) -> list[str]:
    """How the intervals of the causal curves were resampled, once for all of them."""
    c = s.get("causal")
    if not isinstance(c, dict):
        return []
    crossed = [d for k, d in c.items() if k in ("patching", "knockout", "steering") and isinstance(d, dict)
               and d.get("resampling") == "crossed" and is_number(d.get("n_systems")) and is_number(d.get("n_users"))]
    if not crossed:
        return []
    d = crossed[0]
    return [f"The causal curves' intervals resample the {int(d['n_systems'])} system prompts and "
            f"{int(d['n_users'])} user prompts of the causal analyses together; an onset is found again in every "
            "resample, so its interval accounts for choosing it."]


def _causal_patching(s: dict) -> list[str]:
    d = _causal(s, "patching")
    modes = d.get("modes")
    if not isinstance(modes, dict):
        return []
    thr = float(d["threshold"]) if is_number(d.get("threshold")) else None
    n = int(d["n_layers"]) if is_number(d.get("n_layers")) else None
    out = []
    for mode in [m for m in ("suffix", "last") if m in modes] + sorted(m for m in modes if m not in ("suffix", "last")):
        m = modes[mode]
        if not isinstance(m, dict) or not isinstance(m.get("onset"), dict):
            continue
        onset = m["onset"]
        how = PATCH_MODES.get(mode, f"mode `{mode}`")
        target = f"{pct(thr)} of the output change" if thr is not None else "the threshold share of the output change"
        sites = "site l = input of layer l" + (f", site {n} = the final residual" if n is not None else "")
        if is_number(onset.get("site")):
            text = (f"Activation patching (`{mode}`: {how}; {sites}): copying the variant's residual stream into the "
                    f"baseline run first recovers at least {target} (1 − KL ratio) at site {layer(onset['site'])} "
                    f"{_site_ci(onset)}")
        elif "site" in onset:
            text = (f"Activation patching (`{mode}`: {how}; {sites}) never recovers {target} at any site, so its "
                    "onset is undefined")
        else:
            continue
        extra = []
        if is_number(m.get("recovered_mid")):
            extra.append(f"halfway through the depth it recovers {pct(m['recovered_mid'])}")
        if is_number(m.get("recovered_final")):
            extra.append(f"at the final residual {pct(m['recovered_final'])}")
        out.append(text + ("; " + ", ".join(extra) if extra else "") + ".")
    return out


def _causal_knockout(s: dict) -> list[str]:
    d = _causal(s, "knockout")
    out = []
    stop = d.get("stops_mattering")
    thr = pct(d["threshold"]) if is_number(d.get("threshold")) else "the threshold"
    if isinstance(stop, dict) and is_number(stop.get("site")):
        out.append(f"Blocking attention to the system-prompt tokens only in layers ≥ l leaves less than {thr} of the "
                   f"full knockout's effect for every l from layer {layer(stop['site'])} on "
                   f"{_site_ci(stop, 'layer')}: after that layer the system prompt no longer matters through "
                   "attention to its tokens.")
    elif isinstance(stop, dict) and "site" in stop:
        out.append(f"Blocking attention to the system-prompt tokens keeps more than {thr} of the full knockout's "
                   "effect up to the last layer, so no layer after which it stops mattering is defined.")
    parts = []
    if is_number(d.get("full_knockout_kl_ratio")):
        parts.append(f"KL(variant ‖ knocked-out) is {fmt(d['full_knockout_kl_ratio'])} × KL(variant ‖ baseline) "
                     "(1 = the knockout undoes the system prompt's whole effect on the next token)")
    if is_number(d.get("full_knockout_vs_baseline")):
        parts.append(f"KL(knocked-out ‖ baseline) is {fmt(d['full_knockout_vs_baseline'])} × "
                     "KL(variant ‖ baseline) (0 = the knocked-out run is the baseline)")
    if parts:
        out.append("Blocking that attention in every layer: " + "; ".join(parts) + ".")
    return out


def _causal_steering(s: dict) -> list[str]:
    d = _causal(s, "steering")
    best, final = d.get("best"), d.get("final_site")
    out = []
    if isinstance(best, dict) and is_number(best.get("site")) and is_number(best.get("recovered")):
        split = best.get("selection") == "split"
        how = "; chosen on one half of the user prompts" if split else ""
        where = " on the other half" if split else ""
        text = (f"A steering vector (the mean variant − baseline residual difference of the other user prompts) "
                f"added to the baseline's last token works best at site {layer(best['site'])} (site l = input of "
                f"layer l; the final residual excluded{how}), where it recovers "
                f"{_value_ci(best['recovered'], best.get('ci'))} of the output change (1 − KL ratio){where}")
        if isinstance(final, dict) and is_number(final.get("recovered")):
            text += (f"; at the final residual, where it edits the output directly, "
                     f"{_value_ci(final['recovered'], final.get('ci'))}")
        out.append(text + ".")
    return out


def _causal_phrases(s: dict) -> list[str]:
    d = _causal(s, "phrases")
    out = []
    top = [t for t in d.get("top_phrase_per_system") or [] if isinstance(t, dict) and isinstance(t.get("system"), str)
           and isinstance(t.get("phrase"), str) and is_number(t.get("kl_removed"))]
    if top:
        top = sorted(top, key=lambda t: -float(t["kl_removed"]))
        items = []
        for t in top[:6]:
            phrase = " ".join(t["phrase"].split())
            phrase = phrase if len(phrase) <= 60 else phrase[:59] + "…"
            item = f"`{t['system']}`: “{phrase}” (KL(variant ‖ without it) = {fmt(t['kl_removed'])}"
            if _ci_ok(t.get("ci")):
                item += f", {ci(t['ci'])}"
            if is_number(t.get("importance_output")):
                item += f"; {pct(t['importance_output'])} of the output change lost without it"
            items.append(item + ")")
        head = "Phrase ablation: the phrase whose removal moves the output most, per system prompt split into phrases"
        if is_number(d.get("n_systems_split")):
            k = int(d["n_systems_split"])
            head += f" ({k} such prompt{'' if k == 1 else 's'}"
            head += (", the largest effects first)" if len(top) <= 6 else
                     ", the six largest effects; the others are in the figure)")
        out.append(head + ": " + "; ".join(items) + ".")
    elif is_number(d.get("n_systems_split")) and int(d["n_systems_split"]) == 0:
        out.append("Phrase ablation: no system prompt was split into more than one phrase, so phrases were not ranked.")
    agree = d.get("attribution_vs_occlusion")
    if isinstance(agree, dict) and is_number(agree.get("spearman_r")):
        text = f"Token attribution summed per phrase ranks phrases like their removal does with Spearman r = " \
               f"{fmt(agree['spearman_r'])}"
        extra = []
        if is_number(agree.get("p")):
            extra.append(f"p = {pval(agree['p'])}")
        if is_number(agree.get("n_phrases")):
            extra.append(f"{int(agree['n_phrases'])} phrases")
        out.append(text + (f" ({', '.join(extra)})" if extra else "") + ".")
    elif "attribution_vs_occlusion" in d and agree is None and top:
        out.append("Token attribution was not compared with phrase removal: fewer than three phrases had both "
                   "(the correlation is undefined).")
    return out


def _causal_multiturn(s: dict) -> list[str]:
    d = _causal(s, "multiturn")
    conds = d.get("conditions")
    if not isinstance(conds, dict):
        return []
    last_turn = f"the last turn (turn {int(d['n_turns'])})" if is_number(d.get("n_turns")) else "the last turn"
    out = []
    if is_number(d.get("n_conversations")):
        rule = f" under the rule “{d['rule']}”" if isinstance(d.get("rule"), str) and d["rule"] else ""
        out.append(f"Multi-turn decay is measured on {int(d['n_conversations'])} scripted conversations{rule}, "
                   "with confidence intervals from a bootstrap over conversations.")
    for cond in [c for c in CONDITIONS if c in conds] + sorted(c for c in conds if c not in CONDITIONS):
        c = conds[cond]
        if not isinstance(c, dict):
            continue
        label = f"`{cond}` ({CONDITIONS[cond]})" if cond in CONDITIONS else f"`{cond}`"
        parts = []
        has_sys = is_number(c.get("sys_mass_first")) and is_number(c.get("sys_mass_last")) and not (
            is_number(c.get("uniform_first")) and float(c["uniform_first"]) == 0 and float(c["sys_mass_first"]) == 0)
        if has_sys:
            a, b = float(c["sys_mass_first"]), float(c["sys_mass_last"])
            verb = "falls" if b < a else "rises" if b > a else "stays"
            text = (f"the last token's attention to the system prompt (sink excluded, renormalised, mean over layers "
                    f"and heads) {verb} from {_value_ci(a, c.get('sys_mass_first_ci'))} at the first turn to "
                    f"{_value_ci(b, c.get('sys_mass_last_ci'))} at {last_turn}")
            if is_number(c.get("uniform_first")) and is_number(c.get("uniform_last")):
                text += (f", against {pct(c['uniform_first'])} and {pct(c['uniform_last'])} under uniform attention "
                         "over the visible keys")
            if is_number(c.get("turn_spearman")):
                text += f" (Spearman r with the turn = {fmt(c['turn_spearman'])}"
                text += f", p = {pval(c['turn_p'])})" if is_number(c.get("turn_p")) else ")"
            elif "turn_spearman" in c:
                text += " (its Spearman correlation with the turn is undefined)"
            parts.append(text)
        elif (is_number(c.get("uniform_first")) and float(c["uniform_first"]) == 0) or \
                (cond == "no_system" and "sys_mass_first" not in c):
            parts.append("there are no system-prompt tokens to attend to")
        if is_number(c.get("obey_first")) and is_number(c.get("obey_last")):
            text = (f"the rule is obeyed in {pct(c['obey_first'])} of conversations at the first turn and "
                    f"{pct(c['obey_last'])} at the last")
            if is_number(c.get("obey_mean")):
                text += f" ({pct(c['obey_mean'])} over all turns)"
            parts.append(text)
        if parts:
            text = "; ".join(parts)
            out.append(f"With {label}, {text}.")
    return out

def _cell(d) -> dict:
    return d if isinstance(d, dict) else {}


def _behaviour_change(v: dict, b: dict, c: dict, n: str, verbs: tuple[str, str, str], noun: str) -> str:
    """One pooled behaviour sentence: an effect only when the crossed interval of the change
    excludes zero, else "no evidence", with the numbers."""
    up, down, none = verbs
    nums = f"{pct(v['mean'])} of {noun} with the system prompt against {pct(b['mean'])} without"
    stats = [f"change {pp(c['mean'])} percentage points"]
    if _ci_ok(c.get("ci")):
        stats.append(f"95% CI {pp(c['ci'][0])} to {pp(c['ci'][1])}")
    if n:
        stats.append(n)
    if _excludes_zero(c.get("ci")):
        return f"{up if float(c['mean']) > 0 else down}: {nums} ({'; '.join(stats)})."
    return f"{none}: {nums} ({'; '.join(stats)}; the interval includes zero)."


def _behaviour(s: dict) -> list[str]:
    """Adherence to the declared checks and correctness, pooled over system prompts (crossed
    intervals: stated only when they exclude zero) and per system prompt (intervals over
    user prompts), the replies left undecided, and the layer that predicts behaviour change."""
    d = s.get("behaviour")
    if not isinstance(d, dict) or not isinstance(d.get("pooled"), dict):
        return []
    pooled = d["pooled"]
    units = _units(s)
    out = []
    k = int(d["n_systems_with_checks"]) if is_number(d.get("n_systems_with_checks")) else None
    av, ab, ac = (_cell(pooled.get(m)) for m in ("adherence_variant", "adherence_baseline", "adherence_change"))
    n_users = _sample_block(s).get("n_users")
    if k and is_number(av.get("mean")) and is_number(ab.get("mean")) and is_number(ac.get("mean")):
        n = f"n = {k} system prompts with checks" + (f" × {int(n_users)} user prompts, both resampled"
                                                     if is_number(n_users) else "")
        out.append(_behaviour_change(av, ab, ac, n, (
            "Replies follow the instructions the system prompts declare checks for",
            "Replies follow the declared instructions less with the system prompt than without",
            "There is no evidence that the system prompts' declared checks are followed more often with them than "
            "without"), "their checks passed"))
        small = _sample_block(s).get("min_units")
        if k < (int(small) if is_number(small) else 8):
            out.append(f"Only {k} system prompts declare checks: a small sample for a claim about system prompts in "
                       "general; read the per-system-prompt results instead.")
    rows = [r for r in d.get("systems", []) if isinstance(r, dict) and r.get("checks")]
    up = [r for r in rows if _excludes_zero(_cell(r.get("adherence_change")).get("ci"))
          and float(r["adherence_change"]["mean"]) > 0]
    if rows:
        def item(r):
            return (f"`{r['system']}` ({r['checks']}: {pct(r['adherence_baseline']['mean'])} → "
                    f"{pct(r['adherence_variant']['mean'])})")
        if up:
            out.append("Followed, each against its own baseline (95% interval of the change over user prompts above "
                       "zero; each interval on its own, not corrected for the number of system prompts compared): "
                       + ", ".join(item(r) for r in up) + ".")
        rest = [r["system"] for r in rows if r not in up]
        if rest:
            out.append(f"No evidence of a change in adherence for {', '.join(f'`{x}`' for x in rest)}.")
    cv, cb, cc = (_cell(pooled.get(m)) for m in ("correct_variant", "correct_baseline", "correct_change"))
    if is_number(cv.get("mean")) and is_number(cb.get("mean")) and is_number(cc.get("mean")):
        n = (f"{int(d['n_pairs_with_expected'])} pairs with an expected answer" if is_number(d.get("n_pairs_with_expected"))
             else "") + (f"; n = {units}" if units else "")
        out.append(_behaviour_change(cv, cb, cc, n.strip("; "), (
            "System prompts raise the share of correct answers", "System prompts lower the share of correct answers",
            "There is no evidence that the system prompts change how often the answer is right"),
            "expected answers given"))
        worse = [r for r in d.get("systems", []) if isinstance(r, dict)
                 and _excludes_zero(_cell(r.get("correct_change")).get("ci")) and float(r["correct_change"]["mean"]) < 0]
        if worse:
            out.append("Correct answers drop, against the same user prompts without it (interval over user prompts "
                       "below zero; each on its own, not corrected for the number of system prompts compared), under "
                       + ", ".join(
                           f"`{r['system']}` ({pct(r['correct_baseline']['mean'])} → {pct(r['correct_variant']['mean'])})"
                           for r in worse) + ".")
    wc = _cell(pooled.get("words_change"))
    if is_number(wc.get("mean")) and _ci_ok(wc.get("ci")):
        verb = ("shorter" if float(wc["mean"]) < 0 else "longer") if _excludes_zero(wc["ci"]) else None
        out.append((f"Replies get {verb} with a system prompt: {fmt(wc['mean'])} words on average ({ci(wc['ci'])})."
                    if verb else f"There is no evidence that system prompts change reply length: {fmt(wc['mean'])} "
                                 f"words on average, and the interval includes zero ({ci(wc['ci'])})."))
    if is_number(d.get("unfinished_replies")) and int(d["unfinished_replies"]) > 0 and is_number(d.get("n_replies")):
        out.append(f"{int(d['unfinished_replies'])} of {int(d['n_replies'])} replies used their whole token budget "
                   "without finishing; a check or an answer that more tokens could still change is left undecided "
                   "for them (not counted as a failure): raise `behaviour.max_new_tokens` to judge more.")
    how = _selection(s)
    names = {"adherence_change": "adherence", "correct_change": "correctness", "words_change": "reply length"}
    for o, st in (d.get("strongest_internal") or {}).items():
        if not isinstance(st, dict) or not is_number(st.get("r")) or not is_number(st.get("layer")):
            continue
        where = f"`{st.get('component')}` layer {layer(st['layer'])}"
        chosen = f", {how}," if how.startswith("chosen on") and st.get("selection") == "split" else \
            " (chosen and measured on the same pairs, so optimistic)"
        stats = [ci(st["ci"])] if _ci_ok(st.get("ci")) else []
        if is_number(st.get("n_pairs")):
            stats.append(f"{int(st['n_pairs'])} pairs")
        text = (f"The internal change that best predicts the change in {names.get(o, o)}{chosen} is {where}: "
                f"r = {fmt(st['r'])}" + (f" ({'; '.join(stats)})" if stats else ""))
        if _ci_ok(st.get("ci")):
            text += (": the relation holds on prompts it was not chosen on" if _excludes_zero(st["ci"]) else
                     ": the interval includes zero, so there is no evidence of the relation")
        out.append(text + ".")
    return out


def _causal_continuation(s: dict) -> list[str]:
    """Where patching recovers half of the variant's whole reply, next to the first token's onset."""
    d = _causal(s, "continuation")
    modes = d.get("modes")
    if not isinstance(modes, dict):
        return []
    first = _causal(s, "patching").get("modes") or {}
    toks = f"its first {int(d['max_tokens'])} tokens" if is_number(d.get("max_tokens")) else "its tokens"
    out = []
    for mode in [m for m in ("suffix", "last") if m in modes]:
        onset = _cell(modes[mode].get("onset"))
        if "site" not in onset:
            continue
        head = (f"Scored on the variant's whole reply ({toks}, teacher-forced mean log-probability), `{mode}` "
                "patching")
        if is_number(onset.get("site")):
            text = f"{head} first recovers half at site {layer(onset['site'])} {_site_ci(onset)}"
        else:
            text = f"{head} never recovers half of the reply's log-probability, so its onset is undefined"
        f = _cell(_cell(first.get(mode)).get("onset"))
        if is_number(f.get("site")):
            text += f"; the first answer token's onset is site {layer(f['site'])}"
            if is_number(onset.get("site")) and int(onset["site"]) > int(f["site"]) and _ci_ok(onset.get("ci")) \
                    and float(onset["ci"][0]) > float(f["site"]):
                text += ", so the reply needs the instruction beyond what carries its first token"
        out.append(text + ".")
    return out


SECTIONS = (_overview, _sample, _layers, _above, _length, _tag, _attention, _internal_output, _output, _lens,
            _behaviour, _causal_sample, _causal_patching, _causal_continuation, _causal_knockout, _causal_steering,
            _causal_phrases, _causal_multiturn)


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
        except (KeyError, TypeError, ValueError, AttributeError):
            continue
    return out
