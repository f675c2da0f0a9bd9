"""The notebook's JSON prompt format read as it is: `metadata`, extra per-prompt fields
(attributes), system prompt `category` as a tag, its baseline (`no_system_turn`) by
default, `--baseline` for any format, and errors that name the allowed keys."""

from __future__ import annotations

import json

import numpy as np
import pytest

from promptshift.errors import SweepError
from promptshift.sweep.config import SweepConfig, load_sweep
from tests.conftest import write_sweep

NOTEBOOK = {
    "metadata": {"version": "2.1", "description": "test file", "n": 3},
    "test_prompts": {
        "factual": [
            {"id": "f1", "prompt": "Capital of Italy?", "expected": "Rome", "difficulty": "easy", "type": "short"},
            {"id": "f2", "prompt": "Largest planet?", "expected": "Jupiter", "difficulty": "hard",
             "note": "astronomy", "tags": ["space", "science"]},
        ],
        "creative": [{"id": "c1", "prompt": "A haiku please.", "difficulty": "easy"}],
    },
    "system_prompts": {
        "none": {"text": "", "description": "baseline"},
        "brief": {"text": "Be brief.", "description": "short", "category": "constraint"},
        "pirate": {"text": "You are a pirate.", "category": "persona", "tags": ["tone"], "source": "web"},
    },
}


def _write(tmp_path, data, name="prompts.json"):
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return p


def test_notebook_file_read_as_it_is(tmp_path):
    s = load_sweep(_write(tmp_path, NOTEBOOK))
    assert s.baseline == "no_system_turn"  # the notebook's `none` entry: no system message at all
    assert s.metadata == NOTEBOOK["metadata"]
    assert [x.name for x in s.system_prompts] == ["brief", "pirate"]
    by = {x.name: x for x in s.system_prompts}
    assert by["brief"].tags == ("constraint",) and by["pirate"].tags == ("tone", "persona")
    assert by["pirate"].attributes == {"source": "web"} and by["brief"].description == "short"
    u = {x.id: x for x in s.user_prompts}
    assert u["f1"].attributes == {"difficulty": "easy", "type": "short"} and u["f1"].expected == "Rome"
    assert u["f2"].attributes == {"difficulty": "hard", "note": "astronomy", "tags": ["space", "science"]}
    assert u["c1"].category == "creative"
    # the resolved sweep (what the store's provenance keeps) round-trips with metadata and attributes
    d = json.loads(json.dumps(s.to_dict()))
    assert d["metadata"] == NOTEBOOK["metadata"]
    back = SweepConfig.from_dict(d)
    assert back.user_prompts == s.user_prompts and back.system_prompts == s.system_prompts
    assert back.metadata == s.metadata


def test_notebook_baseline_without_empty_entry_and_overrides(tmp_path):
    data = {**NOTEBOOK, "system_prompts": {k: v for k, v in NOTEBOOK["system_prompts"].items() if k != "none"}}
    p = _write(tmp_path, data)
    assert load_sweep(p).baseline == "no_system_turn"
    assert load_sweep(p, baseline="empty_system").baseline == "empty_system"
    assert load_sweep(p, baseline="brief").baseline == "brief"
    with pytest.raises(SweepError, match="unknown `baseline` 'nope'"):
        load_sweep(p, baseline="nope")
    # the YAML format keeps its own default, and takes the override too
    y = write_sweep(tmp_path / "s.yaml")
    assert load_sweep(y).baseline == "empty_system"
    assert load_sweep(y, baseline="no_system_turn").baseline == "no_system_turn"
    # a YAML sweep over a notebook file takes the file's baseline unless it sets its own
    (tmp_path / "a.yaml").write_text("prompts: prompts.json\n")
    (tmp_path / "b.yaml").write_text("prompts: prompts.json\nbaseline: empty_system\n")
    a, b = load_sweep(tmp_path / "a.yaml"), load_sweep(tmp_path / "b.yaml")
    assert a.baseline == "no_system_turn" and a.metadata == NOTEBOOK["metadata"] and b.baseline == "empty_system"


def test_select_by_attribute(tmp_path):
    _write(tmp_path, NOTEBOOK)
    (tmp_path / "s.yaml").write_text("prompts: prompts.json\nselect: {attributes: {difficulty: easy}}\n")
    assert [u.id for u in load_sweep(tmp_path / "s.yaml").user_prompts] == ["f1", "c1"]
    (tmp_path / "t.yaml").write_text("prompts: prompts.json\nselect: {attributes: {tags: [science]}}\n")
    assert [u.id for u in load_sweep(tmp_path / "t.yaml").user_prompts] == ["f2"]
    (tmp_path / "u.yaml").write_text("prompts: prompts.json\nselect: {attributes: {level: [x]}}\n")
    with pytest.raises(SweepError, match="names 'level', which no user prompt has; attributes: difficulty, note"):
        load_sweep(tmp_path / "u.yaml")


