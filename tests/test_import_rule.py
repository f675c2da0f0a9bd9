"""The stage import rule from DESIGN.md: store, metrics and report run where there is no
torch or transformers; sweep may use a tokenizer but never a model."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO

BLOCKER = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {blocked!r}:
            raise ImportError('blocked for this test: ' + name)
        return None
sys.meta_path.insert(0, Block())
import importlib
for m in {modules!r}:
    importlib.import_module(m)
print('ok')
"""


@pytest.mark.parametrize(
    "modules, blocked",
    [
        (["promptshift.store", "promptshift.store.verify"], ["torch", "transformers"]),
        (["promptshift.metrics"], ["torch", "transformers"]),
        (["promptshift.report"], ["torch", "transformers"]),
        (["promptshift.sweep.config", "promptshift.sweep.plan", "promptshift.sweep.chat"], ["torch"]),
    ],
)
def test_stage_imports(modules, blocked):
    code = BLOCKER.format(blocked=set(blocked), modules=modules)
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


# The rooms of the house (top-level modules and subpackages) from the bottom floor up: a room
# imports only rooms on lower floors (docs/ARCHITECTURE.md), so the data flows one way and no
# import cycle can form. Imports inside functions count too.
FLOORS = (
    ("errors", "vocabulary", "progress", "jsonsafe", "stage"),
    ("models", "results"),
    ("sweep",),
    ("store",),
    ("scale",),
    ("extract",),
    ("causal", "metrics"),
    ("report",),
    ("api",),
    ("promptshift",),  # promptshift/__init__.py
    ("cli",),
)


def _room_imports() -> set[tuple[str, str]]:
    import ast

    root = REPO / "promptshift"
    edges = set()
    for path in root.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        src = parts[1] if len(parts) > 1 and parts[1] != "__init__" else "promptshift"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for name in names:
                p = name.split(".")
                if p[0] == "promptshift":
                    dst = p[1] if len(p) > 1 else "promptshift"
                    if dst != src:
                        edges.add((src, dst))
    return edges


def test_rooms_import_only_downwards():
    floor = {room: i for i, rooms in enumerate(FLOORS) for room in rooms}
    edges = _room_imports()
    unknown = {r for e in edges for r in e} - set(floor)
    assert not unknown, f"rooms without a floor in FLOORS: {sorted(unknown)}"
    upward = sorted((a, b) for a, b in edges if floor[a] <= floor[b])
    assert not upward, f"imports against the data flow (or within a floor): {upward}"
    assert ("metrics", "report") not in edges and ("sweep", "store") not in edges  # the two that once ran back
