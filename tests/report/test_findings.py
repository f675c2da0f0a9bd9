"""The findings text is generated from summary.json only: change a value, the text changes;
every number in the text is a summary value; a partial summary gives partial findings."""

from __future__ import annotations

import copy
import json
import re

from promptshift.report import build_report, findings
from promptshift.report.findings import fmt, layer, pct, pval

from .conftest import TABLE_NAMES

SUMMARY = {
    "n_pairs": 96, "n_controls": 4, "model": "SmolLM2-135M-Instruct",
    "most_affected_layer": {
        "resid_post": {"layer": 27, "mean": 0.3234, "ci": [0.303, 0.345]},
        "attn_out": {"layer": 9, "mean": 0.783, "ci": [0.72, 0.833]},
        "mlp_out": {"layer": 22, "mean": 0.789, "ci": [0.715, 0.841]},
        "resid_pre": {"layer": 29, "mean": 0.313, "ci": [0.291, 0.329]},
    },
    "control_floor": {"resid_post": 0.129, "attn_out": 0.279, "mlp_out": 0.252, "resid_pre": 0.12},
    "effects_above_control": True,
    "effects_note": "resid_post rel_change at the last token peaks at layer 27 with mean 0.3234 over pairs",
    "impact_component": "resid_post",
    "length": {"pearson_r": 0.614, "ci": [0.346, 0.798], "p": 0.0014, "spearman_r": 0.672},
    "top_tag": {"tag": "nonsense", "diff": -0.116, "ci": [-0.153, -0.0796]},
    "attention_shares": {"sink": 0.662, "system": 0.043, "user": 0.121, "gen_prompt": 0.132, "template": 0.041},
    "strongest_internal_output": {"component": "mlp_out", "layer": 9, "measure": "rel_change", "output": "kl",
                                  "r": 0.649,
                                  "ci": [0.499, 0.799]},
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
                   "`resid_post` changes most at layer 27: mean relative change 0.323 (95% CI 0.303 to 0.345), "
                   "against a control floor of 0.129",
                   "`resid_post` changes more with a system prompt than between two unrelated user prompts "
                   "(0.323 against 0.129): the effect lies above the control floor.",
                   "Pearson r = 0.614 (95% CI 0.346 to 0.798, p = 0.0014)", "Spearman r = 0.672", "`nonsense`",
                   "by 0.116 less", "sink 66.2%", "`rel_change` of `mlp_out` layer 9",
                   "r = 0.649", "mean KL(variant ‖ baseline) of 0.151", "15.0% of pairs", "edit distance of 0.128",
                   "output shift appears at layer 21"):
        assert needle in text, needle
    # components in the fixed order, whatever the JSON order
    order = [re.match(r"`(\w+)` changes most", s).group(1) for s in findings(SUMMARY) if "changes most" in s]
    assert order == ["resid_pre", "attn_out", "mlp_out", "resid_post"]


def test_every_number_in_findings_comes_from_summary():
    allowed = _numbers_in_summary(SUMMARY)
    for sentence in findings(SUMMARY):
        # fixed vocabulary that contains digits but states no measurement
        stripped = sentence.replace(SUMMARY["model"], "").replace("95% CI", "").replace("top-1", "")
        assert SUMMARY["effects_note"] not in sentence  # metrics' own wording is not repeated when there is a verdict
        for num in NUMBER.findall(stripped):
            assert num.lstrip("-") in allowed or num in allowed, (num, sentence)


def test_findings_follow_the_values():
    s = copy.deepcopy(SUMMARY)
    s["most_affected_layer"]["resid_post"]["layer"] = 5
    s["effects_above_control"] = False
    s["length"] = {"pearson_r": -0.1, "ci": [-0.4, 0.2], "p": 0.6, "spearman_r": -0.05}
    s["lens_shift_layer"] = None
    text = " ".join(findings(s))
    assert "`resid_post` changes most at layer 5:" in text and "layer 27" not in text
    assert "effect on `resid_post` does not rise above the control floor (0.323 against 0.129)" in text
    assert "go with smaller internal change" in text and "includes zero" in text
    assert "no layer at which the output shift appears" in text
    assert "includes zero" not in " ".join(findings(SUMMARY))
    s = copy.deepcopy(SUMMARY)
    s["control_floor"]["resid_post"] = 0.31  # mean above the floor, CI lower bound below it
    assert "but its 95% CI reaches down to 0.303, below the floor" in " ".join(findings(s))
    s["effects_above_control"], s["effects_note"] = None, "no control pairs"
    assert "summary.json gives no verdict on the control floor (no control pairs)." in findings(s)


def test_partial_or_malformed_summary_drops_sentences_without_raising():
    assert findings({}) == []
    assert findings(None) == []  # type: ignore[arg-type]
    s = {"n_pairs": 3, "most_affected_layer": {"resid_post": {"layer": "x"}, "attn_out": None},
         "length": {"pearson_r": None}, "top_tag": [], "attention_shares": {"sink": "a"},
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
    from promptshift.report.tables import TABLES

    assert set(TABLE_NAMES) == set(TABLES)
    for name in TABLE_NAMES:
        assert (fake_results / f"{name}.parquet").is_file(), name