def test_yaml_attributes_and_empty_ones_leave_the_dict_unchanged(tmp_path):
    users = [{"id": "a", "text": "Hi there", "attributes": {"difficulty": 2}}, {"id": "b", "text": "Hello"}]
    s = load_sweep(write_sweep(tmp_path / "s.yaml", users=users))
    assert s.user_prompts[0].attributes == {"difficulty": 2}
    d = s.to_dict()
    # no `attributes`/`metadata` keys where there are none: older sweeps keep their plan hash
    assert "attributes" not in d["user_prompts"][1] and "attributes" not in d["system_prompts"][0]
    assert "metadata" not in d


@pytest.mark.parametrize(
    "patch, match",
    [
        ({"extra_section": {}}, r"unknown key\(s\) \['extra_section'\] in .*allowed: instruction_prefixes, metadata, system_prompts, test_prompts"),
        ({"metadata": "v1"}, "`metadata` in .* must be an object"),
        ({"test_prompts": {"factual": [{"id": "x", "prompt": "q", "category": "other"}]}},
         "has `category` 'other' but sits under 'factual'"),
        ({"test_prompts": {"factual": [{"id": "x", "prompt": "q", "difficulty": {"a": 1}}]}},
         "attribute `difficulty` of user prompt `x` must be a string, number"),
        ({"test_prompts": {"factual": [{"id": "x", "prompt": "q", "system": "s"}]}},
         "attribute `system` of user prompt `x` clashes with a column"),
        ({"system_prompts": {"a": {"text": "  "}, "b": {"text": ""}, "c": {"text": "Hi."}}},
         "two baseline entries with empty text: 'a' and 'b'"),
        ({"system_prompts": {"a": {"text": "Hi.", "tags": "x"}}}, "`tags` in .* must be a list of strings"),
    ],
)
def test_notebook_errors_name_the_field(tmp_path, patch, match):
    with pytest.raises(SweepError, match=match):
        load_sweep(_write(tmp_path, {**NOTEBOOK, **patch}))


def test_plan_command_names_the_baseline_and_takes_baseline_option(tmp_path):
    from typer.testing import CliRunner

    from promptshift.cli import app

    p = _write(tmp_path, NOTEBOOK)
    r = CliRunner().invoke(app, ["plan", str(p)])
    assert r.exit_code == 0, r.output
    assert "baseline: no_system_turn (template injects default system prompt: 'You are a helpful AI" in r.output
    r = CliRunner().invoke(app, ["plan", str(p), "--baseline", "empty_system"])
    assert r.exit_code == 0 and "baseline: empty_system\n" in r.output, r.output


def test_baseline_option_on_extract_and_run(tmp_path, capsys):
    """`--baseline` reaches the sweep from `extract` and `run` as from `plan`: a bad name is
    refused before any model runs, and the store `extract` creates holds the baseline given."""
    from promptshift.cli import main
    from promptshift.store import open_store

    p = _write(tmp_path, NOTEBOOK)
    for argv in (["extract", str(p), "--store", str(tmp_path / "x.zarr")],
                 ["run", "--sweep", str(p), "--out", str(tmp_path / "r")]):
        with pytest.raises(SystemExit) as e:
            main([*argv, "--baseline", "nope"])
        assert e.value.code == 2 and "unknown `baseline` 'nope'" in capsys.readouterr().err, argv
    assert not (tmp_path / "x.zarr").exists() and not (tmp_path / "r").exists()
    for baseline in ("empty_system", "brief"):
        st = tmp_path / f"{baseline}.zarr"
        with pytest.raises(SystemExit) as e:  # the store created from the plan, no prompt run
            main(["extract", str(p), "--store", str(st), "--init-only", "--baseline", baseline, "--no-progress"])
        assert e.value.code == 0
        store = open_store(st)
        assert store.provenance["sweep"]["baseline"] == baseline
        assert "brief" not in set(store.plan.pairs.system) or baseline != "brief"  # the baseline is no variant


# --- instruction prefixes and empty user prompts in the plan -------------------------------
PREFIXED = {
    **NOTEBOOK,
    "test_prompts": {**NOTEBOOK["test_prompts"], "edge_cases": [{"id": "empty", "prompt": ""}]},
    "instruction_prefixes": {"brief": "Be brief.", "polite": {"text": "Please answer politely.", "same_as": "pirate"},
                             "json": "Reply in JSON."},
}


def _plan(tok, tmp_path, data, **over):
    import warnings

    from promptshift.sweep.plan import ModelDims, build_plan

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no_system_turn carries SmolLM2's default system prompt
        return build_plan(load_sweep(_write(tmp_path, data), **over), tok, ModelDims(2, 8, 2, 100, 4096))


