"""plan_batches against an exhaustive search over every way of cutting the sorted rows."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from promptshift.extract.batching import plan_batches


def _feasible(batch, lengths, ctx, budget, qk, kv):
    s, c, rows = max(lengths[i] for i in batch), max(ctx[i] for i in batch), len(batch)
    return rows == 1 or (rows * s <= budget and rows * s * (s + c) * 4 <= qk and rows * c * 8 <= kv)


def _brute(lengths, ctx, budget, qk, kv, overhead):
    """Cheapest feasible split of the rows sorted longest first, by trying every set of cuts."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    best = float("inf")
    for k in range(len(order)):
        for cuts in itertools.combinations(range(1, len(order)), k):
            parts = [order[a:b] for a, b in zip((0, *cuts), (*cuts, len(order)))]
            if all(_feasible(p, lengths, ctx, budget, qk, kv) for p in parts):
                best = min(best, sum(len(p) * max(lengths[i] for i in p) + overhead for p in parts))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_plan_batches_is_the_cheapest_feasible_split(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 10))
    lengths = [int(x) for x in rng.integers(1, 60, n)]
    ctx = [int(x) for x in rng.integers(0, 40, n)] if seed % 2 else [0] * n
    budget, qk, kv, overhead = int(rng.integers(40, 200)), int(rng.integers(20_000, 400_000)), 2_000, int(rng.integers(0, 80))
    got = plan_batches(lengths, budget, contexts=ctx, bytes_per_qk=4, qk_budget=qk, bytes_per_context=8,
                       context_budget=kv, overhead=overhead)
    assert sorted(i for b in got for i in b) == list(range(n))  # every row exactly once
    assert all(_feasible(b, lengths, ctx, budget, qk, kv) for b in got)
    assert [max(lengths[i] for i in b) for b in got] == sorted((max(lengths[i] for i in b) for b in got), reverse=True)
    cost = sum(len(b) * max(lengths[i] for i in b) + overhead for b in got)
    assert cost == _brute(lengths, ctx, budget, qk, kv, overhead)


def test_plan_batches_cuts_padding_that_greedy_filling_keeps():
    # one long prompt and many short ones: filling batches greedily pads them all to 200
    lengths = [200] + [20] * 15
    got = plan_batches(lengths, 4096, overhead=64)
    assert [len(b) for b in got] == [1, 15]
    assert plan_batches([], 4096) == []
