"""The findings text is generated from summary.json only: change a value, the text changes;
every number in the text is a summary value; a partial summary gives partial findings."""

from __future__ import annotations

import copy
import json
import re

from promptshift.report import build_report, findings
from promptshift.report.findings import fmt, layer, pct, pval

from .conftest import CAUSAL_TABLE_NAMES, TABLE_NAMES

SUMMARY = {
    "n_pairs": 96, "n_controls": 4, "model": "SmolLM2-135M-Instruct",
    "sample": {"n_systems": 12, "n_users": 8, "n_pairs": 96, "n_boot": 1000, "seed": 0, "level": 0.95,
               "resampling": "crossed", "min_units": 8, "small_systems": False, "small_users": False, "small": []},
    "selection": {"method": "split", "seed": 0, "select_users": ["a", "b", "c", "d"],
                  "estimate_users": ["e", "f", "g", "h"], "n_select": 4, "n_estimate": 4},
    "most_affected_layer": {
        "resid_post": {"layer": 27, "mean": 0.3234, "ci": [0.303, 0.345], "n_pairs": 48, "selection": "split"},
        "attn_out": {"layer": 9, "mean": 0.783, "ci": [0.72, 0.833], "n_pairs": 48, "selection": "split"},
        "mlp_out": {"layer": 22, "mean": 0.789, "ci": [0.715, 0.841], "n_pairs": 48, "selection": "split"},
        "resid_pre": {"layer": 29, "mean": 0.313, "ci": [0.291, 0.329], "n_pairs": 48, "selection": "split"},
    },
    "control_floor": {"resid_post": 0.129, "attn_out": 0.279, "mlp_out": 0.252, "resid_pre": 0.12},
    "effects_above_control": True,
    "effects_note": "resid_post rel_change at the last token peaks at layer 27 with mean 0.3234 over pairs",
    "impact_component": "resid_post",
    "length": {"pearson_r": 0.614, "ci": [0.346, 0.798], "p": 0.0014, "n_systems": 12, "n_users": 8,
               "spearman_r": 0.672, "spearman_ci": [0.21, 0.9], "spearman_p": 0.006},
    "tags": {"target": "impact", "n_tags": 3, "level": 0.9833, "items": [
        {"tag": "nonsense", "diff": -0.116, "ci": [-0.153, -0.0796], "ci_simultaneous": [-0.161, -0.0701],
         "p": 0.0, "p_adjusted": 0.0, "n_systems_with": 2, "n_systems_without": 10},
        {"tag": "persona", "diff": 0.0412, "ci": [-0.0104, 0.0871], "ci_simultaneous": [-0.0223, 0.0953],
         "p": 0.11, "p_adjusted": 0.33, "n_systems_with": 3, "n_systems_without": 9},
        {"tag": "french", "diff": 0.2, "ci": [0.15, 0.25], "ci_simultaneous": [0.14, 0.26], "p": 0.0,
         "p_adjusted": 0.0, "n_systems_with": 1, "n_systems_without": 11}]},
    "attention_shares": {"sink": 0.662, "system": 0.043, "user": 0.121, "gen_prompt": 0.132, "template": 0.041},
    "strongest_internal_output": {"component": "mlp_out", "layer": 9, "measure": "rel_change", "output": "kl",
                                  "method": "pearson", "r": 0.649, "ci": [0.499, 0.799], "p": 0.0, "n_pairs": 48,
                                  "r_select": 0.702, "n_select": 48, "selection": "split"},
    "output": {"mean_kl": 0.151, "top1_change_rate": 0.15, "mean_gen_edit_distance": 0.128},
    "lens_shift_layer": 21,
}


def _numbers_in_summary(s) -> set[str]:
    """Every way `findings` may print a number of the summary."""
    out: set[str] = set()

    def walk(v):
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out.update({fmt(v), fmt(abs(v)), pct(v), pval(v)})
            if float(v).is_integer():
                out.add(layer(v))

    walk(s)
    return out


NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?%?")