def test_prefixes_are_pairs_matched_with_system_prompts(tok, tmp_path):
    s = load_sweep(_write(tmp_path, PREFIXED))
    assert [x.name for x in s.instruction_prefixes] == ["brief", "polite", "json"]
    assert s.placements() == [("brief", "brief"), ("pirate", "polite")]  # by name, and by same_as
    plan = _plan(tok, tmp_path, PREFIXED)
    p = plan.pairs
    assert len(p) == (2 + 3) * 4 and set(p.placement) == {"system", "prefix"}
    pre = p[p.placement == "prefix"]
    assert set(pre.system) == {"prefix:brief", "prefix:polite", "prefix:json"}
    assert set(pre.instruction) == {"brief", "polite", "json"}
    # a prefix pair's baseline is the same user prompt without the prefix: the system pairs' baseline
    for u, g in p.groupby("user_id"):
        assert g.baseline.nunique() == 1, u
    assert "2 system prompts + 3 instruction prefixes x 4 user prompts = 20 pairs" in plan.summary()
    assert "brief (system) / brief (prefix), pirate (system) / polite (prefix)" in plan.summary()
    d = s.to_dict()
    assert SweepConfig.from_dict(json.loads(json.dumps(d))).instruction_prefixes == s.instruction_prefixes


def test_prefix_regions_exact_by_token(tok, tmp_path):
    """Every token of a prefix pair is labelled from the rendering: the prefix region is
    exactly the instruction and its separator, the user region exactly the user prompt,
    and everything else is the baseline's tokens, in the same order."""
    from promptshift.vocabulary import REGION_CODE

    for baseline in ("no_system_turn", "empty_system", "brief"):
        plan = _plan(tok, tmp_path, PREFIXED, baseline=baseline)
        users = {u.id: u.text for u in plan.sweep.user_prompts}
        texts = {x.name: x.text for x in plan.sweep.instruction_prefixes}
        pre = plan.pairs[plan.pairs.placement == "prefix"]
        assert len(pre) == 3 * 4
        for r in pre.itertuples():
            ids, reg = plan.prompt_tokens(r.variant), plan.prompt_regions(r.variant)
            bids, breg = plan.prompt_tokens(r.baseline), plan.prompt_regions(r.baseline)
            # the same rendering built by hand, tokenized independently
            msgs = ([] if baseline == "no_system_turn" else
                    [{"role": "system", "content": "" if baseline == "empty_system" else "Be brief."}])
            msgs.append({"role": "user", "content": texts[r.instruction] + "\n\n" + users[r.user_id]})
            want = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                       add_special_tokens=False)["input_ids"]
            assert ids.tolist() == want
            pos = np.flatnonzero(reg == REGION_CODE["prefix"])
            upos = np.flatnonzero(reg == REGION_CODE["user"])
            assert pos.size and np.array_equal(pos, np.arange(pos[0], pos[-1] + 1))  # one contiguous span
            assert tok.decode(ids[pos].tolist()) == texts[r.instruction] + "\n\n"
            assert tok.decode(ids[upos].tolist()) == users[r.user_id]
            # the prefix region holds exactly what the prefix adds: the rest is the baseline, token by token
            rest = np.delete(np.arange(len(ids)), pos)
            assert ids[rest].tolist() == bids.tolist() and reg[rest].tolist() == breg.tolist()
            # aligned on the user text and after; the prefix ends right where the user text (or its place) begins
            assert r.v_suffix_start == pos[-1] + 1 and r.suffix_len == len(bids) - r.b_suffix_start
            assert np.array_equal(ids[r.v_suffix_start:], bids[r.b_suffix_start:])


def test_empty_user_prompt_renders_with_no_user_tokens_and_aligns_on_what_follows(tok, tmp_path):
    from promptshift.vocabulary import REGION_CODE

    plan = _plan(tok, tmp_path, PREFIXED)
    e = plan.pairs[plan.pairs.user_id == "empty"]
    assert len(e) == 5  # every system prompt and every prefix
    for r in e.itertuples():
        for p, start in ((r.variant, r.v_suffix_start), (r.baseline, r.b_suffix_start)):
            ids, reg = plan.prompt_tokens(p), plan.prompt_regions(p)
            assert not (reg == REGION_CODE["user"]).any()
            # the aligned suffix begins at the end of the (empty) user turn: <|im_end|> and the assistant header
            assert tok.decode(ids[start:].tolist()) == "<|im_end|>\n<|im_start|>assistant\n"
        assert r.suffix_len == len(plan.prompt_tokens(r.baseline)) - r.b_suffix_start
