"""The example prompt file in the notebook's format (examples/notebook_prompts.json, the one
docs/SEED.md runs) goes through plan, extract, causal, metrics and report without edits, on a
tiny model with the embedded tokenizer and chat template."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import REPO, tiny_llama

EXAMPLE = REPO / "examples" / "notebook_prompts.json"


@pytest.mark.slow
def test_example_file_end_to_end(tok, tmp_path):
    import promptshift.metrics as metrics
    from promptshift.causal import CausalConfig, run_causal
    from promptshift.extract.worker import ExtractConfig, fill_shard
    from promptshift.report import build_report
    from promptshift.sweep.config import load_sweep

    raw = json.loads(EXAMPLE.read_text())
    assert {"metadata", "test_prompts", "system_prompts", "instruction_prefixes"} == set(raw)
    assert any(it["prompt"] == "" for items in raw["test_prompts"].values() for it in items)
    sweep = load_sweep(EXAMPLE, max_new_tokens=2, top_k=8, lens_top_k=4)
    assert sweep.baseline == "no_system_turn"  # the notebook's `none` entry: no system message
    model = tiny_llama(tok, n_layers=2, seed=4)
    with pytest.warns(UserWarning, match="carries the template's default system prompt"):
        store = fill_shard(sweep, ExtractConfig(store=str(tmp_path / "s.zarr"), progress=False), model=model, tok=tok)
    plan = store.plan
    n_sys, n_pre, n_users = len(sweep.variants), len(sweep.instruction_prefixes), len(sweep.user_prompts)
    assert len(plan.pairs) == (n_sys + n_pre) * n_users  # prefixes appear as pairs
    assert store.provenance["sweep"]["metadata"] == raw["metadata"]
    run_causal(sweep, CausalConfig(store=str(tmp_path / "s.zarr"), analyses=("patching", "knockout"), users=2,
                                   progress=False), model=model, tok=tok)
    out = tmp_path / "results"
    tables = metrics.compute(str(tmp_path / "s.zarr"), out, workers=0, n_boot=50, progress=False)
    oc = tables["output_change"]
    assert (oc.user_id == "edge_empty").sum() == n_sys + n_pre  # the empty user prompt, in every table
    assert set(oc.loc[oc.user_id == "fact_capital", "difficulty"]) == {"easy"}  # attributes as columns
    ti = tables["tag_impact"]
    assert {"persona", "constraint", "reasoning", "format"} <= set(ti.loc[ti.source == "tag", "tag"])  # category
    pc = tables["placement_compare"]
    assert {("concise", "concise"), ("step_by_step", "step_by_step")} <= set(zip(pc.system_prompt, pc.prefix))
    # docs/SEED.md's table of the notebook's outputs names columns these tables have
    from tests.test_docs_seed import named_tables_and_columns, outputs_table

    for _, where, _ in outputs_table():
        for table, col in named_tables_and_columns(where)[1]:
            assert col in tables[table].columns, (table, col)
        if "`length_impact.parquet`:" in where:  # the text features, listed after the table's name
            named = re.findall(r"`(\w+)`", where.split("`length_impact.parquet`:", 1)[1].split("(", 1)[0])
            assert len(named) >= 7 and set(named) <= set(tables["length_impact"].columns), named
    html = build_report(out, strict=True).read_text(encoding="utf-8")
    for fid in ("fig-placement", "fig-system-layer", "fig-length-output-attention", "fig-tag-impact"):
        block = html[html.index(f'<figure id="{fid}">'):]
        block = block[: block.index("</figure>")]
        assert "<img" in block and "not available" not in block, fid
    assert "no_system_turn" in html and "You are a helpful AI assistant named SmolLM" in html
