"""Exact token regions on three template styles, checked against hand-written spans, plus
property tests over random (unicode, template-looking) content."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from promptshift.errors import TemplateError
from promptshift.sweep.chat import REGION_CODE, REGIONS, conversation, injected_default_system, render

LLAMA3_STYLE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
NO_SYSTEM_STYLE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def regions_of(r):
    return [REGIONS[g] for g in r.regions]


@pytest.fixture(scope="module")
def llama3_tok(tok):
    """The embedded tokenizer turned into a Llama-3-like one: a distinct BOS that the
    tokenizer adds by default *and* the template writes (the double-BOS trap)."""
    from tokenizers.processors import TemplateProcessing

    t = copy.deepcopy(tok)
    t.add_special_tokens({"bos_token": "<|begin_of_text|>",
                          "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    bos = t.convert_tokens_to_ids("<|begin_of_text|>")
    t._tokenizer.post_processor = TemplateProcessing(single="<|begin_of_text|> $A",
                                                     special_tokens=[("<|begin_of_text|>", bos)])
    t.chat_template = LLAMA3_STYLE
    assert t("x")["input_ids"][0] == bos  # a naive re-tokenization would add a second BOS
    return t


@pytest.fixture(scope="module")
def nosys_tok(tok):
    t = copy.deepcopy(tok)
    t.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    t.chat_template = NO_SYSTEM_STYLE
    return t


def test_chatml_hand_written_spans(tok):
    r = render(tok, conversation(tok, "Be brief.", "What is 2+2?"))
    expected = (["sink"] + ["template"] * 2 + ["system"] * 3 + ["template"] * 5 + ["user"] * 7 + ["template"] * 2
                + ["gen_prompt"] * 4)
    assert regions_of(r) == expected
    assert r.decode_region(tok, "system") == "Be brief."
    assert r.decode_region(tok, "user") == "What is 2+2?"
    assert tok.decode(r.ids[r.regions == REGION_CODE["gen_prompt"]]) == "<|im_start|>assistant\n"
    assert r.injected_system is None


def test_chatml_default_system_prompt_is_detected(tok):
    default = injected_default_system(tok)
    assert default and "SmolLM" in default
    r = render(tok, conversation(tok, None, "Hi"))
    assert r.injected_system == default
    assert r.decode_region(tok, "system") == default  # labelled as system text, which it is
    empty = render(tok, conversation(tok, None, "Hi", empty_system=True))
    assert empty.injected_system is None and not (empty.regions == REGION_CODE["system"]).any()


def test_llama3_style_single_bos(llama3_tok):
    t = llama3_tok
    r = render(t, conversation(t, "  Be brief.  ", "What is 2+2?"))
    bos = t.bos_token_id
    assert r.ids[0] == bos and (r.ids == bos).sum() == 1
    # hand-written: BOS, header(3: start, 'system', end) + '\n\n', content, eot, user header..., content, eot, gen
    dec = [t.decode([i]) for i in r.ids]
    assert dec[0] == "<|begin_of_text|>" and regions_of(r)[0] == "sink"
    assert r.decode_region(t, "system") == "Be brief."  # the template trims; spans follow
    assert r.decode_region(t, "user") == "What is 2+2?"
    gp = r.ids[r.regions == REGION_CODE["gen_prompt"]]
    assert t.decode(gp) == "<|start_header_id|>assistant<|end_header_id|>\n\n"


def test_template_without_bos_gets_one_from_tokenizer(llama3_tok):
    t = copy.deepcopy(llama3_tok)
    t.chat_template = LLAMA3_STYLE.replace("{{ bos_token }}", "")
    r = render(t, conversation(t, "Sys", "User"))
    assert r.ids[0] == t.bos_token_id and (r.ids == t.bos_token_id).sum() == 1
    assert r.offsets[0].tolist() == [0, 0] and regions_of(r)[0] == "sink"


def test_no_system_role_error_and_policy(nosys_tok):
    t = nosys_tok
    with pytest.raises(TemplateError, match="no system role"):
        conversation(t, "Be brief.", "Hi")
    msgs = conversation(t, "Be brief.", "What is 2+2?", no_system_role="prepend_to_user")
    r = render(t, msgs)
    assert r.decode_region(t, "system") == "Be brief."
    assert r.decode_region(t, "user") == "What is 2+2?"
    sys_idx = np.flatnonzero(r.regions == REGION_CODE["system"])
    user_idx = np.flatnonzero(r.regions == REGION_CODE["user"])
    assert sys_idx.max() < user_idx.min()
    assert regions_of(r)[0] == "sink"


def test_multi_turn_turn_indices(tok):
    msgs = [{"role": "system", "content": "Rule."}, {"role": "user", "content": "one"},
            {"role": "assistant", "content": "reply"}, {"role": "user", "content": "two"}]
    r = render(tok, msgs)
    users = r.turns[r.regions == REGION_CODE["user"]]
    assert sorted(set(users.tolist())) == [0, 1]
    assert r.decode_region(tok, "assistant") == "reply"


TEMPLATE_LIKE = st.sampled_from(["<|im_start|>system\n", "<|im_end|>", "[INST]", "{{ x }}", "{% if %}", "\n\n",
                                 "assistant\n", "<s>", " ", "é", "日本語", "🙂", "\t"])
CONTENT = st.lists(st.one_of(st.text(min_size=1, max_size=12), TEMPLATE_LIKE), min_size=1, max_size=6).map("".join)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(system=CONTENT, user=CONTENT)
def test_regions_property(tok, system, user):
    r = render(tok, conversation(tok, system, user))
    assert len(r.regions) == len(r.ids) and set(np.unique(r.regions)) <= set(range(len(REGIONS)))
    assert r.regions[0] == REGION_CODE["sink"]
    assert not (len(r.ids) > 1 and r.ids[0] == r.ids[1] == tok.bos_token_id)
    # spans of the contents in the rendered text
    s0 = r.text.index("system\n") + len("system\n")
    spans = {"system": (s0, s0 + len(system))}
    u0 = r.text.index("<|im_start|>user\n", spans["system"][1]) + len("<|im_start|>user\n")
    spans["user"] = (u0, u0 + len(user))
    assert r.text[slice(*spans["user"])] == user
    for region, (a, b) in spans.items():
        code = REGION_CODE[region]
        for i, (s, e) in enumerate(r.offsets):
            if i == 0 or e <= s:
                continue
            if a <= s and e <= b:  # wholly inside the content: labelled with it
                assert r.regions[i] == code, (region, i)
            if r.regions[i] == code:  # labelled with it: starts inside it
                assert a <= s < b
