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
