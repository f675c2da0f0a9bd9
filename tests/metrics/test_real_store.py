"""End to end on the embedded model: metrics on a real store agree with the model's own
hidden states (an independent path: Hugging Face's ``output_hidden_states``, one prompt at
a time, no hooks or batching of ours)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import write_sweep
from tests.tolerance import U16, forward_bound


@pytest.mark.slow
def test_last_token_resid_post_cosine_matches_hf_hidden_states(tmp_path, tok):
    import torch

    import promptshift.metrics as metrics
    from promptshift.extract.worker import ExtractConfig, fill_shard
    from promptshift.models import load_model

    sweep = write_sweep(
        tmp_path / "tiny.yaml",
        systems=[{"name": "brief", "text": "Be brief.", "tags": ["concise"]},
                 {"name": "pirate", "text": "You are a pirate. Speak like one, matey.", "tags": ["persona"]}],
        users=[{"id": "capital", "text": "What is the capital of France?", "category": "factual"},
               {"id": "add", "text": "What is 2 + 3?", "category": "reasoning"}],
        max_new_tokens=4, storage_dtype="float16",
    )
    store = fill_shard(str(sweep), ExtractConfig(store=str(tmp_path / "s.zarr"), progress=False))
    tables = metrics.compute(tmp_path / "s.zarr", tmp_path / "out", workers=0, n_boot=100, progress=False)

    plan = store.plan
    model = load_model()  # a fresh copy: no promptshift hooks or attention function
    L = plan.dims.n_layers

    def hidden(p: int) -> np.ndarray:  # (L + 1, H) last-position hidden states
        ids = torch.as_tensor(plan.prompt_tokens(p).astype(np.int64))[None]
        with torch.inference_mode():
            out = model(input_ids=ids, output_hidden_states=True)
        return torch.stack([h[0, -1] for h in out.hidden_states]).float().numpy()

    cc = tables["component_change"]
    cc = cc[(cc.component == "resid_post") & (cc.position == "last") & ~cc.is_control].set_index(["pair", "layer"])
    for _, pa in plan.pairs.iterrows():
        hv, hb = hidden(int(pa.variant)), hidden(int(pa.baseline))
        for layer in range(L - 1):  # hidden_states[-1] is after the final norm
            v, b = hv[layer + 1].astype(np.float64), hb[layer + 1].astype(np.float64)
            cos = v @ b / (np.linalg.norm(v) * np.linalg.norm(b))
            rel = np.linalg.norm(v - b) / np.linalg.norm(b)
            row = cc.loc[(int(pa.pair), layer)]
            # the store holds float16 (each element within u16 |x|, so each vector within u16
            # of its norm) of float32 activations from batched runs (within rho of HF's, as a
            # share of the norm): a cosine moves by at most the two vectors' relative errors,
            # |v - b| / |b| by (u16 + rho) (|v| / |b| + 1 + rel) <= (u16 + rho)(2 + 2 rel)
            rho = forward_bound(model.config, int(plan.prompts.n_tokens.max()), 1.0, layer + 1, statistical=True)
            assert abs(row["cosine"] - cos) <= 2 * (U16 + rho), (pa.pair, layer)
            assert abs(row["rel_change"] - rel) <= (U16 + rho) * (2 + 2 * rel), (pa.pair, layer)
    s = metrics.load_summary(tmp_path / "out")
    assert s["n_pairs"] == 4 and s["model"]
