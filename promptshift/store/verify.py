"""`promptshift verify` and `promptshift export`: checks and copies that read the store
block by block, so they run in bounded memory on stores of any size."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from promptshift.errors import StoreError
from promptshift.store.core import Store, open_store


def verify_store(path: str | Path, tolerance: float = 1e-3) -> list[str]:
    """Return a list of problems (empty when the store is complete and sound)."""
    try:
        st = open_store(path)
    except StoreError as e:
        return [str(e)]
    problems: list[str] = []
    try:
        plan = st.plan
    except Exception as e:  # a corrupt plan blob
        return [f"cannot read the plan: {e}"]
    if plan.hash() != st.attrs.get("plan_hash"):
        problems.append("the stored plan does not match its recorded hash (store corrupted or edited)")
    problems += check_plan(plan)
    done = st.done()
    if not done.all():
        missing = np.flatnonzero(~done)
        problems.append(f"{missing.size} of {done.size} blocks incomplete (first: {missing[:5].tolist()}); "
                        "rerun extract with the same sweep to finish")
    sc = np.asarray(st.array("block_selfcheck")[...], dtype=np.float64)
    bad = np.flatnonzero(done & (sc > tolerance))
    if bad.size:
        problems.append(f"batched-vs-alone self-check above {tolerance:g} in blocks {bad[:5].tolist()} "
                        f"(max {np.nanmax(sc):.3g})")
    for b in np.flatnonzero(done):
        blk = plan.blocks.iloc[b]
        for name in st.components:
            a = np.asarray(st.array(name)[int(blk.kept_start) : int(blk.kept_end)])
            if not np.isfinite(a).all():
                problems.append(f"{name} has NaN/inf in block {b}")
        for name in ("attn_region_mass", "logits_topk_logprobs", "lens_entropy"):
            a = np.asarray(st.array(name)[int(blk.prompt_start) : int(blk.prompt_end)])
            if np.isinf(a).any():
                problems.append(f"{name} has inf in block {b}")
        lp = np.asarray(st.array("logits_topk_logprobs")[int(blk.prompt_start) : int(blk.prompt_end)])
        if np.isnan(lp).any():
            problems.append(f"logits_topk_logprobs has NaN in block {b} (block marked done without data?)")
    return problems


def check_plan(plan, limit: int = 5) -> list[str]:
    """What a user trusts blindly about the plan, rechecked from its own arrays: the regions
    partition each prompt (valid codes, one sink, at position 0; the generation prompt ends
    the prompt), every token carries the region of the first non-whitespace content
    character it holds (from the token and content character spans; so no token of a system
    text is missing from ``system``), each variant's system spans hold its system prompt's
    text, and each pair's aligned suffixes are identical token ids. Problems are reported
    with the first ``limit`` prompts or pairs concerned."""
    from promptshift.vocabulary import REGION_CODE, REGIONS

    out: list[str] = []
    P = plan.prompts
    n = P["n_tokens"].to_numpy(np.int64)
    start = P["token_offset"].to_numpy(np.int64)
    T = len(plan.token_ids)
    if (n < 1).any() or not np.array_equal(start, np.concatenate([[0], np.cumsum(n)[:-1]])) or int(n.sum()) != T \
            or len(plan.token_region) != T or len(plan.token_turn) != T:
        return ["the plan's token arrays do not tile its prompts (token_offset/n_tokens); the plan is corrupt"]
    reg = np.asarray(plan.token_region, dtype=np.int64)
    sink, gen = REGION_CODE["sink"], REGION_CODE["gen_prompt"]
    bad = np.flatnonzero((reg < 0) | (reg >= len(REGIONS)))
    if bad.size:
        p = np.searchsorted(start, bad, side="right") - 1
        out.append(f"{bad.size} tokens have no valid region code (prompts {np.unique(p)[:limit].tolist()})")
    first = np.zeros(T, bool)
    first[start] = True
    wrong_sink = np.flatnonzero((reg == sink) != first)
    if wrong_sink.size:
        p = np.unique(np.searchsorted(start, wrong_sink, side="right") - 1)
        out.append(f"regions do not partition {p.size} prompts: the sink is not exactly their first token "
                   f"(prompts {p[:limit].tolist()})")
    is_gen = reg == gen
    ends = np.concatenate([start[1:], [T]])
    # inside a prompt, a generation-prompt token may only be followed by another one
    follows = np.zeros(T, bool)
    follows[:-1] = is_gen[:-1] & ~is_gen[1:]
    follows[ends - 1] = False
    if follows.any():
        p = np.unique(np.searchsorted(start, np.flatnonzero(follows), side="right") - 1)
        out.append(f"the generation prompt does not end {p.size} prompts (prompts {p[:limit].tolist()})")
    out += _check_labels(plan, reg, start, n, limit)
    out += _check_alignment(plan, start, n, limit)
    return out


def _check_labels(plan, reg, start, n, limit) -> list[str]:
    from promptshift.sweep.plan import prefix_label
    from promptshift.vocabulary import REGION_CODE, SCAFFOLD_REGIONS

    if plan.token_offsets is None or plan.spans is None:
        return []  # a store written before token and content spans were kept
    scaffold = [REGION_CODE[r] for r in SCAFFOLD_REGIONS]
    off = np.asarray(plan.token_offsets, dtype=np.int64)
    spans = np.asarray(plan.spans, dtype=np.int64).reshape(-1, 4)
    by_prompt = np.split(spans, np.searchsorted(spans[:, 0], np.arange(1, len(n))))
    texts = plan.prompts["text"].tolist()
    kinds = plan.prompts["kind"].tolist()
    system_text = {s.name: s.text for s in plan.sweep.system_prompts}
    prefix_text = {prefix_label(x.name): x.text for x in plan.sweep.instruction_prefixes}
    names = plan.prompts["system"].tolist()
    mislabelled, missing = [], []
    for p, text in enumerate(texts):
        sl = slice(start[p], start[p] + n[p])
        o, got, sp = off[sl], reg[sl], by_prompt[p]
        content = np.full(len(text) + 1, -1, np.int64)
        for _, region, a, b in sp:
            content[a:b] = region
        space = np.fromiter((c.isspace() for c in text), bool, len(text))
        a, b = o[:, 0], o[:, 1]
        want = np.full(len(o), -2, np.int64)  # -2: carries no content, any scaffold region
        for chars in (np.flatnonzero(content[:-1] >= 0), np.flatnonzero((content[:-1] >= 0) & ~space)):
            k = np.searchsorted(chars, a)  # first such character at or after each token's start
            c = chars[np.minimum(k, max(len(chars) - 1, 0))] if len(chars) else np.zeros(len(o), np.int64)
            inside = (k < len(chars)) & (c < b)
            want = np.where(inside, content[c], want)
        want[(b <= a) | (np.arange(len(o)) == 0)] = -1  # the sink, and tokens with no characters (an added BOS)
        wrong = np.flatnonzero(np.where(want == -2, ~np.isin(got, scaffold), (want >= 0) & (want != got)))
        if wrong.size:
            mislabelled.append((p, int(wrong[0]), wrong.size))
        if kinds[p] == "variant":
            # an instruction prefix's variant holds its prefix (and separator) as `prefix` tokens
            code = REGION_CODE["prefix" if names[p] in prefix_text else "system"]
            want_text = prefix_text[names[p]] if names[p] in prefix_text else system_text.get(names[p], "")
            sys_spans = sp[sp[:, 1] == code]
            shown = "".join(text[a:b] for _, _, a, b in sys_spans)
            if not sys_spans.size or shown.strip() != want_text.strip() or not (got == code).any():
                missing.append(p)
    out = []
    if mislabelled:
        p, i, k = mislabelled[0]
        out.append(f"{len(mislabelled)} prompts have tokens not labelled by the content they carry (prompt {p}: "
                   f"{k} tokens, first token {i}; prompts {[m[0] for m in mislabelled[:limit]]}); re-plan the store")
    if missing:
        out.append(f"{len(missing)} variants do not hold their whole system prompt as system tokens (or "
                   "instruction prefix as prefix tokens) "
                   f"(prompts {missing[:limit]}); re-plan the store")
    counted = np.add.reduceat((reg == REGION_CODE["system"]).astype(np.int64), start) if len(n) else np.zeros(0)
    if "n_system_tokens" in plan.prompts and not np.array_equal(counted, plan.prompts["n_system_tokens"].to_numpy()):
        out.append("the prompts table's n_system_tokens disagrees with the system tokens of the plan")
    return out


def _check_alignment(plan, start, n, limit) -> list[str]:
    ids = np.asarray(plan.token_ids)
    bad = []
    for r in plan.pairs.itertuples():
        v, b = int(r.variant), int(r.baseline)
        k = int(r.suffix_len)
        vs, bs = int(r.v_suffix_start), int(r.b_suffix_start)
        ok = k > 0 and vs + k == n[v] and bs + k == n[b] and np.array_equal(
            ids[start[v] + vs : start[v] + n[v]], ids[start[b] + bs : start[b] + n[b]])
        if not ok:
            bad.append(int(r.pair))
    return [f"{len(bad)} pairs' aligned suffixes are not identical token ids (pairs {bad[:limit]})"] if bad else []


def _dims_for_copy(name: str, dims: tuple[str, ...]) -> tuple[str, ...]:
    """A causal array's dims as schema 3 names them (``<analysis>_<dim>``): stores of
    schema 1-2 share names like ``pair`` and ``meta_byte`` between analyses whose lengths
    differ, which the copy (one dataset in xarray, one dimension scale per name in HDF5)
    cannot hold."""
    if not name.startswith("causal_"):
        return dims
    analysis = name[len("causal_"):].split("_")[0]
    return tuple(d if d.startswith(f"{analysis}_") else f"{analysis}_{d}" for d in dims)


def export_store(src: str | Path, dst: str | Path) -> None:
    """Copy every array and attribute into a new store of the other format."""
    st = open_store(src)
    dst = Path(dst)
    fmt = "hdf5" if dst.suffix in (".h5", ".hdf5") else "zarr"
    if dst.exists():
        raise StoreError(f"{dst} exists; remove it or choose another path")
    from promptshift.store.backends import open_backend, remove_path

    tmp = dst.with_name(f".{dst.name}.tmp")
    remove_path(tmp)
    be = open_backend(tmp, "w", fmt)
    try:
        for name in st.names():
            a = st.array(name)
            dtype = str if st.backend.array(name).dtype.kind in ("O", "T", "U") else a.dtype
            out = be.create_array(name, a.shape, dtype, st.chunks(name), _dims_for_copy(name, st.dims(name)))
            c0 = st.chunks(name)[0] * 16 if a.shape else 1
            for i in range(0, a.shape[0], max(c0, 1)):
                out[i : i + c0] = a[i : i + c0]
        be.set_attrs(st.attrs)
        be.close()
        tmp.rename(dst)
    except BaseException:
        be.close()
        remove_path(tmp)
        raise


def describe_store(st) -> str:
    """``promptshift info``: a few lines on an open store: format and schema, model and
    dtypes, the plan's counts, what is kept, blocks done, the batched-vs-alone self-check
    and the size on disk (MiB)."""
    p, prov = st.plan, st.provenance
    d = st.done()
    lines = [
        f"store: {st.path} (format {st.backend.format}, schema {st.attrs['schema_version']})",
        f"model: {prov.get('model_id')} [{prov.get('model_type')}] weights sha256 "
        f"{str(prov.get('weights_sha256'))[:16]} dtype {prov.get('dtype')} on {prov.get('device')}, "
        f"stored as {prov.get('storage_dtype')}",
        p.summary(),
        f"keep: {st.attrs['keep']}; components: {', '.join(st.components)}",
        f"blocks done: {int(d.sum())}/{d.size}"
        + ("" if d.all() else f" (missing e.g. {list(map(int, (~d).nonzero()[0][:5]))})"),
    ]
    sc = st.array("block_selfcheck")[...]
    if (~(sc != sc)).any():
        lines.append(f"batched-vs-alone self-check (max relative diff): {float(max(x for x in sc if x == x)):.2e}")
    if st.path is not None and st.path.exists():
        files = st.path.rglob("*") if st.path.is_dir() else [st.path]
        size = sum(f.stat().st_size for f in files if f.is_file())
        lines.append(f"size on disk: {size / 2**20:.1f} MiB")
    return "\n".join(lines)


__all__ = ["describe_store", "Store", "check_plan", "export_store", "verify_store"]
