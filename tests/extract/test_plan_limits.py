"""What the plan settles before any model runs, checked with the real engine:

* prompt + generation against the model's context (the issue's GPT-2 with 48 positions and
  a 45-token prompt: refused by `plan`; at the boundary, extraction completes and matches
  the model's own `generate`);
* a chat template that reads the clock (Llama 3.2's "Today Date"): planned at 23:59 and
  extracted, resumed and analysed at 00:30, every step renders the plan's date. Only the
  clock is mocked; template, tokenizer, model, store and causal runner are real.
"""

from __future__ import annotations

import copy
from datetime import datetime

import numpy as np
import pytest
import torch
import yaml

import promptshift.sweep.chat as chat
from promptshift.errors import StoreError, SweepError
from promptshift.extract.worker import ExtractConfig, fill_shard
from promptshift.store import open_store
from promptshift.store.verify import verify_store
from promptshift.sweep.config import load_sweep
from promptshift.sweep.plan import ModelDims, build_plan
from tests.conftest import tiny_llama, write_sweep
from tests.sweep.test_templates import family_tok


# --- context ------------------------------------------------------------------------------------
def _gpt2(tok, n_positions: int):
    import transformers as tf

    torch.manual_seed(0)
    return tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=len(tok),
                                            n_positions=n_positions)).float().eval()


def _sweep_with(tok, tmp_path, n_tokens: int, which: str, **settings):
    """A one-pair sweep whose ``which`` prompt ("first": the baseline, planned first;
    "longest": the variant) renders to exactly ``n_tokens`` tokens."""
    for k in range(1, 40):
        path = write_sweep(tmp_path / f"s{k}.yaml", systems=[{"name": "brief", "text": "Be brief."}],
                           users=[{"id": "q", "text": "Tell me " + "more " * k}], **settings)
        s = load_sweep(path)
        n = build_plan(s, tok, ModelDims(2, 8, 2, 100, 10**6)).prompts.n_tokens
        if int(n[0] if which == "first" else n.max()) == n_tokens:
            return s
    raise AssertionError(f"no prompt of {n_tokens} tokens")


def test_prompt_and_generation_beyond_the_context_is_refused_by_plan(tok, tmp_path):
    model = _gpt2(tok, 48)
    s = _sweep_with(tok, tmp_path, 45, "first", max_new_tokens=16)
    store = tmp_path / "s.zarr"
    with pytest.raises(SweepError, match="has 45 tokens and generation adds 16: 61 positions, more than the model's "
                                         "context of 48; lower `max_new_tokens` to at most 3"):
        fill_shard(s, ExtractConfig(store=str(store), progress=False), model=model, tok=tok)
    assert not store.exists()  # refused before anything was written


def test_prompt_and_generation_at_the_context_limit_matches_generate(tok, tmp_path):
    model = _gpt2(tok, 48)
    s = _sweep_with(tok, tmp_path, 45, "longest", max_new_tokens=3)
    st = fill_shard(s, ExtractConfig(store=str(tmp_path / "s.zarr"), progress=False), model=model, tok=tok)
    assert st.done().all() and verify_store(tmp_path / "s.zarr") == []
    p = int(st.plan.prompts.n_tokens.idxmax())
    ids = torch.as_tensor(st.plan.prompt_tokens(p), dtype=torch.long)[None]
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                             pad_token_id=tok.eos_token_id)[0, ids.shape[1] :].tolist()
    got = st.array("gen_ids")[p][: int(st.array("gen_len")[p])].tolist()
    assert got == ref[: len(got)] and len(got) >= 1


def test_multi_turn_dialogues_are_checked_against_the_context(tok):
    from promptshift.causal.multiturn import load_multiturn, multiturn

    suite = load_multiturn("multiturn")
    with pytest.raises(SweepError, match=r"multi-turn conversation 'everyday_mix' at turn \d+ \(system\) has \d+ "
                                         r"tokens and generation adds 16"):
        multiturn(None, tok, suite, max_new_tokens=16, context=120)  # refused before the model runs


