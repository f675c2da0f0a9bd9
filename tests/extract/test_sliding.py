"""Sliding-window models with prompts longer than the window: every stored value against
the model's own forward pass and its own ``generate``, one prompt at a time.

The case that crashed: tiny Mistral, ``sliding_window: 24``, a system prompt of ~40 tokens
shared as a prefix by its prompts. The same kind, not named there: Gemma-3-style models
that mix sliding and global layers, with a window shorter than the user turn itself, in
batches that mix prefixes of different lengths (gaps between a row's prefix and its own
tokens), left padding, and greedy continuations that run past the window in merged decode
batches (gaps between a row's prompt and its generated tokens)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from promptshift.extract.worker import ExtractConfig, fill_shard
from promptshift.sweep.config import load_sweep
from promptshift.vocabulary import REGION_CODE
from tests.conftest import write_sweep
from tests.tolerance import array_bound, assert_within, forward_bound, logit_scale_of

LONG = ("You are a careful assistant for a busy newsroom. Always answer in exactly one sentence, never use "
        "lists, and end every answer with the word done, because the reader parses it.")


def _model(family: str, vocab: int, window: int):
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=512)
    if family == "mistral":  # every layer slides
        m = tf.MistralForCausalLM(tf.MistralConfig(num_key_value_heads=1, sliding_window=window, **common))
    elif family == "gemma3":  # a sliding layer, then a global one
        m = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                                                     sliding_window=window,
                                                     layer_types=["sliding_attention", "full_attention"], **common))
    else:
        raise ValueError(family)
    m = m.float().eval()
    with torch.no_grad():  # sharper attention than the random init, so a wrong window shows
        for name, p in m.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
    return m


@pytest.fixture(scope="module")
def sweep_file(tmp_path_factory):
    systems = [{"name": "long", "text": LONG}, {"name": "brief", "text": "Be brief."}]
    return write_sweep(tmp_path_factory.mktemp("sliding") / "s.yaml", systems=systems, keep="all",
                       storage_dtype="float32", max_new_tokens=12, top_k=8, lens_top_k=3)


def _hf(model, ids):
    """The model's own forward (its own attention implementation and sliding-window cache)."""
    x = torch.as_tensor(ids, dtype=torch.long)[None]
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
    return [h[0].numpy() for h in out.hidden_states], out.logits[0, -1]


def _hf_attentions(model, ids):
    impl = model.config._attn_implementation
    model.config._attn_implementation = "eager"
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = "eager"
    try:
        with torch.no_grad():
            return model(torch.as_tensor(ids, dtype=torch.long)[None], output_attentions=True).attentions
    finally:
        model.config._attn_implementation = impl


def _generate(model, ids, n, eos):
    x = torch.as_tensor(ids, dtype=torch.long)[None]
    with torch.no_grad():
        return model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                              pad_token_id=eos, eos_token_id=eos)[0, x.shape[1]:].numpy()


