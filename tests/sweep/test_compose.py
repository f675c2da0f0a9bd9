"""Shared rendering (promptshift/sweep/compose.py): a plan whose variants are composed from one
rendering per system prompt and one per user prompt equals, token for token and region for
region, every prompt rendered alone by ``chat.render``; on the published templates of every
family, on two tokenizers, and on templates and tokenizers built to break composition
(a template whose rendering of the system turn depends on the user text, one that rewrites
content, an added token that straddles the cut)."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest

from promptshift.errors import TemplateError
from promptshift.sweep.chat import render
from promptshift.sweep.compose import Composer
from promptshift.sweep.config import SweepConfig, SystemPrompt, UserPrompt
from promptshift.sweep.plan import ModelDims, build_plan
from tests.sweep.test_templates import CLOCK, FAMILIES, NO_SYSTEM_ROLE, family_tok

DIMS = ModelDims(n_layers=2, hidden=8, n_heads=2, vocab=100, max_positions=4096)
TABLES = ("prompts", "pairs", "controls", "blocks")
ARRAYS = ("token_ids", "token_region", "token_turn", "token_offsets", "spans")
# varied texts: trailing and leading whitespace and newlines (templates that trim), a
# repeated system text (identical renderings merged), digits and punctuation next to the
# template's scaffolding
SYSTEMS = ["Be brief.", "You are a pirate.\nSpeak like one, matey!  ", "  Answer in French.", "Be brief.",
           "Rule: 1) short 2) polite\n\n"]
USERS = ["What is 2+2?", " Name a colour.\n", "Hi", "Write a haiku about rain:\n- line one", "Why?  "]


def _sweep(baseline: str = "empty_system", no_system_role: str = "error", systems=SYSTEMS, users=USERS):
    return SweepConfig(name="compose", system_prompts=[SystemPrompt(f"s{i}", t) for i, t in enumerate(systems)],
                       user_prompts=[UserPrompt(f"u{j}", t, category=f"c{j % 2}") for j, t in enumerate(users)],
                       baseline=baseline, no_system_role=no_system_role, block_prompts=8)


def assert_same_plan(a, b):
    for t in TABLES:
        pd.testing.assert_frame_equal(getattr(a, t), getattr(b, t), check_exact=True, obj=t)
    for name in ARRAYS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and np.array_equal(x, y), name
    assert a.meta == b.meta and a.hash() == b.hash()


def assert_matches_render(plan, tok, sweep):
    """Every prompt of the plan is what ``chat.render`` gives for its messages alone."""
    from promptshift.sweep.chat import conversation

    base = {"empty_system": dict(system=None, empty_system=True), "no_system_turn": dict(system=None)}
    texts = {s.name: s.text for s in sweep.system_prompts}
    users = {u.id: u.text for u in sweep.user_prompts}
    pr = plan.prompts
    for p in range(plan.n_prompts):
        kind, system, user = pr.kind[p], pr.system[p], users[pr.user_id[p]]
        kw = dict(base[system]) if kind == "baseline" and system in base else dict(system=texts[system])
        r = render(tok, conversation(tok, kw.pop("system"), user, no_system_role=sweep.no_system_role, clock=CLOCK,
                                     **kw), clock=CLOCK)
        o, n = int(pr.token_offset[p]), int(pr.n_tokens[p])
        assert pr.text[p] == r.text
        np.testing.assert_array_equal(plan.token_ids[o : o + n], r.ids, err_msg=f"ids of prompt {p}")
        np.testing.assert_array_equal(plan.token_region[o : o + n], r.regions, err_msg=f"regions of prompt {p}")
        np.testing.assert_array_equal(plan.token_turn[o : o + n], r.turns, err_msg=f"turns of prompt {p}")
        np.testing.assert_array_equal(plan.token_offsets[o : o + n], r.offsets, err_msg=f"offsets of prompt {p}")
        spans = plan.spans[plan.spans[:, 0] == p][:, 1:]
        want = [(s.start, s.end) for s in r.spans]
        assert [tuple(x) for x in spans[:, 1:].tolist()] == want, p


def composed_share(tok, sweep) -> float:
    """Share of the variants the composer composes (the rest is rendered alone)."""
    from promptshift.sweep.chat import conversation

    conv = lambda s, u: conversation(tok, s, u, no_system_role=sweep.no_system_role, clock=CLOCK)  # noqa: E731
    c = Composer(tok, CLOCK, [s.text for s in sweep.variants], [u.text for u in sweep.user_prompts], conv)
    if c.shape is None:
        return 0.0
    return float(np.mean([(c.item(i).suffix >= 0).mean() for i in range(len(sweep.variants))]))


# templates whose variants are composed on the embedded tokenizer (an added token begins
# the user turn's scaffolding after the system text); the others fold the system text into
# the user turn with plain text between them, or put it after the user's
COMPOSED = {"llama3", "llama3.1", "llama3.2", "mistral-small3.2", "phi3.5", "phi4", "qwen2.5", "qwen3", "zephyr"}


@pytest.mark.parametrize("tokenizer", ["embedded", "sentencepiece"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_composed_plan_equals_rendering_each_prompt(tok, sp_tok, family, tokenizer):
    t = family_tok(tok if tokenizer == "embedded" else sp_tok, family)
    policy = "prepend_to_user" if family in NO_SYSTEM_ROLE else "error"
    for baseline in ("empty_system", "no_system_turn") if family not in NO_SYSTEM_ROLE else ("no_system_turn",):
        sweep = _sweep(baseline, policy)
        fast = build_plan(sweep, t, DIMS, clock=CLOCK)
        assert_same_plan(fast, build_plan(sweep, t, DIMS, clock=CLOCK, compose=False))
        assert_matches_render(fast, t, sweep)
    share = composed_share(t, sweep)
    if tokenizer == "embedded":
        # (s, u0) and (s0, u) are rendered alone, the rest composed; the repeated system text is too
        assert (share > 0.6) == (family in COMPOSED), share


def test_default_template_composes_almost_everything(tok):
    sweep = _sweep(systems=[f"You are assistant number {i}." for i in range(6)],
                   users=[f"What is {j} + {j}?" for j in range(7)])
    assert composed_share(tok, sweep) == 1.0  # the variants rendered for the parts pass the same checks
    assert_same_plan(build_plan(sweep, tok, DIMS, clock=CLOCK), build_plan(sweep, tok, DIMS, clock=CLOCK,
                                                                          compose=False))


def test_template_that_reads_the_other_message_is_rendered_alone(tok):
    """A template that trims the system text only when the user text mentions a colour (so
    the system turn depends on another message; ``render`` accepts it, trimming being
    allowed): the composed text would keep the whitespace. Every variant's own rendering is
    compared with the composed text, so the affected variants are rendered alone, and the
    plan equals the per-prompt plan."""
    t = copy.deepcopy(tok)
    old = "'<|im_start|>' + message['role'] + '\n' + message['content']"
    assert old in t.chat_template
    t.chat_template = t.chat_template.replace(old, (
        "'<|im_start|>' + message['role'] + '\n' + (message['content'] | trim if message['role'] == 'system' "
        "and 'colour' in messages[-1]['content'] else message['content'])"))
    sweep = _sweep()
    fast = build_plan(sweep, t, DIMS, clock=CLOCK)
    assert_same_plan(fast, build_plan(sweep, t, DIMS, clock=CLOCK, compose=False))
    assert_matches_render(fast, t, sweep)
    pr = fast.prompts
    pirate = pr[(pr.kind == "variant") & (pr.system == "s1")]
    assert {u: "matey!<|im_end|>" in x for u, x in zip(pirate.user_id, pirate.text)} == \
        {u.id: u.id == "u1" for u in sweep.user_prompts}
    assert 0 < composed_share(t, sweep) < 1


def test_template_that_rewrites_content_is_still_refused(tok):
    """A template that upper-cases the system text (the empty one of the baselines passes):
    the variants rendered for the parts are refused as ``render`` refuses them."""
    t = copy.deepcopy(tok)
    t.chat_template = t.chat_template.replace(
        "message['content']", "(message['content'] | upper if message['role'] == 'system' else message['content'])")
    with pytest.raises(TemplateError, match="changes the system message's content"):
        build_plan(_sweep(), t, DIMS, clock=CLOCK)


def test_added_token_across_the_cut_is_not_composed(tok):
    """An added token that would match across the cut ("\\n<|im_start|>": the prefix ends with
    the newline, the suffix starts with <|im_start|>) joins the two sides in the real
    tokenization: no variant is composed, and the plan is the per-prompt one."""
    t = copy.deepcopy(tok)
    t.add_special_tokens({"additional_special_tokens": ["\n<|im_start|>"]})
    sweep = _sweep()
    fast = build_plan(sweep, t, DIMS, clock=CLOCK)
    assert_same_plan(fast, build_plan(sweep, t, DIMS, clock=CLOCK, compose=False))
    assert_matches_render(fast, t, sweep)
    assert composed_share(t, sweep) == 0
    assert (fast.token_ids == t.convert_tokens_to_ids("\n<|im_start|>")).sum() > 0
