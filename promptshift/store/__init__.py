"""Activation store (zarr v3 default, HDF5 alternative). Imports no torch or transformers."""

from promptshift.store.core import SCHEMA_VERSION, Store, array_specs, open_store
from promptshift.vocabulary import COMPONENTS

open = open_store  # noqa: A001  -- documented entry point: promptshift.store.open(PATH)

__all__ = ["COMPONENTS", "SCHEMA_VERSION", "Store", "array_specs", "open", "open_store"]