def test_findings_cover_every_block():
    text = " ".join(findings(SUMMARY))
    for needle in ("The sweep on SmolLM2-135M-Instruct compares 96 (user prompt, system prompt) pairs with their "
                   "baselines and uses 4 control pairs",
                   "95% crossed bootstrap intervals (1000 resamples): the 12 system prompts and the 8 user prompts "
                   "are resampled together",
                   "chosen on 4 of the user prompts and measured on the other 4 (a fixed split, seed 0)",
                   "`resid_post` changes most at layer 27: mean relative change 0.323 on the held-out user prompts "
                   "(95% CI 0.303 to 0.345), against a control floor of 0.129",
                   "`resid_post` changes more with a system prompt than between two unrelated user prompts "
                   "(0.323 against 0.129): the effect lies above the control floor, with its whole 95% CI (0.303 to "
                   "0.345) above it.",
                   "Longer system prompts go with larger internal change: Pearson r = 0.614 (95% CI 0.346 to 0.798; "
                   "p = 0.0014; n = 12 system prompts × 8 user prompts, both resampled); Spearman r = 0.672 (95% CI "
                   "0.21 to 0.9)",
                   "System prompts tagged `nonsense` change the model less than those without: difference -0.116 "
                   "(simultaneous 95% CI over 3 tags -0.161 to -0.0701, Bonferroni-adjusted p < 0.001; 2 against 10 "
                   "system prompts).",
                   "For the other 1 testable tag there is no evidence of an effect.", "Not tested: `french`",
                   "sink 66.2%",
                   "The layer and component whose change tracks `kl` most closely, chosen on 4 of the user prompts "
                   "and measured on the other 4 (a fixed split, seed 0), is `rel_change` of `mlp_out` layer 9 (r = "
                   "0.702 there); on the held-out prompts r = 0.649 (95% CI 0.499 to 0.799; p < 0.001; 48 pairs): the "
                   "relation holds on prompts it was not chosen on.",
                   "mean KL(variant ‖ baseline) of 0.151", "15.0% of pairs", "edit distance of 0.128",
                   "output shift appears at layer 21"):
        assert needle in text, needle
    # components in the fixed order, whatever the JSON order
    heads = [re.match(r"`(\w+)` changes most", s) for s in findings(SUMMARY)]
    order = [m.group(1) for m in heads if m]
    assert order == ["resid_pre", "attn_out", "mlp_out", "resid_post"]


def test_every_number_in_findings_comes_from_summary():
    allowed = _numbers_in_summary(SUMMARY) | {pval(1 / SUMMARY["sample"]["n_boot"])}  # "p < 1 / n_boot"
    for sentence in findings(SUMMARY):
        # fixed vocabulary that contains digits but states no measurement
        stripped = sentence.replace(SUMMARY["model"], "").replace("95%", "").replace("top-1", "")
        assert SUMMARY["effects_note"] not in sentence  # metrics' own wording is not repeated when there is a verdict
        for num in NUMBER.findall(stripped):
            assert num.lstrip("-") in allowed or num in allowed, (num, sentence)


