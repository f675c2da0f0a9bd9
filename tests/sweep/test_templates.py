"""Real chat templates of the common families (tests/fixtures/templates, sources in its
README) on two offline tokenizers: the embedded one with each family's control tokens,
and a tiny SentencePiece-style BPE whose merges cross template/content boundaries (``▁``
carries the template's spaces; ``\\nWhat▁is`` mixes scaffolding and user text). Every
family renders the published outputs; every token of variants, baselines, block-scalar
contents, ``prepend_to_user`` and three-turn dialogues is labelled by the rule; the system
text lands where each template puts it (first user turn, last user turn, own turn); plans
align."""

from __future__ import annotations

import copy
from datetime import datetime

import numpy as np
import pytest

from promptshift.errors import TemplateError
from promptshift.sweep.chat import (TemplateClock, conversation, dialogue, injected_default_system, render,
                                    template_has_system_role)
from promptshift.sweep.config import load_sweep
from promptshift.sweep.plan import ModelDims, build_plan
from promptshift.vocabulary import REGION_CODE
from tests.conftest import REPO, write_sweep
from tests.sweep.test_chat import _check_reference_labels

FIXTURES = REPO / "tests" / "fixtures" / "templates"
# bos, eos, control tokens of each family's own tokenizer
FAMILIES = {
    "llama2": ("<s>", "</s>", []),
    "llama3": ("<|begin_of_text|>", "<|eot_id|>", ["<|start_header_id|>", "<|end_header_id|>"]),
    "llama3.1": ("<|begin_of_text|>", "<|eot_id|>", ["<|start_header_id|>", "<|end_header_id|>"]),
    "llama3.2": ("<|begin_of_text|>", "<|eot_id|>", ["<|start_header_id|>", "<|end_header_id|>"]),
    "mistral-v0.1": ("<s>", "</s>", []),
    "mistral-v0.3": ("<s>", "</s>", ["[INST]", "[/INST]"]),
    "mistral-nemo": ("<s>", "</s>", ["[INST]", "[/INST]"]),
    "mistral-small3.2": ("<s>", "</s>", ["[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]),
    "gemma2": ("<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"]),
    "gemma3": ("<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"]),
    "qwen2.5": (None, "<|im_end|>", ["<|im_start|>", "<|im_end|>"]),
    "qwen3": (None, "<|im_end|>", ["<|im_start|>", "<|im_end|>"]),
    "phi3": ("<s>", "<|endoftext|>", ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]),
    "phi3.5": ("<s>", "<|endoftext|>", ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]),
    "phi4": ("<|endoftext|>", "<|im_end|>", ["<|im_start|>", "<|im_sep|>", "<|im_end|>"]),
    "zephyr": ("<s>", "</s>", []),
}
NO_SYSTEM_ROLE = {"gemma2", "phi3"}  # raises on a system message / drops it
SYSTEM_IN_LAST_TURN = {"mistral-v0.3", "mistral-nemo"}
CLOCK = TemplateClock(datetime(2024, 7, 26, 12, 0))


def test_every_family_has_its_published_template():
    assert set(FAMILIES) <= {p.stem for p in FIXTURES.glob("*.jinja")}


_CACHE: dict = {}


def family_tok(base, family: str):
    """``base`` with the family's BOS/EOS, control tokens and published template (built
    once per base tokenizer and family; tests only read it)."""
    key = (id(base), family)
    if key not in _CACHE:
        _CACHE[key] = (base, _family_tok(base, family))  # keeps base alive so its id stays unique
    return _CACHE[key][1]


def _family_tok(base, family: str):
    bos, eos, control = FAMILIES[family]
    t = copy.deepcopy(base)
    t.add_special_tokens({"eos_token": eos, "additional_special_tokens": control,
                          **({"bos_token": bos} if bos else {})})
    if bos is None:
        t.bos_token = None
    t.chat_template = (FIXTURES / f"{family}.jinja").read_text(encoding="utf-8")
    return t


REFERENCE = [{"role": role, "content": text} for role, text in (
    ("system", "You are a helpful assistant"), ("user", "Hello"), ("assistant", "Hi there"), ("user", "Who are you"),
    ("assistant", "   I am an assistant   "), ("user", "Another question"))]
