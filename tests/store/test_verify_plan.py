"""`verify` rechecks what a user trusts blindly about the plan, from the store alone: the
regions partition each prompt, every token carries the region of the content it holds (no
system token missing), each variant holds its whole system prompt, aligned suffixes are
identical token ids. Each check is shown to catch a planted corruption that keeps the plan
self-consistent (hash recomputed), as a labelling bug in the planner would."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest

from promptshift.store.core import Store
from promptshift.store.verify import check_plan, verify_store
from promptshift.sweep.config import load_sweep
from promptshift.sweep.plan import ModelDims, build_plan
from promptshift.vocabulary import REGION_CODE
from tests.conftest import write_sweep
from tests.sweep.test_chat import INST_STYLE

DIMS = ModelDims(n_layers=2, hidden=8, n_heads=2, vocab=100, max_positions=4096)


@pytest.fixture(scope="module")
def inst_plan(tok, tmp_path_factory):
    """The issue's template ([INST] system\\n\\nuser[/INST]) with the system prompts "Hi" and
    "Be brief.": their first tokens carry the template's space."""
    t = copy.deepcopy(tok)
    t.chat_template = INST_STYLE
    path = write_sweep(tmp_path_factory.mktemp("v") / "s.yaml",
                       systems=[{"name": "hi", "text": "Hi"}, {"name": "brief", "text": "Be brief."}])
    return build_plan(load_sweep(path), t, DIMS)


def _copy(plan, **arrays):
    return dataclasses.replace(plan, prompts=plan.prompts.copy(), pairs=plan.pairs.copy(), **arrays)


def test_sound_plan_passes(inst_plan):
    assert check_plan(inst_plan) == []
    v = inst_plan.prompts[inst_plan.prompts.kind == "variant"]
    assert (v.n_system_tokens >= 1).all()


def test_old_labelling_of_carried_system_text_is_caught(inst_plan, tmp_path):
    """The bug of the issue, planted: tokens that start with the template's space before the
    system text labelled ``template`` (so "Hi" had no system token). The plan is
    self-consistent (its hash is recomputed by Store.create); verify still reports it."""
    reg = inst_plan.token_region.copy()
    off = inst_plan.token_offsets
    planted = 0
    for p, r in inst_plan.prompts.iterrows():
        for _, region, a, b in inst_plan.spans[inst_plan.spans[:, 0] == p]:
            if region != REGION_CODE["system"]:
                continue
            for i in range(r.token_offset, r.token_offset + r.n_tokens):
                if off[i, 0] < a < off[i, 1]:  # starts in the scaffolding, carries system text
                    reg[i] = REGION_CODE["template"]
                    planted += 1
    assert planted == 6  # one token per variant: "ĠHi" / "ĠBe", three user prompts each
    bad = _copy(inst_plan, token_region=reg)
    bad.prompts["n_system_tokens"] = np.add.reduceat((reg == REGION_CODE["system"]).astype(int),
                                                     bad.prompts.token_offset.to_numpy())
    problems = check_plan(bad)
    assert any("6 prompts have tokens not labelled by the content they carry" in p for p in problems), problems
    assert any("3 variants do not hold their whole system prompt as system tokens" in p for p in problems), problems
    store = Store.create(tmp_path / "s.zarr", bad, {}, "zarr")
    assert store.attrs["plan_hash"] == bad.hash()
    found = verify_store(tmp_path / "s.zarr")
    assert not any("hash" in p for p in found) and any("not labelled by the content" in p for p in found), found


def test_partition_breaks_are_caught(inst_plan):
    reg = inst_plan.token_region.copy()
    reg[5] = 9  # no such region
    assert any("no valid region code (prompts [0])" in p for p in check_plan(_copy(inst_plan, token_region=reg)))
    reg = inst_plan.token_region.copy()
    second = int(inst_plan.prompts.token_offset[1])
    reg[second] = REGION_CODE["template"]  # prompt 1 loses its sink
    assert any("the sink is not exactly their first token (prompts [1])" in p
               for p in check_plan(_copy(inst_plan, token_region=reg)))
    bad = _copy(inst_plan)
    bad.prompts.loc[2, "n_tokens"] += 1
    assert check_plan(bad) == ["the plan's token arrays do not tile its prompts (token_offset/n_tokens); the plan "
                               "is corrupt"]


def test_generation_prompt_must_end_the_prompt(tok, tmp_path):
    plan = build_plan(load_sweep(write_sweep(tmp_path / "s.yaml")), tok, DIMS)
    assert check_plan(plan) == []
    reg = plan.token_region.copy()
    end = int(plan.prompts.token_offset[0] + plan.prompts.n_tokens[0])
    assert reg[end - 1] == REGION_CODE["gen_prompt"]
    reg[end - 1] = REGION_CODE["template"]
    assert any("generation prompt does not end 1 prompts (prompts [0])" in p
               for p in check_plan(_copy(plan, token_region=reg)))


def test_misaligned_suffix_is_caught(inst_plan):
    bad = _copy(inst_plan)
    bad.pairs.loc[4, "v_suffix_start"] -= 1
    bad.pairs.loc[4, "suffix_len"] += 1
    assert check_plan(bad) == ["1 pairs' aligned suffixes are not identical token ids (pairs [4])"]


def test_store_without_spans_is_still_checked(inst_plan):
    """Stores written before token/content spans were kept: the other checks still run."""
    old = _copy(inst_plan, token_offsets=None, spans=None)
    assert check_plan(old) == []
    bad = _copy(old)
    bad.pairs.loc[0, "b_suffix_start"] += 1
    bad.pairs.loc[0, "suffix_len"] -= 1
    assert check_plan(bad)
