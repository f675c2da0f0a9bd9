"""Instruction placement on a tiny model: instruction prefixes go through extraction and
metrics like system prompts, the system-prompt analyses leave them out, and the placement
tables equal plain loops over the per-pair tables and the stored attention rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from promptshift.vocabulary import REGION_CODE
from tests.conftest import tiny_llama, write_sweep


@pytest.fixture(scope="module")
def run(tok, tmp_path_factory):
    import promptshift.metrics as metrics
    from promptshift.extract.worker import ExtractConfig, fill_shard
    from promptshift.sweep.config import load_sweep

    d = tmp_path_factory.mktemp("placement")
    users = [{"id": "capital", "text": "What is the capital of France?", "category": "factual"},
             {"id": "add", "text": "What is 2 + 3?", "category": "reasoning"},
             {"id": "empty", "text": "", "category": "edge"},
             {"id": "poem", "text": "Write a short poem about rain.", "category": "creative"}]
    path = write_sweep(d / "p.yaml", users=users, max_new_tokens=2, storage_dtype="float32", top_k=8, lens_top_k=4,
                       instruction_prefixes=[{"name": "brief", "text": "Be brief."},
                                             {"name": "arr", "text": "You are a pirate.", "same_as": "pirate"},
                                             {"name": "lone", "text": "Answer in one word."}])
    sweep = load_sweep(path)
    store = fill_shard(sweep, ExtractConfig(store=None, progress=False), model=tiny_llama(tok, seed=3), tok=tok)
    tables = metrics.compute(store, d / "out", workers=0, n_boot=100, progress=False)
    return store, tables, sweep, d / "out"


def test_prefix_pairs_in_every_per_pair_table(run):
    store, tables, sweep, out = run
    plan = store.plan
    assert len(plan.pairs) == (3 + 3) * 4
    pre = plan.pairs[plan.pairs.placement == "prefix"]
    for name in ("component_change", "attention_change", "output_change", "lens_change"):
        t = tables[name]
        got = t[t.pair >= 0]
        assert set(got.pair) == set(plan.pairs.pair), name
        assert (got.loc[got.pair.isin(pre.pair), "placement"] == "prefix").all(), name
        assert set(got.loc[got.placement == "prefix", "system"]) == {"prefix:brief", "prefix:arr", "prefix:lone"}
    # the analyses of system prompts leave the prefixes out
    lr = tables["layer_ranking"]
    assert (lr["n_pairs"] == 3 * 4).all()
    assert set(tables["length_impact"]["system"]) == {"brief", "pirate", "french"}
    import json

    s = json.loads((out / "summary.json").read_text())
    assert s["n_pairs"] == 3 * 4
    oc = tables["output_change"]
    sys_oc = oc[oc.placement == "system"]
    assert s["output"]["mean_kl"] == pytest.approx(sys_oc["kl"].mean())
    ar = tables["attention_regions"]
    pre_prompts = set(pre.variant)
    got = ar[ar.prompt.isin(pre_prompts) & (ar.region == "prefix") & (ar.scope == "last")]
    assert len(got) and (got["mass"] > 0).all()


def test_placement_tables_equal_plain_loops(run):
    store, tables, sweep, out = run
    plan = store.plan
    pairs = plan.pairs.set_index("pair")
    cc = tables["component_change"]
    last = cc[(cc.position == "last") & ~cc.is_control]
    # placement_layers: plain means of the per-pair rows
    pl = tables["placement_layers"].set_index(["system", "component", "layer"])
    for label in ("prefix:brief", "brief", "prefix:lone"):
        g = last[(last.system == label) & (last.component == "resid_post")].groupby("layer").rel_change.mean()
        assert np.allclose(pl.loc[(label, "resid_post"), "mean"].to_numpy(), g.to_numpy(), atol=1e-12)
    assert set(pl.reset_index().query("system == 'prefix:lone'").placement) == {"prefix"}
    # placement_compare: matched by name (brief) and by same_as (pirate / arr); `lone` has no match
    pc = tables["placement_compare"]
    assert set(zip(pc.system_prompt, pc.prefix)) == {("brief", "brief"), ("pirate", "arr"), ("all", "all")}
    users = [u.id for u in sweep.user_prompts]
    from promptshift.metrics.bootstrap import user_weights

    w = user_weights(len(users), 100, 0)
    oc = tables["output_change"].set_index("pair")
    imp = last[last.component == "resid_post"].groupby("pair").rel_change.mean()
    # the last token's attention to the instruction's own tokens, from the stored rows
    attn = {}
    for p, r in pairs.iterrows():
        row = store.attn_last_row(int(r.variant)).astype(np.float64)  # (n, L, NH)
        reg = plan.prompt_regions(int(r.variant))
        code = REGION_CODE["prefix" if r.placement == "prefix" else "system"]
        attn[p] = row[reg == code].sum(0).mean(-1).mean()
    values = {"impact": imp, "kl": oc["kl"], "top1_changed": oc["top1_changed"].astype(float),
              "attn_instruction": pd.Series(attn)}
    for sys_name, pre_name in (("brief", "brief"), ("pirate", "arr")):
        for m, v in values.items():
            row = pc[(pc.system_prompt == sys_name) & (pc.measure == m)].iloc[0]
            per_user = {}
            for lab, side in ((sys_name, 0), (f"prefix:{pre_name}", 1)):
                ps = pairs[pairs.system == lab]
                per_user[side] = np.array([v[ps.index[ps.user_id == u][0]] for u in users])
            assert abs(row.system_value - per_user[0].mean()) <= 1e-9 and abs(row.prefix_value - per_user[1].mean()) <= 1e-9
            # paired bootstrap over user prompts: both placements of a user prompt drawn together
            boots = [(wb @ per_user[1] - wb @ per_user[0]) / wb.sum() for wb in w]
            lo, hi = np.percentile(boots, [2.5, 97.5])
            assert abs(row.ci_low - lo) <= 1e-9 and abs(row.ci_high - hi) <= 1e-9, (sys_name, m)
        # where in depth: argmax and change-weighted mean layer of the per-layer mean profile
        for comp in ("attn_out", "resid_post"):
            prof = [last[(last.system == lab) & (last.component == comp)].groupby("layer").rel_change.mean().to_numpy()
                    for lab in (sys_name, f"prefix:{pre_name}")]
            peak = pc[(pc.system_prompt == sys_name) & (pc.measure == f"peak_layer:{comp}")].iloc[0]
            depth = pc[(pc.system_prompt == sys_name) & (pc.measure == f"depth:{comp}")].iloc[0]
            assert (peak.system_value, peak.prefix_value) == (np.argmax(prof[0]), np.argmax(prof[1]))
            cen = [float((np.arange(len(x)) * x).sum() / x.sum()) for x in prof]
            assert np.allclose([depth.system_value, depth.prefix_value], cen, atol=1e-12)
    allrow = pc[(pc.system_prompt == "all") & (pc.measure == "kl")].iloc[0]
    both = pc[(pc.system_prompt != "all") & (pc.measure == "kl")]
    assert abs(allrow["diff"] - both["diff"].mean()) <= 1e-12
    # the mean over matched instructions resamples the instructions too (pigeonhole)
    wm = user_weights(2, 100, [0, 4])
    d = []
    for sys_name, pre_name in (("brief", "brief"), ("pirate", "arr")):
        per = [np.array([oc.loc[pairs.index[(pairs.system == lab) & (pairs.user_id == u)][0], "kl"] for u in users])
               for lab in (sys_name, f"prefix:{pre_name}")]
        d.append([(wb @ per[1] - wb @ per[0]) / wb.sum() for wb in w])
    d = np.array(d).T  # (B, 2)
    lo, hi = np.percentile((wm * d).sum(1) / wm.sum(1), [2.5, 97.5])
    assert abs(allrow["ci_low"] - lo) <= 1e-9 and abs(allrow["ci_high"] - hi) <= 1e-9


def test_verify_rechecks_prefix_variants(run):
    from promptshift.store.verify import check_plan

    store = run[0]
    assert check_plan(store.plan) == []
    # a prefix variant whose prefix tokens lost their label is caught (on a copy of the plan)
    import copy

    plan = copy.copy(store.plan)
    v = int(plan.pairs[plan.pairs.placement == "prefix"].variant.iloc[0])
    o = int(plan.prompts.token_offset[v])
    reg = np.array(plan.token_region, copy=True)
    pos = np.flatnonzero(reg[o : o + int(plan.prompts.n_tokens[v])] == REGION_CODE["prefix"])
    reg[o + pos] = REGION_CODE["user"]
    plan.token_region = reg
    problems = check_plan(plan)
    assert any("instruction prefix as prefix tokens" in p for p in problems), problems


def documented(table: str) -> set[str]:
    """The backticked names in docs/RESULTS.md's entry for ``table`` (its columns and values)."""
    import re

    from tests.conftest import REPO

    text = (REPO / "docs" / "RESULTS.md").read_text(encoding="utf-8")
    start = text.index(f"- `{table}.parquet`")
    end = min(i for i in (text.find("\n- `", start + 1), text.find("\n\n", start), len(text)) if i > 0)
    return set(re.findall(r"`([^`]+)`", text[start:end]))


def test_results_doc_names_every_column_and_measure_written(run):
    """docs/RESULTS.md documents the placement tables and the text features as written."""
    _, tables, _, _ = run
    for name in ("placement_layers", "placement_compare", "length_impact", "tag_impact"):
        cols = set(tables[name].columns)
        assert cols <= documented(name), (name, cols - documented(name))
    measures = {m.split(":")[0] + (":<component>" if ":" in m else "")
                for m in tables["placement_compare"]["measure"]}
    assert measures <= documented("placement_compare"), measures - documented("placement_compare")
    assert set(tables["tag_impact"]["source"]) == {"tag", "keyword"} <= documented("tag_impact")