def test_findings_follow_the_values():
    s = copy.deepcopy(SUMMARY)
    s["most_affected_layer"]["resid_post"].update(layer=5, mean=0.12, ci=[0.1, 0.14])
    s["effects_above_control"] = False
    s["length"] = {"pearson_r": -0.1, "ci": [-0.4, 0.2], "p": 0.6, "spearman_r": -0.05}
    s["lens_shift_layer"] = None
    text = " ".join(findings(s))
    assert "`resid_post` changes most at layer 5:" in text and "layer 27" not in text
    assert "effect on `resid_post` does not rise above the control floor (0.12 against 0.129)" in text
    assert ("There is no evidence that the length of a system prompt goes with its internal change: Pearson r = "
            "-0.1, and its interval includes zero (95% CI -0.4 to 0.2; p = 0.6; n = 12 system prompts × 8 user "
            "prompts, both resampled)") in text
    assert "go with smaller internal change" not in text
    assert "no layer at which the output shift appears" in text
    assert "includes zero" not in " ".join(findings(SUMMARY))
    s = copy.deepcopy(SUMMARY)
    s["control_floor"]["resid_post"] = 0.31  # mean above the floor, CI lower bound below it: no verdict of "above"
    s["effects_above_control"] = False
    assert ("There is no evidence that the system-prompt effect on `resid_post` rises above the control floor: its "
            "mean exceeds the floor (0.323 against 0.31), but its 95% CI reaches down to 0.303 (48 pairs).") \
        in findings(s)
    # no tag survives the correction; the held-out correlation's interval includes zero
    s["tags"]["items"][0]["ci_simultaneous"] = [-0.2, 0.01]
    s["strongest_internal_output"].update(r=0.1, ci=[-0.2, 0.4], p=0.5)
    text = " ".join(findings(s))
    assert ("No tag changes the model distinguishably from zero: none of the 2 testable tags has a simultaneous 95% "
            "interval (Bonferroni over 3 tags) that excludes zero; n = 12 system prompts × 8 user prompts, both "
            "resampled.") in text and "tagged `nonsense`" not in text
    assert "the interval includes zero, so there is no evidence of the relation beyond the prompts it was chosen on" \
        in text
    # a small sample is named; a selection without a split says it is optimistic
    s["sample"].update(n_systems=5, small_systems=True, small=["system prompts"])
    s["selection"] = {"method": "same", "n_select": 8, "n_estimate": 8}
    s["strongest_internal_output"]["selection"] = "same"
    text = " ".join(findings(s))
    assert "Small sample: only 5 system prompts (fewer than 8)" in text
    # ... and nothing is claimed across so few system prompts, whatever the intervals say
    assert "With 5 system prompts (fewer than 8) there are too few to tell a length effect from the system " \
           "prompts' own effects, so none is claimed: Pearson r = 0.614" in text
    assert "so no tag effect is claimed (3 tags in the tables)" in text and "tagged `nonsense`" not in text
    s["effects_above_control"], s["control_floor"]["resid_post"] = True, 0.129
    assert ("with 5 system prompts (fewer than 8) this holds for these system prompts, not for system prompts in "
            "general.") in " ".join(findings(s))
    assert "chosen and measured on the same pairs, so it is optimistic" in text
    assert "chosen and measured on the same user prompts (too few to split), so its value is optimistic" in text
    s["effects_above_control"], s["effects_note"] = None, "no control pairs"
    assert "summary.json gives no verdict on the control floor (no control pairs)." in findings(s)


def test_partial_or_malformed_summary_drops_sentences_without_raising():
    assert findings({}) == []
    assert findings(None) == []  # type: ignore[arg-type]
    s = {"n_pairs": 3, "most_affected_layer": {"resid_post": {"layer": "x"}, "attn_out": None},
         "length": {"pearson_r": None}, "tags": [], "attention_shares": {"sink": "a"},
         "output": {"mean_kl": float("nan")}, "lens_shift_layer": "seven", "effects_above_control": "maybe"}
    assert findings(s) == ["The sweep compares 3 (user prompt, system prompt) pairs with their baselines."]


def test_report_text_changes_with_summary(tmp_path):
    # no tables: every figure is a note, so the report builds in well under a second
    (tmp_path / "summary.json").write_text(json.dumps(SUMMARY))
    first = build_report(tmp_path, strict=True).read_text(encoding="utf-8")
    assert "<code>resid_post</code> changes most at layer 27:" in first
    s = copy.deepcopy(SUMMARY)
    s["most_affected_layer"]["resid_post"]["layer"] = 3
    s["output"]["top1_change_rate"] = 0.5
    (tmp_path / "summary.json").write_text(json.dumps(s))
    second = build_report(tmp_path, strict=True).read_text(encoding="utf-8")
    assert "<code>resid_post</code> changes most at layer 3:" in second and "layer 27:" not in second
    assert "50.0% of pairs" in second and "15.0% of pairs" in first


