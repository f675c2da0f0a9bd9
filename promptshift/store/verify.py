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
            out = be.create_array(name, a.shape, dtype, st.chunks(name), st.dims(name))
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


__all__ = ["Store", "export_store", "verify_store"]
