"""Exact token regions on template styles, checked against hand-written spans: tokens that
carry template whitespace and content (``ĠHi``), per-message whitespace trimming, contents
placed out of message order, templates that drop or repeat content; plus property tests
over random (unicode, template-looking, whitespace-padded) content against a reference
labelling written from the rule in DESIGN.md."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from promptshift.errors import TemplateError
from promptshift.sweep.chat import conversation, dialogue, injected_default_system, render
from promptshift.vocabulary import REGION_CODE, REGIONS

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


# --- case 1: a token that carries template whitespace and message content --------------------
# The issue's template: system and user text in one [INST] turn (Mistral v0.3 style), with the
# system text in the last user turn; the embedded tokenizer merges the template's space with
# the first word ("ĠHi", "ĠBe").
INST_STYLE = (
    "{% if messages[0]['role'] == 'system' %}{% set s = messages[0]['content'] %}{% set m = messages[1:] %}"
    "{% else %}{% set m = messages %}{% endif %}{% for x in m %}{% if x['role'] == 'user' %}[INST] "
    "{% if s is defined and loop.last %}{{ s }}\n\n{% endif %}{{ x['content'] }}[/INST]"
    "{% else %} {{ x['content'] }}</s>{% endif %}{% endfor %}"
)


@pytest.fixture(scope="module")
def inst_tok(tok):
    t = copy.deepcopy(tok)
    t.chat_template = INST_STYLE
    return t


def test_token_with_template_space_and_system_text_is_system(inst_tok):
    t = inst_tok
    r = render(t, conversation(t, "Hi", "What is 2+2?"))
    assert r.text == "[INST] Hi\n\nWhat is 2+2?[/INST]"
    toks = [t.convert_ids_to_tokens(int(i)) for i in r.ids]
    # hand-written: '[' 'INST' ']' 'ĠHi' 'Ċ' 'Ċ' 'What' 'Ġis' 'Ġ' '2' '+' '2' '?' '[' '/' 'INST' ']'
    assert toks[3] == "ĠHi"
    assert regions_of(r) == (["sink"] + ["template"] * 2 + ["system"] + ["template"] * 2 + ["user"] * 7
                             + ["template"] * 4)
    r = render(t, conversation(t, "Be brief.", "What is 2+2?"))
    assert [t.convert_ids_to_tokens(int(i)) for i in r.ids][3:6] == ["ĠBe", "Ġbrief", "."]
    assert regions_of(r)[3:6] == ["system"] * 3 and r.decode_region(t, "system") == " Be brief."


def test_carried_content_rule_holds_for_every_region_and_turn(inst_tok):
    """The same kind in the user region (no system turn), in an assistant reply (' ' + text)
    and in a later user turn of a dialogue."""
    t = inst_tok
    r = render(t, conversation(t, None, "Hi there"))
    assert regions_of(r)[3] == "user" and r.decode_region(t, "user") == " Hi there"
    msgs = dialogue(t, "Rule.", [{"role": "user", "content": "One"}, {"role": "assistant", "content": "Sure"},
                                 {"role": "user", "content": "Two"}])
    r = render(t, msgs)
    assert r.text == "[INST] One[/INST] Sure</s>[INST] Rule.\n\nTwo[/INST]"
    assert r.decode_region(t, "user") == " OneTwo" and r.decode_region(t, "assistant") == " Sure"
    assert r.decode_region(t, "system") == " Rule."
    # the system text sits inside the last user turn, after the first exchange
    sys_idx = np.flatnonzero(r.regions == REGION_CODE["system"])
    asst_idx = np.flatnonzero(r.regions == REGION_CODE["assistant"])
    assert sys_idx.min() > asst_idx.max()
    assert set(r.turns[r.regions == REGION_CODE["user"]].tolist()) == {0, 1}


def test_prepend_to_user_labels_carried_system_text(nosys_tok):
    t = copy.deepcopy(nosys_tok)
    t.chat_template = NO_SYSTEM_STYLE.replace("m['role'] }}\n{{", "m['role'] }} {{")  # "user Hi": no newline
    r = render(t, conversation(t, "Hi", "What?", no_system_role="prepend_to_user"))
    assert "<start_of_turn>user Hi\n\nWhat?" in r.text
    assert r.decode_region(t, "system") == " Hi" and r.decode_region(t, "user") == "What?"


# --- case 2: any per-message whitespace treatment --------------------------------------------
GEMMA3_STYLE = (  # system text kept as is, folded into the first user turn; only contents trimmed
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set p = messages[0]['content'] + '\n\n' %}"
    "{% set m = messages[1:] %}{% else %}{% set p = '' %}{% set m = messages %}{% endif %}"
    "{% for x in m %}<start_of_turn>{{ 'model' if x['role'] == 'assistant' else x['role'] }}\n"
    "{{ p if loop.first else '' }}{{ x['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def test_system_kept_as_is_user_trimmed(nosys_tok):
    t = copy.deepcopy(nosys_tok)
    t.chat_template = GEMMA3_STYLE
    system, user = "Be brief.\n", "  What is 2+2?\n"  # a YAML block scalar ends in a newline
    r = render(t, conversation(t, system, user))
    assert r.text.endswith("<start_of_turn>user\nBe brief.\n\n\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n")
    sys_span, user_span = r.spans
    assert r.text[sys_span.start : sys_span.end] == system and sys_span.source_start == 0
    assert r.text[user_span.start : user_span.end] == "What is 2+2?" and user_span.source_start == 2
    assert r.decode_region(t, "user") == "What is 2+2?"
    assert r.decode_region(t, "system").startswith("Be brief.\n")


FILTERS = {"as_is": "{{ x['content'] }}", "trim": "{{ x['content'] | trim }}", "lstrip": "{{ x['content'].lstrip() }}",
           "rstrip": "{{ x['content'].rstrip() }}", "newlines": "{{ x['content'].strip('\\n') }}"}
PY_FILTERS = {"as_is": lambda s: s, "trim": str.strip, "lstrip": str.lstrip, "rstrip": str.rstrip,
              "newlines": lambda s: s.strip("\n")}


@pytest.mark.parametrize("sys_f", list(FILTERS))
@pytest.mark.parametrize("user_f", list(FILTERS))
def test_any_per_role_whitespace_treatment(tok, sys_f, user_f):
    """Every combination of per-role trimming (none, both ends, left, right, only newlines)
    on padded contents: spans equal the treated text found in the rendering."""
    t = copy.deepcopy(tok)
    t.chat_template = ("{% for x in messages %}<|im_start|>{{ x['role'] }}\n{% if x['role'] == 'system' %}"
                       + FILTERS[sys_f] + "{% else %}" + FILTERS[user_f] + "{% endif %}<|im_end|>\n{% endfor %}"
                       "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    system, user = " \n Be brief. \n\n", "\n\tWhat is 2+2?  \n"
    r = render(t, conversation(t, system, user))
    want = {"system": PY_FILTERS[sys_f](system), "user": PY_FILTERS[user_f](user)}
    for sp in r.spans:
        header = f"<|im_start|>{sp.region}\n"
        at = r.text.index(header) + len(header)
        assert (sp.start, sp.end) == (at, at + len(want[sp.region])), (sp.region, sys_f, user_f)
        src = system if sp.region == "system" else user
        assert src[sp.source_start : sp.source_start + sp.end - sp.start] == want[sp.region]
    _check_reference_labels(r, [(sp.region, sp.start, sp.end) for sp in r.spans])


# --- case 3: placement, drops and repeats ---------------------------------------------------------
def test_template_that_drops_or_repeats_content_is_refused(tok):
    t = copy.deepcopy(tok)
    t.chat_template = ("{% for x in messages %}{% if x['role'] == 'user' %}<|im_start|>user\n"
                       "{{ messages[0]['content'] }}"
                       "\n{{ x['content'] }}<|im_end|>\n{% endif %}{% endfor %}")
    msgs = dialogue(t, "Rule.", [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                 {"role": "user", "content": "c"}])
    with pytest.raises(TemplateError, match=r"renders the system message's content \(message 0 .*\) 2 times"):
        render(t, msgs)
    with pytest.raises(TemplateError, match=r"drops the assistant message's content \(message 2"):
        render(t, msgs[:3])  # system, user, assistant: the assistant reply is not rendered


def test_rewritten_content_names_the_message(tok):
    t = copy.deepcopy(tok)
    t.chat_template = ("{% for x in messages %}<|im_start|>{{ x['role'] }}\n{{ x['content'] | upper if x['role'] == "
                       "'user' else x['content'] }}<|im_end|>\n{% endfor %}")
    with pytest.raises(TemplateError, match=r"changes the user message's content \(message 1\) beyond trimming"):
        render(t, conversation(t, "Be brief.", "hello"))


def test_empty_system_message_left_out_by_template(tok):
    """Phi-3.5 renders no system turn for an empty system message: matched with the empty
    content left empty, not refused."""
    t = copy.deepcopy(tok)
    t.chat_template = ("{% for x in messages %}{% if x['role'] != 'system' or x['content'] %}"
                       "<|im_start|>{{ x['role'] }}"
                       "\n{{ x['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
                       "{% if add_generation_prompt %}<|im_start|>assistant\n{% else %}<|endoftext|>{% endif %}")
    r = render(t, conversation(t, None, "Hi", empty_system=True))
    assert r.text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert r.decode_region(t, "user") == "Hi" and r.decode_region(t, "gen_prompt") == "<|im_start|>assistant\n"


# --- property tests: random contents, reference labelling ------------------------------------------
def _check_reference_labels(r, spans):
    """The rule, written out char by char: a token takes the region of the first
    non-whitespace content character it carries, else of its first content character;
    tokens that carry no content are scaffolding (sink, template or gen_prompt)."""
    region_at = {}
    for region, a, b in spans:
        for c in range(a, b):
            region_at[c] = region
    for i, (s, e) in enumerate(r.offsets):
        if i == 0:
            assert REGIONS[r.regions[0]] == "sink"
            continue
        chars = [c for c in range(s, e) if c in region_at]
        solid = [c for c in chars if not r.text[c].isspace()]
        got = REGIONS[r.regions[i]]
        if solid or chars:
            assert got == region_at[(solid or chars)[0]], (i, r.text[s:e], got)
        else:
            assert got in ("template", "gen_prompt"), (i, r.text[s:e], got)


TEMPLATE_LIKE = st.sampled_from(["<|im_start|>system\n", "<|im_end|>", "[INST]", "{{ x }}", "{% if %}", "\n\n",
                                 "assistant\n", "<s>", " ", "é", "日本語", "🙂", "\t"])
CONTENT = st.lists(st.one_of(st.text(min_size=1, max_size=12), TEMPLATE_LIKE), min_size=1, max_size=6).map("".join)
PAD = st.sampled_from(["", " ", "\n", " \n ", "\t"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(system=CONTENT, user=CONTENT, lead=PAD, trail=PAD)
def test_regions_property(tok, system, user, lead, trail):
    system, user = lead + system + trail, trail + user + lead
    r = render(tok, conversation(tok, system, user))
    assert len(r.regions) == len(r.ids) and set(np.unique(r.regions)) <= set(range(len(REGIONS)))
    assert not (len(r.ids) > 1 and r.ids[0] == r.ids[1] == tok.bos_token_id)
    # spans of the contents in the rendered text, found independently of render()
    s0 = r.text.index("system\n") + len("system\n")
    u0 = r.text.index("<|im_start|>user\n", s0 + len(system)) + len("<|im_start|>user\n")
    assert r.text[s0 : s0 + len(system)] == system and r.text[u0 : u0 + len(user)] == user
    assert [(sp.region, sp.start, sp.end) for sp in r.spans] == [("system", s0, s0 + len(system)),
                                                                ("user", u0, u0 + len(user))]
    _check_reference_labels(r, [("system", s0, s0 + len(system)), ("user", u0, u0 + len(user))])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(system=CONTENT, user=CONTENT, lead=PAD, trail=PAD)
def test_regions_property_issue_template(inst_tok, system, user, lead, trail):
    """Contents that begin right after the template's space: the reference rule on every token."""
    t = inst_tok
    system, user = lead + system + trail, lead + user + trail
    r = render(t, conversation(t, system, user))
    s0 = len("[INST] ")
    u0 = s0 + len(system) + 2
    assert r.text == f"[INST] {system}\n\n{user}[/INST]"
    _check_reference_labels(r, [("system", s0, s0 + len(system)), ("user", u0, u0 + len(user))])