# --- the clock ----------------------------------------------------------------------------------
class _Clock:
    """Mocks the wall clock for promptshift and for transformers' own strftime_now: a template
    that were rendered with the real clock would show the machine's date instead."""

    def __init__(self, monkeypatch, at: datetime):
        import transformers.utils.chat_template_utils as ctu

        self.at = at
        clock = self

        class Fake(datetime):
            @classmethod
            def now(cls, tz=None):
                return clock.at

        monkeypatch.setattr(chat, "datetime", Fake)
        monkeypatch.setattr(ctu, "datetime", Fake)


@pytest.fixture(scope="module")
def llama32(tok):
    return family_tok(tok, "llama3.2")


@pytest.fixture(scope="module")
def llama32_model(llama32):
    return tiny_llama(llama32, n_layers=2, seed=3)


def _suite(tmp_path):
    path = tmp_path / "mt.yaml"
    rule = {"system": "Begin with Ahoy.", "check": {"startswith": "Ahoy"}}
    path.write_text(yaml.safe_dump({"name": "mt", "rule": rule,
                                    "conversations": [{"id": "c", "turns": [{"user": "Hi", "assistant": "Ahoy, hi."},
                                                                            {"user": "Bye"}]}]}))
    return str(path)


def test_store_planned_before_midnight_resumes_after_it(llama32, llama32_model, tmp_path, monkeypatch):
    from promptshift.causal import CausalConfig, run_causal
    from promptshift.causal import multiturn as mt

    t, model = llama32, llama32_model
    s = load_sweep(write_sweep(tmp_path / "s.yaml", max_new_tokens=2, block_prompts=4, keep="last"))
    clock = _Clock(monkeypatch, datetime(2025, 12, 31, 23, 59))
    fill_shard(s, ExtractConfig(store=str(tmp_path / "a.zarr"), init_only=True, progress=False), model=model, tok=t)
    ref = fill_shard(s, ExtractConfig(store=str(tmp_path / "ref.zarr"), progress=False), model=model, tok=t)
    assert "Today Date: 31 Dec 2025" in ref.plan.prompts.text[0]
    assert ref.plan.meta["template_time"] == "2025-12-31T23:59:00"

    clock.at = datetime(2026, 1, 1, 0, 30)  # the queued task starts after midnight
    fresh = build_plan(s, t, ModelDims.from_config(model.config))
    assert "Today Date: 01 Jan 2026" in fresh.prompts.text[0]  # what an unpinned rendering would give
    assert ref.plan.difference(fresh) == ("the chat template's clock: planned at 2025-12-31T23:59:00, now "
                                          "2026-01-01T00:30:00")
    a = fill_shard(s, ExtractConfig(store=str(tmp_path / "a.zarr"), progress=False), model=model, tok=t)
    assert a.done().all() and verify_store(tmp_path / "a.zarr") == []
    assert a.attrs["plan_hash"] == ref.attrs["plan_hash"]
    for name in ("resid_post", "gen_ids", "logits_topk_logprobs", "attn_last"):
        assert np.array_equal(np.asarray(a.array(name)[...]), np.asarray(ref.array(name)[...])), name

    # the causal analyses re-render (phrase ablation, multi-turn) at the plan's time too
    seen = []
    real_render = mt.render
    monkeypatch.setattr(mt, "render", lambda *args, **kw: seen.append(real_render(*args, **kw).text) or
                        real_render(*args, **kw))
    run_causal(s, CausalConfig(store=str(tmp_path / "a.zarr"), analyses=("phrases", "multiturn"), users=1,
                               suite=_suite(tmp_path), max_new_tokens=2, progress=False), model=model, tok=t)
    assert seen and all("Today Date: 31 Dec 2025" in x for x in seen)
    assert open_store(tmp_path / "a.zarr").causal_analyses() == ["multiturn", "phrases"]


