"""Behaviour tables from a store whose continuations are written by hand: the per-prompt,
per-check, per-pair and per-system-prompt tables against plain per-pair loops, a few
verdicts a reader checks by eye, and the bootstrap intervals against a loop over the
resamples."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from promptshift.errors import MetricsError
from promptshift.metrics import compute
from promptshift.metrics.bootstrap import percentile_ci, user_weights
from promptshift.sweep.behaviour import correct, count_words, evaluate, parse_checks
from promptshift.sweep.config import SweepConfig, SystemPrompt, UserPrompt
from tests.metrics import synth

N_BOOT = 200

SYSTEMS = [
    SystemPrompt("brief", "Be brief.", checks=parse_checks([{"max_words": 3}], "t")),
    SystemPrompt("french", "Always answer in French.", checks=parse_checks([{"language": "fr"}], "t")),
    SystemPrompt("json", "Reply with JSON only.", checks=parse_checks([{"json": True}, {"contains": "answer"}], "t")),
    SystemPrompt("plain", "Be nice."),
]
USERS = [
    UserPrompt("capital", "What is the capital of France?", "factual", expected="Paris"),
    UserPrompt("add", "What is 2 + 3?", "reasoning", expected="5", match="number"),
    UserPrompt("poem", "Write a short poem about rain.", "creative"),
    UserPrompt("color", "Name a color.", "factual", expected="red", match="exact"),
]
# (system, user) -> (continuation text, finished)
REPLIES = {
    ("empty_system", "capital"): ("The capital of France is Paris.", True),
    ("empty_system", "add"): ("2 + 3 equals 5", True),
    ("empty_system", "poem"): ("Rain falls softly on the roof and", False),
    ("empty_system", "color"): ("Red", True),
    ("brief", "capital"): ("Paris.", True),
    ("brief", "add"): ("Five", True),
    ("brief", "poem"): ("Rain, rain", True),
    ("brief", "color"): ("red", True),
    ("french", "capital"): ("La capitale de la France est Paris.", True),
    ("french", "add"): ("Deux plus trois font 5", False),
    ("french", "poem"): ("La pluie tombe doucement sur le toit de la maison", True),
    ("french", "color"): ("Rouge", True),
    ("json", "capital"): ('{"answer": "Paris"}', True),
    ("json", "add"): ('{"answer": 5}', True),
    ("json", "poem"): ('{"answer": "Rain', False),
    ("json", "color"): ("Sure! red", True),
    ("plain", "capital"): ("The capital of France is Paris.", True),
    ("plain", "add"): ("I'm sorry, I cannot do math.", True),
    ("plain", "poem"): ("Rain falls softly on the roof and", True),
    ("plain", "color"): ("Red", True),
}


def _sweep(**kw) -> SweepConfig:
    return SweepConfig(name="beh", system_prompts=SYSTEMS, user_prompts=USERS, keep="last", storage_dtype="float32",
                       block_prompts=4, max_new_tokens=6, top_k=8, lens_top_k=4, **kw)


@pytest.fixture(scope="module")
def beh(tok):
    store, _ = synth.build(None, keep="last", tok=tok, sweep=_sweep(), replies=lambda s, u: REPLIES[(s, u)])
    return store, compute(store, workers=0, n_boot=N_BOOT, progress=False)


def test_prompt_table(beh):
    store, t = beh
    b = t["behaviour"].set_index("prompt")
    pr = store.plan.prompts
    assert len(b) == len(pr)
    for p in range(len(pr)):
        text, fin = REPLIES[(pr["system"].iat[p], pr["user_id"].iat[p])]
        row = b.loc[p]
        assert row["reply"] == text and row["finished"] == fin
        assert row["reply_words"] == len(text.split())
        n = int(store.array("gen_len")[p])
        assert row["reply_tokens"] == n - int(fin)  # a finished continuation ends with its end-of-sequence token
    # verdicts a reader checks by eye
    by = b.reset_index().set_index(["system", "user_id"])
    assert by.loc[("empty_system", "capital"), "correct"] == 1.0
    assert by.loc[("brief", "add"), "correct"] == 0.0  # "Five": no number
    assert np.isnan(by.loc[("french", "add"), "correct"])  # unfinished: more numbers may follow
    assert by.loc[("french", "color"), "correct"] == 0.0  # exact "red" vs "Rouge"
    assert np.isnan(by.loc[("empty_system", "poem"), "correct"])  # no expected answer
    assert by.loc[("plain", "add"), "refusal"] and not by.loc[("plain", "capital"), "refusal"]
    assert by.loc[("french", "capital"), "language"] == "fr" and by.loc[("brief", "capital"), "language"] is not None
    assert by.loc[("json", "capital"), "valid_json"] == 1.0 and by.loc[("json", "color"), "valid_json"] == 0.0
    assert np.isnan(by.loc[("json", "poem"), "valid_json"])


def test_checks_and_pairs_against_a_plain_loop(beh):
    store, t = beh
    ch = t["behaviour_checks"]
    pb = t["behaviour_pairs"].set_index("pair")
    checks = {s.name: s.checks for s in SYSTEMS}
    exp = {u.id: (u.expected, u.match or "contains") for u in USERS if u.expected is not None}
    rows = []
    for _, pa in store.plan.pairs.iterrows():
        (tv, fv), (tb, fb) = REPLIES[(pa.system, pa.user_id)], REPLIES[("empty_system", pa.user_id)]
        verdicts = []
        for c in checks[pa.system]:
            v, b = evaluate(c, tv, fv), evaluate(c, tb, fb)
            v, b = (np.nan if x is None else float(x) for x in (v, b))
            verdicts.append((v, b))
            rows.append(dict(pair=pa.pair, check=c.label, variant=v, baseline=b, change=v - b))
        r = pb.loc[pa.pair]
        assert r["n_checks"] == len(checks[pa.system])
        vs, bs = [v for v, _ in verdicts], [b for _, b in verdicts]
        both = [v - b for v, b in verdicts if not (np.isnan(v) or np.isnan(b))]
        for col, vals in (("adherence_variant", vs), ("adherence_baseline", bs), ("adherence_change", both)):
            vals = [x for x in vals if not np.isnan(x)]
            want = np.mean(vals) if vals else np.nan
            assert (np.isnan(r[col]) and np.isnan(want)) or r[col] == pytest.approx(want), (pa.system, pa.user_id, col)
        if pa.user_id in exp:
            cv, cb = (correct(x, *exp[pa.user_id], f) for x, f in ((tv, fv), (tb, fb)))
            cv, cb = (np.nan if x is None else float(x) for x in (cv, cb))
            for col, want in (("correct_variant", cv), ("correct_baseline", cb), ("correct_change", cv - cb)):
                assert (np.isnan(r[col]) and np.isnan(want)) or r[col] == want
        else:
            assert np.isnan(r["correct_variant"]) and np.isnan(r["correct_change"])
        assert r["words_change"] == count_words(tv) - count_words(tb)
        assert r["finished_variant"] == fv and r["finished_baseline"] == fb
    ref = pd.DataFrame(rows).sort_values(["pair", "check"]).reset_index(drop=True)
    got = ch.sort_values(["pair", "check"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(got[ref.columns], ref, check_dtype=False)
    # by eye: the brief system prompt shortens "The capital of France is Paris." to "Paris."
    brief_cap = pb[(pb["system"] == "brief") & (pb["user_id"] == "capital")].iloc[0]
    assert (brief_cap["adherence_variant"], brief_cap["adherence_baseline"]) == (1.0, 0.0)
    fr_cap = pb[(pb["system"] == "french") & (pb["user_id"] == "capital")].iloc[0]
    assert (fr_cap["adherence_variant"], fr_cap["adherence_baseline"], fr_cap["language_changed"]) == (1.0, 0.0, True)


def test_system_table_intervals_against_resample_loop(beh):
    store, t = beh
    pb = t["behaviour_pairs"]
    sy = t["behaviour_systems"]
    users = [u.id for u in USERS]
    w = user_weights(len(users), N_BOOT, 0)  # per system prompt: user prompts resampled
    assert set(sy["system"]) == {s.name for s in SYSTEMS} | {"__all__"}
    for (system, measure), row in sy[sy["system"] != "__all__"].set_index(["system", "measure"]).iterrows():
        d = pb[pb["system"] == system]
        x = d[measure].to_numpy(np.float64)
        ok = np.isfinite(x)
        assert row["n_pairs"] == ok.sum()
        if not ok.any():
            assert np.isnan(row["mean"])
            continue
        u = np.asarray([users.index(x) for x in d["user_id"]])[ok]
        assert row["mean"] == pytest.approx(x[ok].mean())
        boot = np.array([(wb[u] * x[ok]).sum() / wb[u].sum() if wb[u].sum() else np.nan for wb in w])
        lo, hi = percentile_ci(boot)
        assert row["ci_low"] == pytest.approx(lo) and row["ci_high"] == pytest.approx(hi)
    adh = sy[sy["measure"] == "adherence_change"].set_index("system")
    assert adh.loc["brief", "checks"] == "max_words:3" and adh.loc["json", "checks"] == "json; contains:answer"
    assert np.isnan(adh.loc["plain", "mean"]) and adh.loc["plain", "n_undecided"] == 0
    # the baseline's poem reply is unfinished and long: max_words can be decided (too long), not the rest
    corr = sy[sy["measure"] == "correct_variant"].set_index("system")
    assert corr.loc["french", "n_undecided"] == 1  # "Deux plus trois font 5", cut at the budget


def test_judging_sweep_replaces_the_stored_checks(beh, tok):
    store, _ = beh
    other = _sweep()
    other.system_prompts = [SystemPrompt(s.name, s.text, checks=parse_checks([{"max_words": 2}], "t"))
                            for s in SYSTEMS]
    other.__post_init__()
    t = compute(store, workers=0, n_boot=20, progress=False, sweep=other)
    assert set(t["behaviour_checks"]["check"]) == {"max_words:2"}
    changed = _sweep()
    changed.user_prompts = USERS[:3]
    changed.__post_init__()
    with pytest.raises(MetricsError, match="differs from the store's beyond its checks"):
        compute(store, workers=0, n_boot=20, progress=False, sweep=changed)


def test_pooled_rows_against_materialised_crossed_resamples(beh):
    """The `__all__` rows generalise over system prompts: mean over every pair, interval from
    the pigeonhole resamples (system and user prompts drawn independently, every drawn cell
    kept), materialised here as one weight per pair."""
    from promptshift.metrics.bootstrap import crossed_weights

    store, t = beh
    pb, sy = t["behaviour_pairs"], t["behaviour_systems"]
    systems, users = [s.name for s in SYSTEMS], [u.id for u in USERS]
    ws, wu = crossed_weights(len(systems), len(users), N_BOOT, 0)
    s_idx = np.asarray([systems.index(x) for x in pb["system"]])
    u_idx = np.asarray([users.index(x) for x in pb["user_id"]])
    for m in ("adherence_change", "correct_variant", "words_change"):
        row = sy[(sy["system"] == "__all__") & (sy["measure"] == m)].iloc[0]
        x = pb[m].to_numpy(np.float64)
        ok = np.isfinite(x)
        assert row["mean"] == pytest.approx(x[ok].mean()) and row["n_pairs"] == ok.sum()
        w = ws[:, s_idx[ok]] * wu[:, u_idx[ok]]  # (B, n) multiplicity of each pair in each resample
        with np.errstate(invalid="ignore"):
            boot = (w * x[ok]).sum(1) / w.sum(1)
        lo, hi = percentile_ci(boot)
        assert row["ci_low"] == pytest.approx(lo) and row["ci_high"] == pytest.approx(hi)


def test_internal_vs_behaviour_against_scipy(beh):
    """r of each layer's internal change with each behaviour change, across the pairs where
    the behaviour is defined, equals scipy's."""
    from scipy import stats

    store, t = beh
    io = t["internal_vs_behaviour"]
    assert set(io["output"]) == {"adherence_change", "correct_change", "words_change"}
    cc = t["component_change"]
    last = cc[~cc["is_control"] & (cc["position"] == "last") & (cc["component"] == "resid_post")]
    pb = t["behaviour_pairs"].set_index("pair")
    for output in ("adherence_change", "words_change"):
        for layer, g in last.groupby("layer"):
            g = g.sort_values("pair")
            y = pb.loc[g["pair"], output].to_numpy(np.float64)
            ok = np.isfinite(y)
            row = io[(io.component == "resid_post") & (io.layer == layer) & (io.measure == "rel_change")
                     & (io.output == output) & (io.method == "pearson")].iloc[0]
            assert row["n"] == ok.sum()
            if ok.sum() >= 3 and np.ptp(y[ok]) > 0:
                assert row["r"] == pytest.approx(stats.pearsonr(g["rel_change"].to_numpy()[ok], y[ok]).statistic)