def test_fake_results_write_every_documented_table(fake_results):
    from promptshift.vocabulary import CAUSAL_TABLES, CORE_TABLES

    assert set(TABLE_NAMES) == set(CORE_TABLES)
    assert set(CAUSAL_TABLE_NAMES) == set(CAUSAL_TABLES)
    for name in CAUSAL_TABLE_NAMES:
        assert (fake_results / f"{name}.parquet").is_file(), name
    for name in TABLE_NAMES:
        assert (fake_results / f"{name}.parquet").is_file(), name


# summary.json's `causal` section as promptshift/metrics/causal.py writes it (values from a real
# run on a tiny random model, a few changed so that every branch shows)
CAUSAL = {
    "patching": {"n_pairs": 9, "resampling": "crossed", "n_systems": 3, "n_users": 3, "n_layers": 4, "threshold": 0.5, "seconds": 3.8,
                 "modes": {"suffix": {"onset": {"site": 2, "ci": [2.0, 3.0], "undefined_share": 0.0},
                                      "recovered_mid": 0.6636, "recovered_final": 0.9999},
                           "last": {"onset": {"site": None, "ci": [None, None], "undefined_share": 0.75},
                                    "recovered_mid": 0.2395, "recovered_final": 0.9999}}},
    "knockout": {"n_pairs": 9, "resampling": "crossed", "n_systems": 3, "n_users": 3, "n_layers": 4, "threshold": 0.1,
                 "stops_mattering": {"site": 3, "ci": [3.0, 3.0], "undefined_share": 0.0},
                 "full_knockout_kl_ratio": 0.9522, "full_knockout_vs_baseline": 0.01206, "seconds": 2.05},
    "steering": {"n_pairs": 9, "resampling": "crossed", "n_systems": 3, "n_users": 3, "n_layers": 4,
                 "best": {"site": 3, "recovered": 0.5441, "ci": [0.5296, 0.5653], "recovered_select": 0.61,
                          "selection": "split", "n_users_estimate": 1},
                 "final_site": {"recovered": 0.9102, "ci": [None, 0.9383]}, "seconds": 0.14},
    "phrases": {"n_phrases": 4, "n_systems_split": 1, "attribution_vs_occlusion": {"spearman_r": 0.7, "p": 0.04,
                                                                                   "n_phrases": 9},
                "top_phrase_per_system": [{"system": "pirate", "phrase": "You are a pirate.", "kl_removed": 0.003216,
                                           "ci": [0.002822, 0.003495], "importance_output": 0.4307,
                                           "n_phrases": 2}],
                "attribution": "gradient x input", "seconds": 0.56},
    "multiturn": {"rule": "Start with Ahoy.", "n_conversations": 3, "n_turns": 8, "seconds": 5.5, "conditions": {
        "system": {"obey_first": 0.6667, "obey_last": 0.3333, "obey_mean": 0.5, "sys_mass_first": 0.4787,
                   "sys_mass_first_ci": [0.4509, 0.5074], "sys_mass_last": 0.07298,
                   "sys_mass_last_ci": [0.06908, 0.07560], "uniform_first": 0.4626, "uniform_last": 0.07274,
                   "turn_spearman": -0.9878, "turn_p": 2.99e-19},
        "system_plain": {"obey_first": 0.0, "obey_last": 0.0, "obey_mean": 0.0, "sys_mass_first": 0.4787,
                         "sys_mass_first_ci": [0.4509, 0.5074], "sys_mass_last": 0.07997,
                         "sys_mass_last_ci": [0.07011, 0.08563], "uniform_first": 0.4626, "uniform_last": 0.07869,
                         "turn_spearman": None, "turn_p": None},
        "no_system": {"obey_first": 0.3333, "obey_last": 0.3333, "obey_mean": 0.25, "sys_mass_first": 0.0,
                      "sys_mass_first_ci": [0.0, 0.0], "sys_mass_last": 0.0, "sys_mass_last_ci": [0.0, 0.0],
                      "uniform_first": 0.0, "uniform_last": 0.0, "turn_spearman": None, "turn_p": None}}},
}


def _causal_text(summary: dict) -> list[str]:
    base = findings({k: v for k, v in summary.items() if k != "causal"})
    return [x for x in findings(summary) if x not in base]