def test_worker_that_loses_the_creation_race_follows_the_store(llama32, llama32_model, tmp_path, monkeypatch):
    """Two tasks start around midnight without a plan step; the one that finds the store
    created by the other after it planned (at its own clock reading) follows the store's
    plan instead of failing with "holds a different plan"."""
    import promptshift.extract.worker as worker

    t, model = llama32, llama32_model
    s = load_sweep(write_sweep(tmp_path / "s.yaml", max_new_tokens=2, keep="last"))
    clock = _Clock(monkeypatch, datetime(2025, 12, 31, 23, 59))
    fill_shard(s, ExtractConfig(store=str(tmp_path / "a.zarr"), init_only=True, progress=False), model=model, tok=t)
    clock.at = datetime(2026, 1, 1, 0, 0, 1)
    real, calls = worker.stored_clock, []

    def looked_too_early(*args, **kw):  # this task looked before the other one's store existed
        calls.append(1)
        return None if len(calls) == 1 else real(*args, **kw)

    monkeypatch.setattr(worker, "stored_clock", looked_too_early)
    st = fill_shard(s, ExtractConfig(store=str(tmp_path / "a.zarr"), progress=False), model=model, tok=t)
    assert len(calls) == 2 and st.done().all()
    assert "Today Date: 31 Dec 2025" in st.plan.prompts.text[0]


def test_default_system_prompt_with_the_date_is_pinned(tok, tmp_path, monkeypatch):
    """Second instance of the kind: Mistral Small 3.2 writes today's date into the default
    system prompt a `no_system_turn` baseline carries."""
    t = family_tok(tok, "mistral-small3.2")
    s = load_sweep(write_sweep(tmp_path / "s.yaml", baseline="no_system_turn"))
    dims = ModelDims(2, 8, 2, len(t), 8192)
    clock = _Clock(monkeypatch, datetime(2025, 12, 31, 23, 59))
    with pytest.warns(UserWarning, match="default system prompt"):
        planned = build_plan(s, t, dims)
    assert "The current date is 2025-12-31." in planned.meta["injected_system"]
    clock.at = datetime(2026, 1, 1, 0, 30)
    with pytest.warns(UserWarning):
        again = build_plan(s, t, dims, clock=planned.template_clock())
        drifted = build_plan(s, t, dims)
    assert again.hash() == planned.hash() and drifted.hash() != planned.hash()
    assert "The current date is 2026-01-01." in drifted.meta["injected_system"]


def test_tokenizer_drift_is_named(tok, tmp_path):
    """A store planned with one tokenizer and resumed with one that splits the same text
    differently is refused with an error that says so (not "another sweep")."""
    s = load_sweep(write_sweep(tmp_path / "s.yaml"))
    dims = ModelDims(2, 8, 2, len(tok) + 1, 4096)
    Store = open_store.__globals__["Store"]
    Store.create(tmp_path / "s.zarr", build_plan(s, tok, dims), {}, "zarr")
    drifted = copy.deepcopy(tok)
    drifted.add_tokens(["capital"])  # a newer vocabulary: "capital" is one token now
    with pytest.raises(StoreError, match=r"holds a different plan \(the tokenizer splits prompt \d+ \(\w+, capital\) "
                                         r"differently"):
        Store.create(tmp_path / "s.zarr", build_plan(s, drifted, dims), {}, "zarr")
    # the causal analyses, which re-render prompts, refuse it too
    from promptshift.causal import CausalError, check_rendering

    planned = open_store(tmp_path / "s.zarr").plan
    check_rendering(planned, tok, "s.zarr")
    with pytest.raises(CausalError, match=r"prompt \d+ \(brief, capital\) of the store s.zarr does not render as it "
                                          r"did when it was planned: the tokenizer splits it differently"):
        check_rendering(planned, drifted, "s.zarr")
