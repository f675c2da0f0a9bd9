"""scripts/bench_causal.py runs (its promptshift mode, on a saved tiny model), so the
benchmark the peers are measured with cannot rot; its KL values equal a plain per-site
Hugging Face loop's."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import torch

from tests.conftest import REPO, tiny_llama, write_sweep
from tests.tolerance import assert_within, logprob_bound


def test_bench_causal_promptshift_mode(tmp_path, tok):
    model_dir = tmp_path / "m"
    model = tiny_llama(tok, n_layers=2, seed=5)
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    sw = write_sweep(tmp_path / "s.yaml", model=str(model_dir))
    out = tmp_path / "b.json"
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_causal.py"), "--sweep", str(sw),
                        "--max-user", "1", "--max-system", "2", "--modes", "promptshift", "--json", str(out)],
                       capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| promptshift | 2 |" in r.stdout
    kl = np.asarray(json.loads(out.read_text())["promptshift"]["kl"])  # (pairs, mode, site)
    assert kl.shape == (2, 2, 2)
    # the same numbers from a plain HF forward with the variant's layer input written in by a hook
    from promptshift.sweep.config import load_sweep
    from promptshift.sweep.plan import ModelDims, build_plan

    s = load_sweep(sw)
    s.user_prompts, s.system_prompts = s.user_prompts[:1], s.system_prompts[:2]
    s.__post_init__()
    plan = build_plan(s, tok, ModelDims.from_config(model.config))
    model.config._attn_implementation = "eager"
    for i, r in enumerate(plan.pairs.itertuples()):
        v_ids, b_ids = plan.prompt_tokens(int(r.variant)), plan.prompt_tokens(int(r.baseline))
        with torch.no_grad():
            out_v = model(torch.as_tensor(v_ids)[None], output_hidden_states=True)
        lp_v = torch.log_softmax(out_v.logits[0, -1].double(), -1)
        for m, n in enumerate([int(r.suffix_len), 1]):
            for site in range(2):
                def hook(mod, args, kwargs, site=site, n=n):
                    h = (args[0] if args else kwargs["hidden_states"]).clone()
                    h[0, -n:] = out_v.hidden_states[site][0, -n:]
                    return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

                handle = model.model.layers[site].register_forward_pre_hook(hook, with_kwargs=True)
                try:
                    with torch.no_grad():
                        z = model(torch.as_tensor(b_ids)[None]).logits[0, -1].double()
                finally:
                    handle.remove()
                lp = torch.log_softmax(z, -1)
                want = float((lp_v.exp() * (lp_v - lp)).sum())
                # each side's log-probabilities are within `lpb` of the exact ones (float32 rounding
                # of the forward chain and the log-softmax); KL moves by at most both errors plus the
                # variant's error times E_p|log p_v - log p|
                lpb = logprob_bound(model.config, len(b_ids), float(z.abs().max()), float(lp.abs().max()), len(lp))
                spread = float((lp_v.exp() * (lp_v - lp).abs()).sum())
                assert_within(kl[i, m, site], want, lpb * (2 + spread), f"pair {i} mode {m} site {site}")