def test_causal_findings_say_what_the_summary_says():
    text = " ".join(_causal_text({**SUMMARY, "causal": CAUSAL}))
    for needle in ("site l = input of layer l, site 4 = the final residual",
                   "first recovers at least 50.0% of the output change (1 − KL ratio) at site 2 (95% CI of the site "
                   "2 to 3)", "halfway through the depth it recovers 66.4%",
                   "(`last`: patching the last prompt token only; site l = input of layer l, site 4 = the final "
                   "residual) never recovers 50.0% of the output change at any site, so its onset is undefined",
                   "leaves less than 10.0% of the full knockout's effect for every l from layer 3 on (95% CI of the "
                   "layer 3 to 3)", "KL(variant ‖ knocked-out) is 0.952 × KL(variant ‖ baseline)",
                   "KL(knocked-out ‖ baseline) is 0.0121 × KL(variant ‖ baseline)",
                   "The causal curves' intervals resample the 3 system prompts and 3 user prompts of the causal "
                   "analyses together; an onset is found again in every resample",
                   "works best at site 3 (site l = input of layer l; the final residual excluded; chosen on one half "
                   "of the user prompts), where it recovers 54.4% (95% CI 53.0% to 56.5%) of the output change (1 − KL "
                   "ratio) on the other half",
                   "at the final residual, where it edits the output directly, 91.0% (CI undefined)",
                   "`pirate`: “You are a pirate.” (KL(variant ‖ without it) = 0.00322, "
                   "95% CI 0.00282 to 0.00349; "
                   "43.1% of the output change lost without it)", "(1 such prompt, ",
                   "Spearman r = 0.7 (p = 0.04, 9 phrases)",
                   "3 scripted conversations under the rule “Start with Ahoy.”",
                   "falls from 47.9% (95% CI 45.1% to 50.7%) at the first turn to 7.3% (95% CI 6.9% to 7.6%) at the "
                   "last turn (turn 8), against 46.3% and 7.3% under uniform attention",
                   "Spearman r with the turn = -0.988, p = 3.0e-19",
                   "its Spearman correlation with the turn is undefined",
                   "the rule is obeyed in 66.7% of conversations at the first turn and 33.3% at the last (50.0% over "
                   "all turns)",
                   "With `no_system` (an empty system turn, with a history that obeys the rule), there are no "
                   "system-prompt tokens to attend to; the rule is obeyed in 33.3%"):
        assert needle in text, needle


def test_every_number_in_causal_findings_comes_from_summary():
    s = {**SUMMARY, "causal": CAUSAL}
    allowed = _numbers_in_summary(s)
    fixed = ("95% CI", "1 − KL ratio", "(1 = ", "(0 = ", "top-1")
    sentences = _causal_text(s)
    assert len(sentences) == 12  # resampling 1, patching 2, knockout 2, steering 1, phrases 2, multi-turn 1 + 3
    for sentence in sentences:
        stripped = sentence
        for f in fixed:
            stripped = stripped.replace(f, "")
        for num in NUMBER.findall(stripped):
            assert num.lstrip("-") in allowed or num in allowed, (num, sentence)


def test_causal_findings_follow_the_values_and_survive_bad_input():
    s = copy.deepcopy(CAUSAL)
    s["multiturn"]["conditions"]["system"]["sys_mass_last"] = 0.9
    s["knockout"]["stops_mattering"] = {"site": None, "ci": [None, None], "undefined_share": 1.0}
    s["phrases"]["attribution_vs_occlusion"] = None
    text = " ".join(findings({"causal": s}))
    assert "rises from 47.9%" in text and "no layer after which it stops mattering is defined" in text
    assert "Token attribution was not compared with phrase removal" in text
    assert findings({"causal": {}}) == [] and findings({"causal": None}) == []
    bad = {"patching": {"modes": {"suffix": None, "last": {"onset": "x"}}}, "knockout": [],
           "steering": {"best": {"site": "a"}}, "phrases": {"top_phrase_per_system": [None, {"system": 1}]},
           "multiturn": {"conditions": {"system": {"sys_mass_first": "a"}, "x": 3}}}
    assert findings({"causal": bad}) == []
    assert findings({"n_pairs": 3, "causal": bad}) == findings({"n_pairs": 3})


