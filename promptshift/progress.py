"""The one progress bar of every long stage (extract, causal, metrics, plan).

`tqdm.auto` draws a widget in Jupyter and a text bar on a terminal, both on stderr, so
stdout stays the command's own output; `enabled=False` (``--quiet``, tests) draws nothing.
"""

from __future__ import annotations

import sys


def progress(total: int | None, desc: str, *, unit: str = "it", enabled: bool = True, leave: bool = True):
    """A tqdm bar of ``total`` steps of ``unit`` (prompts, tasks, rows) labelled ``desc``;
    ``leave=False`` clears it when done (inner bars of a stage). Use as a context manager or
    call ``.update(n)`` / ``.close()``."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=leave, dynamic_ncols=True,
                file=sys.stderr)


__all__ = ["progress"]
