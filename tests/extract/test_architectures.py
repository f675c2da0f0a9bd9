"""The architecture matrix: every family registered in promptshift/extract/arch.py, as a
tiny random model from its real config class, with its real chat template where the family
has one (tests/fixtures/templates), a system prompt longer than every sliding window in the
config, and the longest prompt plus its continuation exactly at the model's context limit.

Each family: packed batches with shared prefixes == padded batches one prompt at a time
(every float array, within its float32 rounding bound), the residual sum identity, every
kept hidden state and the next-token log-probs equal to the model's own forward pass, and
the greedy continuation equal to the model's own ``generate``, from both extractions; then
metrics run on the store."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from promptshift.errors import ExtractError, SweepError
from promptshift.extract.arch import ARCHS, layer_windows
from promptshift.extract.worker import ExtractConfig, fill_shard
from promptshift.models import eos_ids
from promptshift.sweep.config import load_sweep
from promptshift.sweep.plan import ModelDims, build_plan
from promptshift.vocabulary import REGION_CODE
from tests.conftest import REPO, write_sweep
from tests.tolerance import U32, array_bound, assert_below, assert_within, forward_bound, logit_scale_of

TEMPLATES = REPO / "tests" / "fixtures" / "templates"
WINDOW = 16  # every sliding window in the matrix; the long system prompt is ~40 tokens
LONG = ("You are a careful assistant for a busy newsroom. Always answer in exactly one sentence, never use "
        "lists, and end every answer with the word done, because the reader parses it.")
NEW_TOKENS = 4

# family (model_type in ARCHS) -> (template fixture, bos, eos, control tokens), or None: the
# family publishes no chat template (base models), so the embedded tokenizer's own is used
TEMPLATE = {
    "llama": ("llama3", "<|begin_of_text|>", "<|eot_id|>", ["<|start_header_id|>", "<|end_header_id|>"]),
    "mistral": ("mistral-v0.3", "<s>", "</s>", ["[INST]", "[/INST]"]),
    "qwen2": ("qwen2.5", None, "<|im_end|>", ["<|im_start|>", "<|im_end|>"]),
    "qwen3": ("qwen3", None, "<|im_end|>", ["<|im_start|>", "<|im_end|>"]),
    "phi3": ("phi3.5", "<s>", "<|endoftext|>", ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]),
    "olmo2": ("olmo2", "<|endoftext|>", "<|endoftext|>", []),
    "gemma": ("gemma2", "<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"]),  # Gemma 1: the same template
    "gemma2": ("gemma2", "<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"]),
    "gemma3_text": ("gemma3", "<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"]),
    "gpt2": None,
    "gpt_neox": None,
}
NO_SYSTEM_ROLE = {"gemma", "gemma2"}  # their templates raise on a system message


def _build(family: str, vocab: int, context: int):
    """A 2-layer model of ``family`` whose context is ``context`` positions; sliding windows
    (every layer, or mixed with global layers) where the family has them."""
    import transformers as tf

    c = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=context)
    gemma = dict(head_dim=16, query_pre_attn_scalar=16)
    mixed = dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)  # layer 0 global, 1 sliding
    builders = {
        "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(num_key_value_heads=2, **c)),
        "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(num_key_value_heads=1, sliding_window=WINDOW, **c)),
        "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(num_key_value_heads=2, **mixed, **c)),
        "qwen3": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(num_key_value_heads=2, head_dim=16, **mixed, **c)),
        "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(num_key_value_heads=4, pad_token_id=0,
                                                         sliding_window=WINDOW, **c)),
        "olmo2": lambda: tf.Olmo2ForCausalLM(tf.Olmo2Config(num_key_value_heads=2, **c)),
        "gemma": lambda: tf.GemmaForCausalLM(tf.GemmaConfig(num_key_value_heads=1, head_dim=16, **c)),
        "gemma2": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(num_key_value_heads=2, sliding_window=WINDOW,
                                                               attn_logit_softcapping=50.0,
                                                               final_logit_softcapping=30.0, **gemma, **c)),
        "gemma3_text": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
            num_key_value_heads=2, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"],
            **gemma, **c)),
        "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=vocab,
                                                         n_positions=context)),
        "gpt_neox": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, rotary_pct=0.25,
            use_parallel_residual=True, vocab_size=vocab, max_position_embeddings=context)),
    }
    torch.manual_seed(0)
    model = builders[family]().float().eval()
    with torch.no_grad():  # sharper attention than the random init, so a wrong mask or window shows
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
    return model


def _family_tok(tok, family: str):
    """The embedded tokenizer with the family's BOS/EOS, control tokens and published
    template (the text tokens stay SmolLM2's: what is tested is the template's structure)."""
    if TEMPLATE[family] is None:
        return tok
    name, bos, eos, control = TEMPLATE[family]
    t = copy.deepcopy(tok)
    t.add_special_tokens({"eos_token": eos, "additional_special_tokens": control,
                          **({"bos_token": bos} if bos else {})})
    if bos is None:
        t.bos_token = None
    t.chat_template = (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")
    return t


def test_every_registered_family_is_in_the_matrix():
    assert set(TEMPLATE) == set(ARCHS)


@pytest.fixture(scope="module")
def sweep_file(tmp_path_factory):
    systems = [{"name": "long", "text": LONG}, {"name": "brief", "text": "Be brief."}]
    users = [{"id": "capital", "text": "What is the capital of France?", "category": "factual"},
             {"id": "add", "text": "What is 2 + 3? Answer with the number and one short sentence.",
              "category": "reasoning"}]
    return write_sweep(tmp_path_factory.mktemp("arch") / "a.yaml", systems=systems, users=users, keep="all",
                       storage_dtype="float32", max_new_tokens=NEW_TOKENS, block_prompts=4, top_k=8, lens_top_k=3)


def _hf_generate(model, ids, eos):
    x = torch.as_tensor(ids, dtype=torch.long)[None]
    with torch.no_grad():
        return model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS, do_sample=False,
                              eos_token_id=list(eos), pad_token_id=eos[0])[0, x.shape[1]:].numpy()


@pytest.mark.parametrize("family", sorted(ARCHS))
def test_architecture(family, tok, sweep_file):
    ftok = _family_tok(tok, family)
    policy = {"no_system_role": "prepend_to_user"} if family in NO_SYSTEM_ROLE else {}
    s = load_sweep(sweep_file, **policy)
    probe = build_plan(s, ftok, ModelDims(n_layers=2, hidden=64, n_heads=4, vocab=len(ftok), max_positions=None))
    context = int(probe.prompts.n_tokens.max()) + NEW_TOKENS  # the longest prompt ends exactly at the limit
    model = _build(family, len(ftok), context)
    with pytest.raises(SweepError):  # one position fewer: the plan refuses (it would not fit)
        build_plan(s, ftok, ModelDims(n_layers=2, hidden=64, n_heads=4, vocab=len(ftok), max_positions=context - 1))

    a = fill_shard(s, ExtractConfig(store=None, progress=False), model=model, tok=ftok)
    b = fill_shard(load_sweep(sweep_file, token_budget=16, **policy),
                   ExtractConfig(store=None, progress=False, packing=False, prefix_sharing=False), model=model,
                   tok=ftok)
    plan, cfg = a.plan, model.config
    system = REGION_CODE["system"]
    n_sys = [int((plan.prompt_regions(int(v)) == system).sum())
             for v in plan.pairs[plan.pairs.system == "long"].variant]
    windows = [w for w in layer_windows(cfg) if w]
    assert all(n > w for n in n_sys for w in windows), (n_sys, windows)  # the system prompt outgrows every window

    # packed + shared prefixes == padded, one prompt at a time
    n_keys, ls = int(plan.prompts.n_tokens.max()), logit_scale_of(b)
    for name in ("resid_pre", "attn_out", "mlp_out", "resid_post", "attn_region_mass", "attn_last",
                 "logits_topk_logprobs", "lens_topk_logprobs"):
        y = b.array(name)[...]
        bound = array_bound(name, y, cfg, n_keys, vocab=len(ftok), logit_scale=ls)
        assert_within(a.array(name)[...], y, bound, f"{family} {name}")
    real = np.asarray(a.array("token_prompt")[...]) >= 0
    pre, post = a.array("resid_pre")[...][real], a.array("resid_post")[...][real]
    attn, mlp = a.array("attn_out")[...][real], a.array("mlp_out")[...][real]
    # two float32 additions (tests/extract/test_engine.py, test_residual_sum_identity)
    err = np.abs(post.astype(np.float64) - (pre.astype(np.float64) + attn + mlp))
    assert_below(err, 2 * U32 * (1 + U32) * (np.abs(pre) + np.abs(attn) + np.abs(mlp)), f"{family} sum identity")

    # against the model's own forward pass and generate, every prompt
    eos = eos_ids(model, ftok)
    for p in range(plan.n_prompts):
        ids = plan.prompt_tokens(p)
        with torch.no_grad():
            out = model(torch.as_tensor(ids, dtype=torch.long)[None], output_hidden_states=True)
        hs, pos = out.hidden_states, plan.kept_positions(p)
        got = a.component("resid_pre", p)  # (n_kept, L, H)
        for layer in range(len(hs) - 1):  # (the last hidden state is after the final norm)
            bound = forward_bound(cfg, len(ids), float(hs[layer].abs().max()), layer)
            assert_within(got[:, layer], hs[layer][0, pos].numpy(), bound, f"{family} prompt {p} layer {layer}")
        lp = torch.log_softmax(out.logits[0, -1].float(), -1).numpy()
        top = a.array("logits_topk_ids")[p]
        assert top[0] == lp.argmax(), (family, p)
        bound = array_bound("logits_topk_logprobs", lp[top], cfg, n_keys, vocab=len(lp), logit_scale=ls)
        assert_within(a.array("logits_topk_logprobs")[p], lp[top], bound, f"{family} prompt {p} log-probs")
        ref = _hf_generate(model, ids, eos)
        for st in (a, b):
            n = int(st.array("gen_len")[p])
            assert np.array_equal(st.array("gen_ids")[p, :n], ref[:n]), (family, p)

    # and the whole pipeline runs on it: extract -> metrics
    from promptshift.metrics import compute

    tables = compute(a, None, workers=0, n_boot=50, progress=False)
    cc = tables["component_change"]
    assert len(cc) and cc["rel_change"].notna().any() and set(cc.component) == set(a.components)
    assert len(tables["output_change"]) == len(plan.pairs)


def test_unsupported_architecture_names_what_is_missing(tok):
    import transformers as tf

    model = tf.BloomForCausalLM(tf.BloomConfig(hidden_size=32, n_layer=1, n_head=4, vocab_size=len(tok)))
    from promptshift.extract.arch import resolve_arch

    with pytest.raises(ExtractError, match="'bloom' is not supported.*ArchSpec"):
        resolve_arch(model)


def test_a_wrong_archspec_is_refused_before_storing(tok, sweep_file, tmp_path, monkeypatch):
    """OLMo 2 was registered with Llama's hooks, but it normalises each sub-layer's output
    before adding it: the stored attn_out and mlp_out were not what the layer adds. The
    probe before the store now checks the sum identity and names the ArchSpec."""
    model = _build("olmo2", len(tok), 512)
    monkeypatch.setitem(ARCHS, "olmo2", ARCHS["llama"])
    with pytest.raises(ExtractError, match=r"resid_post of layer 0 is not resid_pre \+ attn_out \+ mlp_out.*"
                                           r"'self_attn', 'mlp' in promptshift/extract/arch.py"):
        fill_shard(load_sweep(sweep_file), ExtractConfig(store=str(tmp_path / "s.zarr"), progress=False), model=model,
                   tok=tok)
    assert not (tmp_path / "s.zarr").exists()
    # keeping only the residual stream does not need those hooks
    st = fill_shard(load_sweep(sweep_file, components=["resid_pre", "resid_post"]),
                    ExtractConfig(store=None, progress=False), model=model, tok=tok)
    assert st.components == ("resid_pre", "resid_post")


def test_unsupported_attention_layer_type_is_refused():
    """Layers whose attention is neither global nor a sliding window (Llama 4's chunked
    attention) are refused by name, not run with a wrong mask."""
    import transformers as tf

    from promptshift.extract.arch import layer_windows

    cfg = tf.LlamaConfig(num_hidden_layers=2)
    cfg.layer_types, cfg.attention_chunk_size = ["full_attention", "chunked_attention"], 8
    with pytest.raises(ExtractError, match="layer 1 of 'llama' uses 'chunked_attention' attention"):
        layer_windows(cfg)
    assert layer_windows(tf.Gemma3TextConfig(num_hidden_layers=2, sliding_window=5,
                                             layer_types=["sliding_attention", "full_attention"])) == (5, None)
