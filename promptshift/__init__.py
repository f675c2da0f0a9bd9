"""promptshift: why does a system prompt (or any instruction) change what a chat model does?

The Python interface (:mod:`promptshift.api`)::

    import promptshift as ps
    sweep = ps.Sweep.from_file("prompts.json")     # or ps.Sweep.builtin("quick"), ps.Sweep.from_prompts(...)
    res = ps.run(sweep, out="runs/mine")           # plan -> extract -> causal -> metrics -> report
    res.tables["component_change"]                 # tidy DataFrames (docs/RESULTS.md); res.summary
    ps.open("runs/mine/store.zarr").to_xarray()    # the activation store as a labelled dataset
    ps.compare(None, "You are a pirate.", "What is 2 + 2?").layers   # one pair, in memory

Stages one by one: ``ps.plan``, ``ps.extract``, ``ps.causal``, ``ps.metrics``, ``ps.report``
(the last four are also the subpackages that implement them: see :mod:`promptshift.stage`).
Importing promptshift does not import torch; only the stages that run a model do.
"""

import importlib

from promptshift.api import Comparison, Sweep, compare, open, plan, run

_LAZY = {"extract": "promptshift.extract", "causal": "promptshift.causal", "metrics": "promptshift.metrics",
         "report": "promptshift.report", "Results": "promptshift.results"}


def __getattr__(name: str):
    # the callable stage subpackages (and Results) are imported on first use: `import
    # promptshift` stays light, and a machine without torch can still call ps.metrics
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        return module if name != "Results" else module.Results
    raise AttributeError(f"module 'promptshift' has no attribute {name!r}")


__all__ = ["Comparison", "Results", "Sweep", "causal", "compare", "extract", "metrics", "open", "plan", "report",
           "run"]