def test_summary_block(beh, tmp_path):
    store, t = beh
    compute(store, tmp_path / "res", workers=0, n_boot=N_BOOT, progress=False)
    import json

    b = json.loads((tmp_path / "res" / "summary.json").read_text())["behaviour"]
    sy = t["behaviour_systems"]
    pooled = sy[(sy["system"] == "__all__") & (sy["measure"] == "adherence_change")].iloc[0]
    assert b["pooled"]["adherence_change"]["mean"] == pytest.approx(pooled["mean"])
    assert [x["system"] for x in b["systems"]] == ["brief", "french", "json", "plain"]
    assert b["n_systems_with_checks"] == 3 and b["n_pairs"] == 16 and b["n_pairs_with_checks"] == 12
    beh_t = t["behaviour"]
    assert b["unfinished_replies"] == int((~beh_t["finished"]).sum()) == 3  # baseline poem, french add, json poem
    assert set(b["strongest_internal"]) == {"adherence_change", "correct_change", "words_change"}


def test_results_doc_names_every_behaviour_column_written(beh):
    """docs/RESULTS.md's entry for each behaviour table names every column the metrics stage
    writes (and behaviour_systems' every measure, internal_vs_behaviour's every output)."""
    import re

    from tests.conftest import REPO

    text = (REPO / "docs" / "RESULTS.md").read_text(encoding="utf-8")

    def documented(table: str) -> set[str]:
        start = text.index(f"### {table}.parquet")
        end = min(i for i in (text.find("\n### ", start + 1), text.find("\n## ", start + 1)) if i > 0)
        return set(re.findall(r"`([^`]+)`", text[start:end]))

    _, t = beh
    for name in ("behaviour", "behaviour_checks", "behaviour_pairs", "behaviour_systems"):
        cols = set(t[name].columns)
        assert cols <= documented(name), (name, cols - documented(name))
    assert set(t["behaviour_systems"]["measure"]) <= documented("behaviour_systems")
    assert set(t["internal_vs_behaviour"]["output"]) <= documented("internal_vs_behaviour")
    # internal_vs_behaviour is documented as internal_vs_output's columns: they are the same
    assert list(t["internal_vs_behaviour"].columns) == list(t["internal_vs_output"].columns)
