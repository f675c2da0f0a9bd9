"""The architecture matrix: tiny random models from real config classes of each family.
Each must give batched == one-at-a-time, the residual sum identity, and hidden states
equal to the model's own ``output_hidden_states`` (for packed and padded batches alike)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from promptshift.errors import ExtractError
from promptshift.extract.run import ExtractConfig, extract
from promptshift.sweep.config import load_sweep
from tests.conftest import write_sweep
from tests.tolerance import U32, array_bound, assert_below, assert_within, forward_bound, logit_scale_of


def _build(family: str, vocab: int):
    import transformers as tf

    common = dict(vocab_size=vocab, max_position_embeddings=512)
    if family == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                  num_attention_heads=4, num_key_value_heads=2, **common))
    if family == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                  num_attention_heads=4, num_key_value_heads=2, **common))
    if family == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                      num_attention_heads=4, num_key_value_heads=1,
                                                      sliding_window=24, **common))
    if family == "gemma2":
        return tf.Gemma2ForCausalLM(tf.Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                                    query_pre_attn_scalar=16, sliding_window=24,
                                                    attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                                                    **common))
    if family == "gemma3":
        return tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                                        query_pre_attn_scalar=16, sliding_window=24,
                                                        layer_types=["sliding_attention", "full_attention"],
                                                        **common))
    if family == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=vocab, n_positions=512))
    if family == "phi3":
        return tf.Phi3ForCausalLM(tf.Phi3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=4, pad_token_id=0,
                                                **common))
    if family == "gpt_neox":
        return tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                      num_attention_heads=4, rotary_pct=0.25,
                                                      use_parallel_residual=True, **common))
    raise ValueError(family)


FAMILIES = ["llama", "qwen2", "mistral", "gemma2", "gemma3", "gpt2", "phi3", "gpt_neox"]


@pytest.fixture(scope="module")
def sweep_file(tmp_path_factory):
    return write_sweep(tmp_path_factory.mktemp("arch") / "a.yaml", keep="all", storage_dtype="float32",
                       max_new_tokens=3, block_prompts=4, top_k=8, lens_top_k=3)


@pytest.mark.parametrize("family", FAMILIES)
def test_architecture(family, tok, sweep_file):
    from promptshift.extract.engine import Engine

    torch.manual_seed(0)
    model = _build(family, len(tok)).float().eval()
    # batches are packed (real tokens only outside attention) for every family, sliding
    # windows included (their masks come from positions); the comparisons below check
    # packed batches with shared prefixes against padded ones without
    eng = Engine(model, components=("resid_post",), top_k=2, lens_top_k=2, token_budget=64)
    eng.remove_hooks()
    assert eng.packed, family
    s = load_sweep(sweep_file)
    a = extract(s, ExtractConfig(store=None, progress=False), model=model, tok=tok)
    b = extract(load_sweep(sweep_file, token_budget=16), ExtractConfig(store=None, progress=False, packing=False,
                                                                         prefix_sharing=False), model=model, tok=tok)
    n_keys, ls = int(a.plan.prompts.n_tokens.max()), logit_scale_of(b)
    for name in ("resid_pre", "attn_out", "mlp_out", "resid_post", "attn_region_mass", "logits_topk_logprobs",
                 "lens_topk_logprobs"):
        y = b.array(name)[...]
        bound = array_bound(name, y, model.config, n_keys, vocab=len(tok), logit_scale=ls,
                            float16=np.asarray(y).dtype == np.float16)
        assert_within(a.array(name)[...], y, bound, f"{family} {name}")
    real = np.asarray(a.array("token_prompt")[...]) >= 0
    pre, post = a.array("resid_pre")[...][real], a.array("resid_post")[...][real]
    attn, mlp = a.array("attn_out")[...][real], a.array("mlp_out")[...][real]
    # two float32 additions (tests/extract/test_engine.py, test_residual_sum_identity)
    err = np.abs(post.astype(np.float64) - (pre.astype(np.float64) + attn + mlp))
    assert_below(err, 2 * U32 * (1 + U32) * (np.abs(pre) + np.abs(attn) + np.abs(mlp)), f"{family} sum identity")
    # (resid_pre[l] == resid_post[l-1] bit for bit: extract() checked it for this family
    # with every layer captured, and would have raised; the store derives it from there)
    # against the model's own hidden states (all but the last, which is after the final norm)
    p = int(a.plan.pairs.iloc[0].variant)
    ids = torch.as_tensor(a.plan.prompt_tokens(p), dtype=torch.long)[None]
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    pos = a.plan.kept_positions(p)
    got = a.component("resid_pre", p)
    for layer in range(len(hs) - 1):
        bound = forward_bound(model.config, ids.shape[1], float(hs[layer].abs().max()), layer)
        assert_within(got[:, layer], hs[layer][0, pos].numpy(), bound, f"{family} layer {layer}")
    # and the whole pipeline runs on it: extract -> metrics
    from promptshift.metrics import compute

    tables = compute(a, None, workers=0, n_boot=50, progress=False)
    cc = tables["component_change"]
    assert len(cc) and cc["rel_change"].notna().any() and set(cc.component) == set(a.components)
    assert len(tables["output_change"]) == len(a.plan.pairs)


def test_unsupported_architecture_names_what_is_missing(tok):
    import transformers as tf

    model = tf.BloomForCausalLM(tf.BloomConfig(hidden_size=32, n_layer=1, n_head=4, vocab_size=len(tok)))
    from promptshift.extract.arch import resolve_arch

    with pytest.raises(ExtractError, match="'bloom' is not supported.*ArchSpec"):
        resolve_arch(model)
