"""Extraction stage: the model over the plan's prompts, activations and attention
statistics into the store (torch, transformers; no dask). ``promptshift.extract(sweep,
store, ...)`` runs it (:func:`promptshift.api.extract`)."""

# `promptshift.extract(...)` runs the stage (promptshift.api.extract); the subpackage stays as it is
from promptshift.stage import callable_stage

callable_stage(__name__)
