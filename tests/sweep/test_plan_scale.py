"""Plans at cluster scale: the vectorised layout against a plain loop, and the plan's
column-by-column storage (version 2) read back equal, with and without texts, from every
backend; stores planned with version 1 stay readable and resumable."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from promptshift.store.core import Store, open_store
from promptshift.sweep.config import SweepConfig, SystemPrompt, UserPrompt
from promptshift.sweep.plan import PLAN_VERSION, ModelDims, _token_chunk, build_plan, layout

DIMS = ModelDims(n_layers=2, hidden=8, n_heads=2, vocab=100, max_positions=4096)
TABLES = ("prompts", "pairs", "controls", "blocks")


def _sweep(**kw) -> SweepConfig:
    systems = [SystemPrompt(f"s{i}", "Be brief." * (i + 1)) for i in range(3)]
    users = [UserPrompt(f"u{j}", f"What is {j} + {j}?", category=f"c{j % 2}") for j in range(4)]
    return SweepConfig(name="scale", system_prompts=systems, user_prompts=users, **kw)


def _loop_layout(n_tok, keep_start, sweep, dims):
    """The block layout as a plain loop over prompts (what `layout` vectorises)."""
    tchunk, kchunk, pchunk = _token_chunk(sweep.keep, dims, sweep.block_prompts, sweep.storage_dtype), 1024, 1 << 16
    full = bool(sweep.full_attention_layers)
    cols = {k: [] for k in ("block", "kept_start", "key_start", "pattern_start")}
    blocks, kept, key, pat = [], 0, 0, 0
    for b, p0 in enumerate(range(0, len(n_tok), sweep.block_prompts)):
        p1 = min(p0 + sweep.block_prompts, len(n_tok))
        k0, y0, q0 = kept, key, pat
        for p in range(p0, p1):
            for k, v in (("block", b), ("kept_start", kept), ("key_start", key), ("pattern_start", pat)):
                cols[k].append(v)
            kept += n_tok[p] - keep_start[p]
            key += n_tok[p]
            pat += n_tok[p] ** 2 if full else 0
        kept, key, pat = (-(-kept // tchunk) * tchunk, -(-key // kchunk) * kchunk, -(-pat // pchunk) * pchunk)
        blocks.append(dict(block=b, prompt_start=p0, prompt_end=p1, kept_start=k0, kept_end=kept, key_start=y0,
                           key_end=key, pattern_start=q0, pattern_end=pat, n_tokens_total=sum(n_tok[p0:p1])))
    return cols, pd.DataFrame(blocks)


@pytest.mark.parametrize("keep", ["last", "suffix", "all"])
@pytest.mark.parametrize("block_prompts,full", [(1, False), (3, True), (4, False), (64, True)])
def test_layout_equals_a_plain_loop(keep, block_prompts, full):
    rng = np.random.default_rng(block_prompts)
    n = rng.integers(5, 300, size=37)
    suffix = (n * rng.uniform(0.2, 0.9, size=n.size)).astype(np.int64)
    sweep = _sweep(keep=keep, block_prompts=block_prompts, full_attention_layers=(0,) if full else ())
    prompts = pd.DataFrame({"prompt": np.arange(n.size), "n_tokens": n, "suffix_start": suffix})
    got, blocks, _ = layout(prompts, sweep, DIMS)
    cols, want_blocks = _loop_layout(n.tolist(), got["keep_start"].tolist(), sweep, DIMS)
    for k, v in cols.items():
        assert got[k].tolist() == v, k
    assert got["n_kept"].tolist() == (n - got["keep_start"]).tolist()
    assert got["token_offset"].tolist() == np.concatenate([[0], np.cumsum(n)[:-1]]).tolist()
    pd.testing.assert_frame_equal(blocks, want_blocks, check_exact=True)


@pytest.fixture(scope="module")
def plan(tok):
    return build_plan(_sweep(max_new_tokens=4, block_prompts=4), tok, DIMS)


@pytest.mark.parametrize("fmt", ["zarr", "hdf5", "memory"])
def test_stored_plan_reads_back_equal(plan, fmt, tmp_path):
    path = None if fmt == "memory" else tmp_path / ("s.zarr" if fmt == "zarr" else "s.h5")
    st = Store.create(path, plan, {}, "zarr" if fmt == "memory" else fmt)
    st = st if path is None else open_store(path)
    assert st.plan_version == PLAN_VERSION == 2
    got = st.plan
    for t in TABLES:
        pd.testing.assert_frame_equal(getattr(got, t), getattr(plan, t), check_exact=True, obj=t)
    for a in ("token_ids", "token_region", "token_turn", "token_offsets", "spans"):
        np.testing.assert_array_equal(getattr(got, a), getattr(plan, a), err_msg=a)
    assert got.hash() == plan.hash() == st.attrs["plan_hash"]
    slim = st.read_plan(text=False)
    pd.testing.assert_frame_equal(slim.prompts, plan.prompts.drop(columns="text"), check_exact=True)
    # the header is small JSON: no row of any table in it
    head = json.loads(bytes(np.asarray(st.array("plan_json")[...], dtype=np.uint8)))
    assert head["tables"]["prompts"]["rows"] == plan.n_prompts and "prompts" not in head


def test_hash_follows_every_column(plan):
    h = plan.hash()
    for t, col in (("prompts", "text"), ("prompts", "n_tokens"), ("pairs", "system"), ("blocks", "kept_end")):
        df = getattr(plan, t).copy()
        v = df.loc[0, col]
        df.loc[0, col] = v + "x" if isinstance(v, str) else v + 1
        assert dataclasses.replace(plan, **{t: df}).hash() != h, (t, col)


def test_version_1_store_reads_and_resumes(plan, tmp_path):
    """A store planned before plan version 2 (one JSON document, its hash taken over it):
    read as before, and `Store.create` with the same sweep opens it instead of refusing it."""
    path = tmp_path / "old.zarr"
    st = Store.create(path, plan, {}, "zarr")
    old = plan.to_json()
    old["plan_version"] = 1
    blob = np.frombuffer(json.dumps(old).encode(), dtype=np.uint8)
    st.backend.remove("plan_json")
    st.backend.create_array("plan_json", blob.shape, np.uint8, (blob.size,), ("plan_byte",))[...] = blob
    for name in [n for n in st.names() if n.startswith(("plan_prompts__", "plan_pairs__", "plan_controls__",
                                                         "plan_blocks__"))]:
        st.backend.remove(name)
    st.backend.set_attrs({**st.attrs, "plan_hash": plan.hash(1)})
    st.close()
    old_st = open_store(path)
    assert old_st.plan_version == 1 and old_st.plan.version == 1
    for t in TABLES:
        pd.testing.assert_frame_equal(getattr(old_st.plan, t), getattr(plan, t), check_exact=True, obj=t)
    assert old_st.plan.hash() == plan.hash(1) != plan.hash()
    again = Store.create(path, plan, {}, "zarr")  # same plan: opened, not refused
    assert again.plan_version == 1


def _loop_plan(sweep, tok, clock):
    """The plan's prompts, pairs and token arrays as a plain loop: every prompt rendered on
    its own by ``chat.render`` (baselines, system prompts, instruction prefixes, in that
    order), identical texts merged, each pair's aligned suffix from the two token lists."""
    from promptshift.sweep.chat import REGION_CODE, conversation, render
    from promptshift.sweep.plan import _common_suffix_len, _last_user_span, prefix_label

    def conv(system, empty, user, prefix=None):
        return conversation(tok, system, user, no_system_role=sweep.no_system_role, empty_system=empty, clock=clock,
                            prefix=prefix, prefix_separator=sweep.prefix_separator)

    def base(user, prefix=None):
        if sweep.baseline in ("no_system_turn", "empty_system"):
            return conv(None, sweep.baseline == "empty_system", user, prefix)
        return conv(next(s.text for s in sweep.system_prompts if s.name == sweep.baseline), False, user, prefix)

    rows, rendered, by_text = [], [], {}

    def add(kind, system, uid, messages):
        r = render(tok, messages, clock=clock)
        if r.text not in by_text:
            by_text[r.text] = len(rows)
            rows.append(dict(prompt=len(rows), kind=kind, system=system, user_id=uid, text=r.text,
                             n_tokens=len(r.ids), suffix_start=_last_user_span(r)[0],
                             n_system_tokens=int((r.regions == REGION_CODE["system"]).sum())))
            rendered.append(r)
        return by_text[r.text]

    b_of = {u.id: add("baseline", sweep.baseline, u.id, base(u.text)) for u in sweep.user_prompts}
    variants = [(s.name, s.name, "system", lambda u, s=s: conv(s.text, False, u.text)) for s in sweep.variants]
    variants += [(prefix_label(x.name), x.name, "prefix", lambda u, x=x: base(u.text, x.text))
                 for x in sweep.instruction_prefixes]
    pairs = []
    for label, instruction, placement, messages in variants:
        for u in sweep.user_prompts:
            v, b = add("variant", label, u.id, messages(u)), b_of[u.id]
            iv, ib = rendered[v].ids, rendered[b].ids
            lv, lb = len(iv) - rows[v]["suffix_start"], len(ib) - rows[b]["suffix_start"]
            n = lv if lv == lb and np.array_equal(iv[len(iv) - lv:], ib[len(ib) - lb:]) else \
                min(_common_suffix_len(iv, ib), lv, lb)
            row = dict(pair=len(pairs), user_id=u.id, system=label, variant=v, baseline=b,
                       v_suffix_start=len(iv) - n, b_suffix_start=len(ib) - n, suffix_len=n, category=u.category)
            if sweep.instruction_prefixes:
                row.update(placement=placement, instruction=instruction)
            pairs.append(row)
    cat = lambda k: np.concatenate([getattr(r, k) for r in rendered])  # noqa: E731
    arrays = dict(token_ids=cat("ids").astype(np.int32), token_region=cat("regions").astype(np.int8),
                  token_turn=cat("turns").astype(np.int16), token_offsets=cat("offsets").astype(np.int32).reshape(-1, 2),
                  spans=np.asarray([(p, REGION_CODE[s.region], s.start, s.end) for p, r in enumerate(rendered)
                                    for s in r.spans], np.int32).reshape(-1, 4))
    return pd.DataFrame(rows), pd.DataFrame(pairs), arrays