# Published renderings of REFERENCE (add_generation_prompt=True), as transformers/jinja2 render
# them: llama.cpp's tests/test-chat-template.cpp ("expected_output_jinja") for the Mistral and
# phi-4 templates, mistral.rs's transformers-generated cases for Llama 2.
PUBLISHED = {
    "llama2": ("<s>", "</s>",
        "<s>[INST] <<SYS>>\nYou are a helpful assistant\n<</SYS>>\n\nHello [/INST] Hi there "
        "</s><s>[INST] Who are you [/INST] I am an assistant </s><s>[INST] Another question "
        "[/INST]"),
    "mistral-v0.1": ("", "</s>",
        " [INST] You are a helpful assistant\n\nHello [/INST] Hi there</s> [INST] Who are yo"
        "u [/INST]    I am an assistant   </s> [INST] Another question [/INST]"),
    "mistral-v0.3": ("", "</s>",
        "[INST] Hello[/INST] Hi there</s>[INST] Who are you[/INST] I am an assistant</s>[INS"
        "T] You are a helpful assistant\n\nAnother question[/INST]"),
    "mistral-nemo": ("", "</s>",
        "[INST]Hello[/INST]Hi there</s>[INST]Who are you[/INST]   I am an assistant   </s>[I"
        "NST]You are a helpful assistant\n\nAnother question[/INST]"),
    "phi4": ("", "",
        "<|im_start|>system<|im_sep|>You are a helpful assistant<|im_end|><|im_start|>user<|"
        "im_sep|>Hello<|im_end|><|im_start|>assistant<|im_sep|>Hi there<|im_end|><|im_start|"
        ">user<|im_sep|>Who are you<|im_end|><|im_start|>assistant<|im_sep|>   I am an assis"
        "tant   <|im_end|><|im_start|>user<|im_sep|>Another question<|im_end|><|im_start|>as"
        "sistant<|im_sep|>"),
}
# One user turn "Hi" (jinja2 3.1.6 with transformers' settings, bos rendered empty; from the
# jlib project's fixtures, which read each template out of the model's GGUF file).
PUBLISHED_HI = {
    "gemma2": (
        "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"),
    "qwen2.5": (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assis"
        "tant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
    "llama3.2": (
        "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023"
        "\nToday Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        "Hi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
    "zephyr": (
        "<|user|>\nHi</s>\n<|assistant|>\n"),
}


@pytest.mark.parametrize("family", sorted(PUBLISHED))
def test_fixture_renders_the_published_conversation(family):
    bos, eos, want = PUBLISHED[family]
    got = _jinja(family, REFERENCE, bos, eos)
    assert got == want


@pytest.mark.parametrize("family", sorted(PUBLISHED_HI))
def test_fixture_renders_the_published_single_turn(family):
    eos = FAMILIES[family][1]
    assert _jinja(family, [{"role": "user", "content": "Hi"}], "", eos) == PUBLISHED_HI[family]


def _jinja(family, messages, bos, eos):
    """Render a fixture as transformers does, with the clock fixed at 26 Jul 2024."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from promptshift.sweep.chat import _pinned_clock

    class _T:  # _pinned_clock needs only the template text and apply_chat_template for its check
        chat_template = (FIXTURES / f"{family}.jinja").read_text(encoding="utf-8")

        def apply_chat_template(self, messages, tokenize, chat_template):
            return render_jinja_template([messages], chat_template=chat_template)[0][0]

    with _pinned_clock(_T(), CLOCK):
        out, _ = render_jinja_template([messages], chat_template=_T.chat_template, add_generation_prompt=True,
                                       bos_token=bos, eos_token=eos)
    return out[0]


def _conversations(t, family):
    policy = "prepend_to_user" if family in NO_SYSTEM_ROLE else "error"
    conv = lambda s, u, **kw: conversation(t, s, u, no_system_role=policy, clock=CLOCK, **kw)  # noqa: E731
    out = {
        "variant": conv("Be brief.", "What is 2+2?"),
        "block_scalar": conv("Be brief.\n", " What is 2+2? \n"),
        "no_system_turn": conv(None, "What is 2+2?"),
        "dialogue": dialogue(t, "Rule.", [{"role": "user", "content": "one"}, {"role": "assistant", "content": "Sure"},
                                          {"role": "user", "content": "two"}, {"role": "assistant", "content": "Never"},
                                          {"role": "user", "content": "three"}], no_system_role=policy, clock=CLOCK),
    }
    if family not in NO_SYSTEM_ROLE:
        out["empty_system"] = conv(None, "What is 2+2?", empty_system=True)
    return out


@pytest.mark.parametrize("tokenizer", ["embedded", "sentencepiece"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_token_labelled_by_the_content_it_carries(tok, sp_tok, family, tokenizer):
    t = family_tok(tok if tokenizer == "embedded" else sp_tok, family)
    for name, msgs in _conversations(t, family).items():
        r = render(t, msgs, clock=CLOCK)
        # every message's text is found (trimmed or not), in a span of its role's region
        texts = [(m["role"], m["content"]) if isinstance(m["content"], str) else None for m in msgs]
        for sp in r.spans:
            if sp.message < 0:  # a default system prompt the template added
                continue
            c = msgs[sp.message]["content"]
            text = c if isinstance(c, str) else dict((reg, x) for reg, x in c if reg != "template")[sp.region]
            assert r.text[sp.start : sp.end].strip() == text.strip(), (family, name, sp)
            assert sp.region == (texts[sp.message][0] if texts[sp.message] else sp.region)
        n_msgs = sum(1 for m in msgs for _ in ([0] if isinstance(m["content"], str) else
                                                [x for x in m["content"] if x[0] != "template"]))
        n_empty = sum(1 for m in msgs if m["content"] == "")
        assert len([sp for sp in r.spans if sp.message >= 0]) == n_msgs - n_empty, (family, name)
        _check_reference_labels(r, [(sp.region, sp.start, sp.end) for sp in r.spans])
        assert r.decode_region(t, "user").replace(" ", "").replace("\n", "") != ""


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_system_text_lands_where_the_template_puts_it(tok, family):
    """Right values for the placement kind: how many user turns precede the system text
    in a three-turn dialogue (Mistral v0.3 and Nemo put it into the last user turn)."""
    t = family_tok(tok, family)
    r = render(t, _conversations(t, family)["dialogue"], clock=CLOCK)
    sys_span = next(sp for sp in r.spans if sp.region == "system")
    before = sum(1 for sp in r.spans if sp.region == "user" and sp.end <= sys_span.start)
    assert before == (2 if family in SYSTEM_IN_LAST_TURN else 0)
    sys_tokens = r.ids[r.regions == REGION_CODE["system"]]
    assert t.decode(sys_tokens).strip() == "Rule."
    # the system tokens are one run, and every user turn keeps its own turn index
    idx = np.flatnonzero(r.regions == REGION_CODE["system"])
    assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1))
    assert sorted(set(r.turns[r.regions == REGION_CODE["user"]].tolist())) == [0, 1, 2]


def test_families_without_system_role_are_refused_by_default(tok):
    for family in NO_SYSTEM_ROLE:
        t = family_tok(tok, family)
        assert not template_has_system_role(t)
        with pytest.raises(TemplateError, match="no system role"):
            conversation(t, "Be brief.", "Hi")


def test_default_system_prompts(tok):
    """Qwen2.5 and Mistral Small 3.2 add a default system prompt when there is none (the
    latter with today's date, from the clock); the others do not."""
    found = {f: injected_default_system(family_tok(tok, f), CLOCK) for f in FAMILIES}
    assert {f for f, v in found.items() if v} == {"qwen2.5", "mistral-small3.2"}
    assert "The current date is 2024-07-26." in found["mistral-small3.2"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_plan_aligns_every_family(tok, tmp_path, family):
    t = family_tok(tok, family)
    extra = {"no_system_role": "prepend_to_user"} if family in NO_SYSTEM_ROLE else {}
    s = load_sweep(write_sweep(tmp_path / "s.yaml", **extra))
    plan = build_plan(s, t, ModelDims(2, 8, 2, len(t), 4096))
    for r in plan.pairs.itertuples():
        v = plan.prompt_tokens(r.variant)[r.v_suffix_start :]
        b = plan.prompt_tokens(r.baseline)[r.b_suffix_start :]
        assert r.suffix_len > 0 and np.array_equal(v, b)
    variants = plan.prompts[plan.prompts.kind == "variant"]
    assert (variants.n_system_tokens > 0).all()


def test_fixture_sources_are_listed():
    text = (FIXTURES / "README.md").read_text(encoding="utf-8")
    for p in FIXTURES.glob("*.jinja"):
        assert f"`{p.name}`" in text, f"{p.name} needs a row (its source model) in {FIXTURES / 'README.md'}"



def test_sentencepiece_token_with_template_space_is_system(sp_tok):
    """Case 1's kind on a SentencePiece-style tokenizer: Mistral v0.1 writes ' [INST] ' before
    the system text, and ``▁Hi`` carries that space; it is the one system token."""
    t = family_tok(sp_tok, "mistral-v0.1")
    r = render(t, conversation(t, "Hi", "What is 2+2?"))
    sys_span = r.spans[0]
    assert r.text[sys_span.start : sys_span.end] == "Hi"
    carrying = [i for i, (s, e) in enumerate(r.offsets) if s < sys_span.end and e > sys_span.start]
    assert len(carrying) == 1
    (i,) = carrying
    assert r.offsets[i][0] < sys_span.start  # the token starts with the template's space
    assert np.flatnonzero(r.regions == REGION_CODE["system"]).tolist() == [i]
