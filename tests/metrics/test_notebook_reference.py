"""A notebook-format prompt file through promptshift against a plain per-pair Hugging Face
loop built the way the notebook promptshift replaces builds its prompts: render the chat
template with a system message only when the system text is non-empty (its `none` entry:
no system message at all), tokenize the rendered string, one forward pass per prompt with
``output_hidden_states`` and ``output_attentions``. Every quantity both define the same way
must agree to float32 rounding:

- the last token's hidden-state cosine per layer (the notebook's `hidden_state` component;
  HF's last hidden state is after the final norm, promptshift's `resid_post` is not, so the
  last layer is compared against the pre-norm state, see docs/SEED.md),
- top-1 agreement of the next token and the next-token log-probabilities,
- its "recent tokens" attention share (the last 5 keys of the head-averaged last row).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.tolerance import U16, assert_within, forward_bound, logprob_bound

NOTEBOOK = {
    "metadata": {"description": "equivalence test", "version": 1},
    "test_prompts": {
        "factual": [{"id": "capital", "prompt": "What is the capital of France?", "expected": "Paris",
                     "difficulty": "easy"}],
        "reasoning": [{"id": "add", "prompt": "What is 2 + 3?", "expected": "5", "difficulty": "easy"}],
        "edge_cases": [{"id": "empty", "prompt": "", "difficulty": "hard", "note": "empty on purpose"}],
    },
    "system_prompts": {
        "none": {"text": "", "description": "no system prompt"},
        "brief": {"text": "Be brief.", "category": "constraint"},
        "pirate": {"text": "You are a pirate. Speak like one, matey.", "category": "persona"},
    },
}


def build_chat_prompt(system_text: str, user_text: str, tok) -> str:
    """The notebook's prompt: a system message only for a non-empty system text."""
    msgs = ([{"role": "system", "content": system_text}] if system_text else []) + [
        {"role": "user", "content": user_text}]
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


@pytest.mark.slow
def test_notebook_file_matches_a_plain_per_pair_loop(tmp_path, tok):
    import torch

    import promptshift.metrics as metrics
    from promptshift.extract.worker import ExtractConfig, fill_shard
    from promptshift.models import load_model
    from promptshift.sweep.config import load_sweep

    path = tmp_path / "notebook.json"
    path.write_text(json.dumps(NOTEBOOK))
    sweep = load_sweep(path, storage_dtype="float32", max_new_tokens=2)
    assert sweep.baseline == "no_system_turn"
    with pytest.warns(UserWarning, match="carries the template's default system prompt"):
        store = fill_shard(sweep, ExtractConfig(store=str(tmp_path / "s.zarr"), progress=False))
    tables = metrics.compute(tmp_path / "s.zarr", tmp_path / "out", workers=0, n_boot=50, progress=False)
    plan = store.plan
    model = load_model()  # a fresh copy: no promptshift hooks, eager attention (probabilities out)
    cfg, L = model.config, plan.dims.n_layers
    texts = {s["name"]: s["text"] for s in sweep.to_dict()["system_prompts"]}
    users = {u.id: u.text for u in sweep.user_prompts}

    def notebook_run(system_text: str, user_text: str):
        ids = tok(build_chat_prompt(system_text, user_text, tok), return_tensors="pt")["input_ids"]
        pre_norm = []  # the last layer's output before the final norm (hidden_states[-1] is after it)
        hook = model.model.layers[-1].register_forward_hook(
            lambda m, a, o: pre_norm.append(o[0] if isinstance(o, tuple) else o))
        try:
            with torch.inference_mode():
                out = model(input_ids=ids, output_hidden_states=True, output_attentions=True)
        finally:
            hook.remove()
        hs = [x[0, -1].double().numpy() for x in out.hidden_states[1:]]  # (L, H): each layer's output
        hs[-1] = pre_norm[0][0, -1].double().numpy()
        attn = np.stack([a[0, :, -1, :].mean(0).double().numpy() for a in out.attentions])  # (L, n) head mean
        logits = out.logits[0, -1].double()
        return ids[0].numpy(), np.stack(hs), torch.log_softmax(logits, -1).numpy(), attn, float(logits.abs().max())

    cc = tables["component_change"]
    cc = cc[(cc.component == "resid_post") & (cc.position == "last") & ~cc.is_control].set_index(["pair", "layer"])
    oc = tables["output_change"].set_index("pair")
    al = tables["attention_layers"].set_index(["prompt", "layer"])
    top_ids = store.array("logits_topk_ids")[...]
    top_lp = store.array("logits_topk_logprobs")[...]
    n_keys = int(plan.prompts.n_tokens.max())
    assert {"empty"} <= set(plan.pairs.user_id) and len(plan.pairs) == 2 * 3
    checked = set()
    for _, pa in plan.pairs.iterrows():
        v, b = int(pa.variant), int(pa.baseline)
        ids_v, hv, lpv, av, zv = notebook_run(texts[pa.system], users[pa.user_id])
        ids_b, hb, lpb, ab, zb = notebook_run("", users[pa.user_id])
        # the same token sequences: the notebook's `none` is promptshift's no_system_turn
        assert np.array_equal(plan.prompt_tokens(v), ids_v) and np.array_equal(plan.prompt_tokens(b), ids_b)
        cos = (hv * hb).sum(1) / (np.linalg.norm(hv, axis=1) * np.linalg.norm(hb, axis=1))
        # batched float32 extraction vs one prompt at a time: each vector within rho of its
        # norm (tests/tolerance.py); a cosine moves by at most the sum of the two
        rho = np.array([forward_bound(cfg, n_keys, 1.0, layer + 1, statistical=True) for layer in range(L)])
        got = np.array([cc.loc[(int(pa.pair), layer), "cosine"] for layer in range(L)])
        assert_within(got, cos, 2 * rho, f"hidden-state cosine, pair {pa.pair}")
        # top-1 agreement and log-probabilities of the stored top-k tokens
        assert top_ids[v, 0] == lpv.argmax() and top_ids[b, 0] == lpb.argmax()
        assert bool(oc.loc[int(pa.pair), "top1_changed"]) == (lpv.argmax() != lpb.argmax())
        for p, lp, z in ((v, lpv, zv), (b, lpb, zb)):
            if p in checked:
                continue
            checked.add(p)
            bound = logprob_bound(cfg, n_keys, z, float(np.abs(lp[top_ids[p]]).max()), len(lp))
            assert_within(top_lp[p], lp[top_ids[p]], bound, f"log-probs, prompt {p}")
        # the notebook's "recent tokens": mass of the head-averaged last row on the last 5 keys;
        # attn_last is stored as float16 (a sum of k elements <= 1 within u16 of itself)
        for p, a in ((v, av), (b, ab)):
            got = np.array([al.loc[(p, layer), "recent_mass"] for layer in range(L)])
            assert_within(got, a[:, -5:].sum(1), U16 + 2 * 5 * forward_bound(cfg, n_keys, 1.0), f"recent, {p}")
    # the empty user prompt: zero `user` tokens, aligned on what follows, in every per-pair table
    from promptshift.vocabulary import REGION_CODE

    for _, pa in plan.pairs[plan.pairs.user_id == "empty"].iterrows():
        assert (plan.prompt_regions(int(pa.variant)) == REGION_CODE["user"]).sum() == 0
        assert pa.suffix_len >= 1
    for name in ("component_change", "attention_change", "output_change", "lens_change"):
        t = tables[name]
        assert (t.user_id == "empty").any() and (t.loc[t.user_id == "empty", "difficulty"] == "hard").all(), name