@pytest.mark.parametrize("prefixes", [False, True])
@pytest.mark.parametrize("baseline", ["empty_system", "no_system_turn", "s0"])
def test_plan_equals_rendering_every_prompt_in_a_loop(tok, baseline, prefixes):
    """The columnar, composed plan against a plain per-prompt loop on a sweep with repeated
    system texts, an empty and a whitespace-only user prompt, whitespace next to the
    scaffolding, instruction prefixes and a named baseline: every column of the prompts and
    pairs tables (the layout columns from `layout`, itself checked against a loop above) and
    every token array, exactly."""
    from promptshift.sweep.chat import TemplateClock
    from promptshift.sweep.config import InstructionPrefix

    systems = ["Be brief.", "You are a pirate.\nSpeak like one!  ", "  Answer in French.", "Be brief."]
    users = ["What is 2+2?", " Name a colour.\n", "", "Hi", "   ", "Why?  "]
    sweep = SweepConfig(name="loop", system_prompts=[SystemPrompt(f"s{i}", t) for i, t in enumerate(systems)],
                        user_prompts=[UserPrompt(f"u{j}", t, category=f"c{j % 2}") for j, t in enumerate(users)],
                        instruction_prefixes=[InstructionPrefix("s1", "Be brief."), InstructionPrefix("p", "Hm")]
                        if prefixes else [], baseline=baseline, keep="suffix", block_prompts=5, max_new_tokens=2)
    clock = TemplateClock.now()
    got = build_plan(sweep, tok, DIMS, clock=clock)
    prompts, pairs, arrays = _loop_plan(sweep, tok, clock)
    want, _, _ = layout(prompts, sweep, DIMS)
    pd.testing.assert_frame_equal(got.prompts, want, check_exact=True, check_dtype=False)
    pd.testing.assert_frame_equal(got.pairs, pairs, check_exact=True, check_dtype=False)
    for name, a in arrays.items():
        b = getattr(got, name)
        assert b.dtype == a.dtype and np.array_equal(b, a), name
    assert (got.prompts.user_id == "u2").any() and got.n_prompts < 6 * (len(systems) + 1 + 2 * prefixes)