# summary.json's `behaviour` block as promptshift/metrics/behaviour.py writes it
def _cell(mean, lo, hi, n=16, und=0):
    return {"mean": mean, "ci": [lo, hi], "n_pairs": n, "n_undecided": und}


BEHAVIOUR = {
    "pooled": {"adherence_variant": _cell(0.72, 0.6, 0.83), "adherence_baseline": _cell(0.12, 0.05, 0.2),
               "adherence_change": _cell(0.6, 0.45, 0.74), "correct_variant": _cell(0.55, 0.42, 0.66),
               "correct_baseline": _cell(0.61, 0.5, 0.7), "correct_change": _cell(-0.06, -0.15, 0.03),
               "words_change": _cell(-11.5, -15.2, -7.9)},
    "systems": [
        {"system": "answer_french", "checks": "language:fr", "adherence_variant": _cell(0.875, 0.7, 1.0),
         "adherence_baseline": _cell(0.0, 0.0, 0.0), "adherence_change": _cell(0.875, 0.7, 1.0),
         "correct_variant": _cell(0.25, 0.1, 0.45), "correct_baseline": _cell(0.625, 0.4, 0.8),
         "correct_change": _cell(-0.375, -0.6, -0.15), "words_change": _cell(-2.0, -6.0, 2.0)},
        {"system": "concise_short", "checks": "max_words:15", "adherence_variant": _cell(0.4375, 0.2, 0.7),
         "adherence_baseline": _cell(0.3125, 0.1, 0.55), "adherence_change": _cell(0.125, -0.1, 0.35),
         "correct_variant": _cell(0.6, 0.4, 0.8), "correct_baseline": _cell(0.625, 0.4, 0.8),
         "correct_change": _cell(-0.025, -0.2, 0.15), "words_change": _cell(-20.5, -25.0, -16.0)},
        {"system": "nonsense", "checks": "", "adherence_variant": _cell(None, None, None, 0),
         "adherence_baseline": _cell(None, None, None, 0), "adherence_change": _cell(None, None, None, 0),
         "correct_variant": _cell(0.6, 0.4, 0.8), "correct_baseline": _cell(0.625, 0.4, 0.8),
         "correct_change": _cell(-0.025, -0.2, 0.15), "words_change": _cell(1.0, -3.0, 5.0)},
    ],
    "n_systems_with_checks": 9, "n_pairs": 96, "n_pairs_with_checks": 72, "n_pairs_with_expected": 56,
    "unfinished_replies": 31, "n_replies": 104,
    "strongest_internal": {
        "adherence_change": {"component": "resid_post", "layer": 14, "measure": "rel_change", "output":
                             "adherence_change", "method": "pearson", "r": 0.41, "ci": [0.18, 0.6], "p": 0.002,
                             "n_pairs": 36, "r_select": 0.52, "n_select": 36, "selection": "split"},
        "correct_change": {"component": "mlp_out", "layer": 20, "measure": "rel_change", "output": "correct_change",
                           "method": "pearson", "r": -0.12, "ci": [-0.4, 0.15], "p": 0.4, "n_pairs": 28,
                           "r_select": -0.35, "n_select": 28, "selection": "split"},
        "words_change": None},
}
CONTINUATION = {"n_pairs": 9, "resampling": "crossed", "n_systems": 3, "n_users": 3, "n_layers": 4, "threshold": 0.5,
                "max_tokens": 16, "lp_v_mean": -0.9, "lp_b_mean": -2.4,
                "modes": {"suffix": {"onset": {"site": 3, "ci": [3.0, 4.0], "undefined_share": 0.0},
                                     "recovered_mid": 0.41, "recovered_final": 0.93},
                          "last": {"onset": {"site": None, "ci": [None, None], "undefined_share": 1.0},
                                   "recovered_mid": 0.02, "recovered_final": 0.31}}}


def _behaviour_text(s):
    full = findings(s)
    base = set(findings({k: v for k, v in s.items() if k != "behaviour"} | {"causal": {}}))
    return [x for x in full if x not in base]


