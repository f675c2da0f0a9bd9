"""Sweep loading (YAML, JSON prompt files, built-in suites), validation messages, and the
plan: pairs, shared baselines, aligned suffixes, baselines that carry a default."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from promptshift.errors import ShardSpecError, SweepError
from promptshift.sweep.config import builtin_suites, load_sweep
from promptshift.sweep.plan import ModelDims, build_plan, parse_shard
from tests.conftest import write_sweep

DIMS = ModelDims(n_layers=2, hidden=8, n_heads=2, vocab=100, max_positions=4096)


def test_builtin_suite_contents():
    s = load_sweep("default")
    assert len(s.system_prompts) >= 16 and len(s.user_prompts) >= 36
    cats = {u.category for u in s.user_prompts}
    assert {"factual", "reasoning", "classification", "creative", "instruction", "edge"} <= cats
    tags = {t for p in s.system_prompts for t in p.tags}
    assert {"persona", "format", "reasoning", "constraint", "concise", "tone", "safety", "language", "control"} <= tags
    fams = {}
    for p in s.system_prompts:
        if p.family:
            fams.setdefault(p.family, set()).add(p.level)
    assert any(v == {"short", "medium", "long"} for v in fams.values())
    assert "multiturn" in builtin_suites()


def test_length_families_span_10_40_160_tokens(tok):
    s = load_sweep("default")
    n = {p.name: len(tok(p.text, add_special_tokens=False)["input_ids"]) for p in s.system_prompts}
    for fam in ("concise", "pirate"):
        short, med, long_ = n[f"{fam}_short"], n[f"{fam}_medium"], n[f"{fam}_long"]
        assert 5 <= short <= 20 and 25 <= med <= 60 and 110 <= long_ <= 220, (fam, short, med, long_)
    assert abs(n["nonsense_control"] - n["concise_medium"]) <= 0.5 * n["concise_medium"]


def test_json_prompt_file(tmp_path):
    p = tmp_path / "prompts.json"
    p.write_text(json.dumps({
        "test_prompts": {"factual": [{"id": "f1", "prompt": "Capital of Italy?", "expected": "Rome"}],
                         "creative": [{"id": "c1", "prompt": "A haiku please."}]},
        "system_prompts": {"none": {"text": "", "description": "baseline"},
                           "brief": {"text": "Be brief.", "description": "short"}},
    }))
    s = load_sweep(p)
    assert [x.name for x in s.system_prompts] == ["brief"] and s.baseline == "no_system_turn"
    assert {u.id: u.category for u in s.user_prompts} == {"f1": "factual", "c1": "creative"}


@pytest.mark.parametrize(
    "content, match",
    [
        # an empty user prompt is a prompt (tests/sweep/test_notebook_format.py); an empty instruction is not
        ("system_prompts: [{name: a, text: x}]\nuser_prompts: [{id: u, text: hi}]\ninstruction_prefixes: {p: '  '}\n",
         "instruction prefix `p` has empty or whitespace-only text"),
        ("system_prompts: [{name: a, text: x}]\nuser_prompts: [{id: u, text: hi}]\n"
         "instruction_prefixes: [{name: p, text: Hi, same_as: b}]\n", "`same_as: b`, which is not a system prompt"),
        ("system_prompts: [{name: a, text: x}]\nuser_prompts: [{id: u, text: hi}]\n"
         "instruction_prefixes: [{name: p, txt: Hi}]\n", r"unknown key\(s\) \['txt'\].*allowed: category"),
        ("system_prompts: [{name: a, text: '  '}]\nuser_prompts: [{id: u, text: hi}]\n", "empty text"),
        ("system_prompts: [{name: a, text: x}, {name: a, text: y}]\nuser_prompts: [{id: u, text: hi}]\n",
         "duplicate name 'a'"),
        ("system_prompts: [{name: a, text: x}]\nuser_prompts: [{id: u, text: hi}, {id: u, text: ho}]\n",
         "duplicate id 'u'"),
        ("system_prompts: [{name: a, text: x}]\nuser_prompts: [{id: u, text: hi}]\nbaseline: nope\n",
         "unknown `baseline` 'nope'"),
        ("system_prompts: [{name: a, text: x}]\nuser_prompts: [{id: u, text: hi}]\nkeeep: last\n",
         r"unknown key\(s\) \['keeep'\]"),
        ("system_prompts: [{name: a, text: x, colour: red}]\nuser_prompts: [{id: u, text: hi}]\n", "colour"),
        ("system_prompts: []\nuser_prompts: [{id: u, text: hi}]\n", "no system prompts"),
        ("system_prompts: [{name: a, text: x}]\nuser_prompts: [{id: u, text: hi}]\ntoken_budget: 1\n",
         "token_budget"),
        ("system_prompts: [{name: a, text: x}]\nuser_prompts: [{id: u, text: hi}]\ncomponents: [resid_mid]\n",
         "unknown component"),
        ("system_prompts: [{name: a, text: x}\n", "not valid YAML"),
        ("- just a list\n", "must be a YAML mapping"),
    ],
)
def test_sweep_errors_name_the_field(tmp_path, content, match):
    p = tmp_path / "s.yaml"
    p.write_text(content)
    with pytest.raises(SweepError, match=match):
        load_sweep(p)


def test_non_utf8_and_bad_json(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_bytes(b"system_prompts: [{name: a, text: \xff\xfe}]\n")
    with pytest.raises(SweepError, match="not valid UTF-8"):
        load_sweep(p)
    j = tmp_path / "p.json"
    j.write_text("{\"test_prompts\": ")
    with pytest.raises(SweepError, match="not valid JSON"):
        load_sweep(j)
    with pytest.raises(SweepError, match="unknown suite"):
        load_sweep("no_such_suite")


def test_plan_pairs_baselines_and_alignment(tok, tmp_path):
    s = load_sweep(write_sweep(tmp_path / "s.yaml"))
    plan = build_plan(s, tok, DIMS)
    assert len(plan.pairs) == 3 * 3
    # one baseline per user prompt, shared by all its pairs
    assert plan.pairs.groupby("user_id").baseline.nunique().eq(1).all()
    assert (plan.prompts.kind == "baseline").sum() == 3
    for r in plan.pairs.itertuples():
        v = plan.prompt_tokens(r.variant)[r.v_suffix_start:]
        b = plan.prompt_tokens(r.baseline)[r.b_suffix_start:]
        assert len(v) == len(b) == r.suffix_len and np.array_equal(v, b)
        assert r.suffix_len == len(plan.prompt_tokens(r.variant)) - plan.prompts.suffix_start[r.variant]
    # every block is a run of consecutive prompts; shards partition the blocks
    for n in (1, 2, 3, 5):
        got = sorted(b for i in range(n) for b in plan.shard_blocks(i, n))
        assert got == list(range(plan.n_blocks))


def test_no_system_turn_baseline_carries_default(tok, tmp_path):
    s = load_sweep(write_sweep(tmp_path / "s.yaml", baseline="no_system_turn"))
    with pytest.warns(UserWarning, match="carries the template's default system prompt"):
        plan = build_plan(s, tok, DIMS)
    assert plan.meta["baseline_carries_default"] and "SmolLM" in plan.meta["injected_system"]
    base = plan.prompts[plan.prompts.kind == "baseline"]
    assert (base.n_system_tokens > 0).all()
    s2 = load_sweep(write_sweep(tmp_path / "e.yaml", baseline="empty_system"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan2 = build_plan(s2, tok, DIMS)
    assert not plan2.meta["baseline_carries_default"]
    assert (plan2.prompts[plan2.prompts.kind == "baseline"].n_system_tokens == 0).all()


def test_named_baseline_is_not_paired_with_itself(tok, tmp_path):
    s = load_sweep(write_sweep(tmp_path / "s.yaml", baseline="brief"))
    plan = build_plan(s, tok, DIMS)
    assert "brief" not in set(plan.pairs.system) and len(plan.pairs) == 2 * 3


def test_prompt_longer_than_context(tok, tmp_path):
    s = load_sweep(write_sweep(tmp_path / "s.yaml"))
    with pytest.raises(SweepError, match="more than the model's context"):
        build_plan(s, tok, ModelDims(2, 8, 2, 100, max_positions=20))


@pytest.mark.parametrize("spec", ["3/2", "-1/2", "a/b", "1", "0/0"])
def test_bad_shard_specs(spec):
    with pytest.raises(ShardSpecError):
        parse_shard(spec)
    assert parse_shard("1/3") == (1, 3)


# --- behaviour declarations ------------------------------------------------------------------
def test_declared_checks_and_matchers(tmp_path, tok):
    from promptshift.sweep.behaviour import Check
    from promptshift.sweep.config import SweepConfig

    p = write_sweep(tmp_path / "b.yaml", systems=[
        {"name": "brief", "text": "Be brief.", "checks": [{"max_words": 10}]},
        {"name": "french", "text": "Answer in French.", "checks": {"language": "fr"}},
        {"name": "plain", "text": "Be nice."},
    ], users=[
        {"id": "a", "text": "What is 2 + 3?", "expected": "5", "match": "number"},
        {"id": "b", "text": "Capital of France?", "expected": "Paris"},
    ], behaviour={"max_new_tokens": 48, "match": "exact", "languages": ["fr", "en"]})
    s = load_sweep(p)
    assert s.system_prompts[0].checks == (Check("max_words", 10),)
    assert s.system_prompts[1].checks == (Check("language", "fr"),) and s.system_prompts[2].checks == ()
    assert [u.match for u in s.user_prompts] == ["number", None]
    assert s.behaviour.max_new_tokens == 48 and s.behaviour.match == "exact"
    assert s.behaviour.languages == ("en", "fr") and s.gen_tokens == 48
    assert SweepConfig.from_dict(s.to_dict()) == s  # the store's copy reads back the same
    # judging settings do not change the plan (no new extraction); the continuation length does
    base = build_plan(s, tok, DIMS).hash()
    d = s.to_dict()
    d["system_prompts"][0]["checks"] = [{"max_words": 3}]
    d["user_prompts"][0]["match"] = "contains"
    d["behaviour"]["match"] = "contains"
    assert build_plan(SweepConfig.from_dict(d), tok, DIMS).hash() == base
    d["behaviour"]["max_new_tokens"] = 64
    assert build_plan(SweepConfig.from_dict(d), tok, DIMS).hash() != base


def test_sweep_without_behaviour_serialises_as_before(tmp_path):
    s = load_sweep(write_sweep(tmp_path / "plain.yaml"))
    d = s.to_dict()
    assert "behaviour" not in d and all("checks" not in x for x in d["system_prompts"])
    assert all("match" not in x for x in d["user_prompts"]) and s.gen_tokens == s.max_new_tokens


def test_default_suite_declares_checks():
    s = {p.name: p for p in load_sweep("default").system_prompts}
    assert [c.label for c in s["answer_french"].checks] == ["language:fr"]
    assert [c.label for c in s["json_only"].checks] == ["json"]
    assert {c.label for c in s["concise_short"].checks} == {c.label for c in s["concise_long"].checks}
    assert not s["nonsense_control"].checks
    assert sum(bool(p.checks) for p in s.values()) >= 12


@pytest.mark.parametrize("systems, users, settings, match", [
    ([{"name": "a", "text": "x", "checks": [{"max_wordz": 3}]}], None, {}, "unknown check 'max_wordz'"),
    ([{"name": "a", "text": "x", "checks": [{"language": "de"}]}], None, {"behaviour": {"languages": ["fr"]}},
     "not among the languages"),
    (None, [{"id": "u", "text": "x", "expected": "five", "match": "number"}], {}, "not one number"),
    (None, [{"id": "u", "text": "x", "expected": "5", "match": "fuzzy"}], {}, "unknown `match`"),
    (None, [{"id": "u", "text": "x", "expected": "(", "match": "regex"}], {}, "not a valid regular expression"),
    (None, None, {"behaviour": {"max_new_tokens": 8}}, "shorter than `max_new_tokens`"),
    (None, None, {"behaviour": {"max_tokens": 8}}, "unknown key"),
    (None, None, {"behaviour": {"languages": "fr"}}, "list of ISO 639 codes"),
    (None, None, {"behaviour": {"match": "fuzzy"}}, "must be one of"),
])
def test_behaviour_errors(tmp_path, systems, users, settings, match):
    with pytest.raises(SweepError, match=match):
        load_sweep(write_sweep(tmp_path / "bad.yaml", systems=systems, users=users, **settings))


def test_max_words_beyond_the_continuation_warns(tmp_path):
    p = write_sweep(tmp_path / "w.yaml", systems=[{"name": "a", "text": "x", "checks": [{"max_words": 50}]}],
                    max_new_tokens=32)
    with pytest.warns(UserWarning, match="stays undecided"):
        load_sweep(p)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_sweep(write_sweep(tmp_path / "w2.yaml", systems=[{"name": "a", "text": "x",
                                                                 "checks": [{"max_words": 50}]}],
                               max_new_tokens=32, behaviour={"max_new_tokens": 96}))


def test_json_prompt_file_checks_and_match(tmp_path):
    p = tmp_path / "prompts.json"
    p.write_text(json.dumps({
        "test_prompts": {"reasoning": [{"id": "r1", "prompt": "2+2?", "expected": "4", "match": "number"}]},
        "system_prompts": {"fr": {"text": "Réponds en français.", "checks": [{"language": "fr"}]}},
    }))
    s = load_sweep(p)
    assert s.system_prompts[0].checks[0].label == "language:fr" and s.user_prompts[0].match == "number"


def test_prompt_plus_generation_must_fit_the_context(tok, tmp_path):
    """Prompt + generated tokens are checked against the model's context (refused, never
    clipped), at the exact boundary; the behaviour continuation counts too."""
    from promptshift.sweep.plan import check_context

    s = load_sweep(write_sweep(tmp_path / "s.yaml", max_new_tokens=16))
    longest = int(build_plan(s, tok, DIMS).prompts.n_tokens.max())
    ok = ModelDims(2, 8, 2, 100, max_positions=longest + 16)
    build_plan(s, tok, ok)  # exactly fits
    with pytest.raises(SweepError, match=rf"has {longest} tokens and generation adds 16: {longest + 16} positions, "
                                         rf"more than the model's context of {longest + 15}; lower `max_new_tokens` "
                                         rf"to at most 15"):
        build_plan(s, tok, ModelDims(2, 8, 2, 100, max_positions=longest + 15))
    longer = load_sweep(write_sweep(tmp_path / "b.yaml", max_new_tokens=16, behaviour={"max_new_tokens": 20}))
    with pytest.raises(SweepError, match="generation adds 20"):
        build_plan(longer, tok, ok)
    with pytest.raises(SweepError, match="has 50 tokens and generation adds 0: 50 positions, more than the model's "
                                         "context of 48; shorten it"):
        check_context(50, 0, 48, "x")
    check_context(10**6, 10, None, "x")  # a model that states no context is not checked


def test_rotary_and_learned_position_contexts_are_read_from_the_config():
    import transformers as tf

    assert ModelDims.from_config(tf.GPT2Config(n_positions=48)).max_positions == 48
    assert ModelDims.from_config(tf.LlamaConfig(max_position_embeddings=64)).max_positions == 64
    assert ModelDims.from_config(tf.MistralConfig(max_position_embeddings=96, sliding_window=24)).max_positions == 96
