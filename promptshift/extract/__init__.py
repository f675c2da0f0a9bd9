"""Extraction stage: the model over the plan's prompts, activations and attention
statistics into the store (torch, transformers; no dask). Calling the subpackage,
``promptshift.extract(sweep, store, ...)``, runs :func:`extract`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from promptshift.stage import callable_stage


def extract(sweep, store: str | Path | None = None, *, model=None,
            tokenizer=None, **options: Any):
    """Run the model over the sweep and fill an activation store.

    ``store``: a zarr directory (``format="hdf5"`` for an .h5 file) or None for a store in
    memory (small sweeps in a notebook). ``model``/``tokenizer``: an already loaded HF model
    and its tokenizer, to skip loading (else the sweep's ``model`` is loaded). ``options``:
    the fields of :class:`promptshift.extract.worker.ExtractConfig` (``shard="I/N"``,
    ``overwrite``, ``device``, ``dtype``, ``packing``, ``progress``, ...). Returns the
    :class:`promptshift.store.Store`; a rerun resumes from the last finished block."""
    from promptshift.extract.worker import ExtractConfig
    from promptshift.extract.worker import fill_shard

    return fill_shard(sweep, ExtractConfig(store=None if store is None else str(store), **options),
                      model=model, tok=tokenizer)


callable_stage(__name__)  # promptshift.extract(...) runs extract(...)