def test_behaviour_findings_claim_only_what_the_intervals_support():
    s = {**SUMMARY, "behaviour": BEHAVIOUR}
    text = " ".join(_behaviour_text(s))
    for needle in (
            "Replies follow the instructions the system prompts declare checks for: 72.0% of their checks passed with "
            "the system prompt against 12.0% without (change +60.0 percentage points; 95% CI +45.0 to +74.0; n = 9 "
            "system prompts with checks × 8 user prompts, both resampled).",
            "`answer_french` (language:fr: 0.0% → 87.5%)", "No evidence of a change in adherence for `concise_short`.",
            "There is no evidence that the system prompts change how often the answer is right: 55.0% of expected "
            "answers given with the system prompt against 61.0% without (change -6.0 percentage points; 95% CI -15.0 "
            "to +3.0; 56 pairs with an expected answer",
            "Correct answers drop", "under `answer_french` (62.5% → 25.0%)",
            "Replies get shorter with a system prompt: -11.5 words on average (95% CI -15.2 to -7.9).",
            "31 of 104 replies used their whole token budget without finishing",
            "best predicts the change in adherence, chosen on 4 of the user prompts and measured on the other 4 (a "
            "fixed split, seed 0), is `resid_post` layer 14: r = 0.41 (95% CI 0.18 to 0.6; 36 pairs): the relation "
            "holds on prompts it was not chosen on.",
            "is `mlp_out` layer 20: r = -0.12 (95% CI -0.4 to 0.15; 28 pairs): the interval includes zero"):
        assert needle in text, needle
    assert "`nonsense`" not in text  # no checks: neither followed nor "no evidence"
    # the same numbers with the pooled adherence interval reaching zero: no claim
    s2 = copy.deepcopy(s)
    s2["behaviour"]["pooled"]["adherence_change"] = _cell(0.06, -0.02, 0.15)
    t2 = " ".join(_behaviour_text(s2))
    assert "There is no evidence that the system prompts' declared checks are followed more often" in t2
    assert "Replies follow the instructions" not in t2
    # fewer than 8 system prompts with checks is named
    s3 = copy.deepcopy(s)
    s3["behaviour"]["n_systems_with_checks"] = 3
    assert any(x.startswith("Only 3 system prompts declare checks: a small sample") for x in _behaviour_text(s3))
    # a malformed block drops its sentences, never raises
    assert _behaviour_text({**SUMMARY, "behaviour": {"pooled": None}}) == []
    assert _behaviour_text({**SUMMARY, "behaviour": []}) == []


def test_every_number_in_behaviour_findings_comes_from_summary():
    from promptshift.report.findings import pp

    s = {**SUMMARY, "behaviour": BEHAVIOUR, "causal": {"continuation": CONTINUATION,
                                                       "patching": CAUSAL["patching"]}}
    allowed = _numbers_in_summary(s)

    def walk(o):
        if isinstance(o, dict):
            for v in o.values():
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)
        elif isinstance(o, (int, float)) and not isinstance(o, bool):
            allowed.add(pp(o))
    walk(s)
    sentences = [x for x in findings(s) if x not in set(findings(SUMMARY))]
    assert len(sentences) >= 10
    for sentence in sentences:
        stripped = sentence.replace("95%", "").replace("1 − KL ratio", "")  # fixed vocabulary, no measurement
        for num in NUMBER.findall(stripped):
            assert num.lstrip("-+") in allowed or num in allowed or f"+{num}" in allowed, (num, sentence)


def test_continuation_findings():
    text = " ".join(findings({"causal": {"continuation": CONTINUATION, "patching": CAUSAL["patching"]}}))
    assert ("Scored on the variant's whole reply (its first 16 tokens, teacher-forced mean log-probability), `suffix` "
            "patching first recovers half at site 3 (95% CI of the site 3 to 4); the first answer token's onset is "
            "site 2, so the reply needs the instruction beyond what carries its first token.") in text
    assert "`last` patching never recovers half of the reply's log-probability, so its onset is undefined" in text