@pytest.mark.parametrize("family,window,options", [
    ("mistral", 24, {}),  # the handed case: packed, shared prefixes
    ("mistral", 24, {"packing": False}),  # the same, padded
    ("gemma3", 6, {"packing": False, "padding_side": "left", "min_shared": 2}),
    ("gemma3", 6, {"prefix_sharing": False}),
])
def test_prompts_longer_than_the_window_match_the_model(family, window, options, tok, sweep_file):
    model = _model(family, len(tok), window)
    s = load_sweep(sweep_file)
    st = fill_shard(s, ExtractConfig(store=None, progress=False, **options), model=model, tok=tok)
    plan = st.plan
    long_n = int(plan.prompts[plan.prompts.system == "long"].n_tokens.min())
    long_sys = int((plan.prompt_regions(int(plan.prompts.index[plan.prompts.system == "long"][0]))
                    == REGION_CODE["system"]).sum())
    assert long_sys > window and long_n > 2 * window  # the prefix alone is longer than the window
    cfg, n_keys = model.config, int(plan.prompts.n_tokens.max())
    for p in range(plan.n_prompts):
        ids = plan.prompt_tokens(p)
        hs, logits = _hf(model, ids)
        pos = plan.kept_positions(p)
        post = st.component("resid_post", p)  # (n_kept, L, H)
        for layer in range(len(hs) - 2):  # the last hidden state is after the final norm
            assert_within(post[:, layer], hs[layer + 1][pos],
                          forward_bound(cfg, n_keys, np.abs(hs[layer + 1]).max(), layer + 1), (p, layer))
        lp = torch.log_softmax(logits.float(), -1).numpy()
        top = st.array("logits_topk_ids")[p]
        assert top[0] == lp.argmax()
        bound = array_bound("logits_topk_logprobs", lp[top], cfg, n_keys, vocab=len(lp),
                            logit_scale=logit_scale_of(st))
        assert_within(st.array("logits_topk_logprobs")[p], lp[top], bound, p)
        # greedy continuation: past the window, in decode batches merged across prompt lengths
        n = int(st.array("gen_len")[p])
        ref = _generate(model, ids, s.max_new_tokens, tok.eos_token_id)
        assert np.array_equal(st.array("gen_ids")[p, :n], ref[:n]), p
    # attention: the last query's row is zero outside the window, as in the model's own eager attention
    for p in (0, int(plan.prompts.index[plan.prompts.system == "long"][-1])):  # shorter, longer than the window
        ids = plan.prompt_tokens(p)
        att = _hf_attentions(model, ids)
        got = st.attn_last_row(p)  # (n_keys, L, NH)
        for layer, a in enumerate(att):
            ref = a[0, :, -1, :].numpy().T  # (n_keys, NH)
            b = array_bound("attn_last", ref, cfg, n_keys, vocab=1, logit_scale=0.0,
                            float16=st.array("attn_last").dtype == np.float16)
            assert_within(got[:, layer], ref, b, (p, layer))
        before = max(0, len(ids) - window)  # keys the last query's window has passed (layer 0 slides)
        assert not np.asarray(got[:before, 0]).any() and np.asarray(got[before:, 0]).all()


@pytest.mark.parametrize("family,window", [("mistral", 24), ("gemma3", 6)])
def test_causal_runner_on_heads_longer_than_the_window(family, window, tok, sweep_file):
    """The intervention runner caches a head longer than the window: a knockout of the
    system span from layer 0 equals the model's own forward with those tokens masked, and
    a tail run on the cached head equals the whole prompt's forward."""
    from promptshift.causal.runner import Row, Runner
    from promptshift.sweep.chat import conversation, render
    from tests.tolerance import logprob_bound

    model = _model(family, len(tok), window)
    r = render(tok, conversation(tok, LONG, "What is the capital of France?"))
    ids, reg = r.ids, r.regions
    end = int(np.flatnonzero(reg == REGION_CODE["system"])[-1]) + 1
    assert end > window + 8  # the head alone is longer than the window
    hidden = torch.as_tensor((reg != REGION_CODE["system"]).astype(np.int64))[None]
    with torch.no_grad():
        x = torch.as_tensor(ids, dtype=torch.long)[None]
        plain = model(x).logits[0, -1].float()
        masked = model(x, attention_mask=hidden, position_ids=torch.arange(len(ids))[None]).logits[0, -1].float()
    runner = Runner(model)
    try:
        out = runner.compute([Row(ids[:end], ids[end:]),
                              Row(ids[:end], ids[end:], knockout_keys=reg == REGION_CODE["system"], knockout_start=0)])
    finally:
        runner.close()
    for o, ref in zip(out, (plain, masked)):
        lp = torch.log_softmax(ref, -1)
        b = logprob_bound(model.config, len(ids), float(ref.abs().max()), float(lp.abs().max()), len(lp))
        assert_within(o.logprobs, lp, b, family)
