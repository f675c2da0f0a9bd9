"""plan_batches against an exhaustive search over every way of cutting the sorted rows."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from promptshift.extract.batching import plan_batches


def _feasible(batch, lengths, ctx, budget, qk, kv):
    s, c, rows = max(lengths[i] for i in batch), max(ctx[i] for i in batch), len(batch)
    return rows == 1 or (rows * s <= budget and rows * s * (s + c) * 4 <= qk and rows * c * 8 <= kv)


def _cost(part, lengths, ctx, overhead, w, sw=1.0):
    s, c = max(lengths[i] for i in part), max(ctx[i] for i in part)
    return sw * len(part) * s + (1 - sw) * sum(lengths[i] for i in part) + w * len(part) * s * (s + c) + overhead


def _brute(lengths, ctx, budget, qk, kv, overhead, w, sw=1.0):
    """Cheapest feasible split of the rows sorted by length, or by context, trying every
    set of cuts of each order."""
    n = len(lengths)
    orders = [sorted(range(n), key=lambda i: (-lengths[i], -ctx[i], i)),
              sorted(range(n), key=lambda i: (-ctx[i], -lengths[i], i))]
    best = float("inf")
    for order in orders:
        for k in range(n):
            for cuts in itertools.combinations(range(1, n), k):
                parts = [order[a:b] for a, b in zip((0, *cuts), (*cuts, n))]
                if all(_feasible(p, lengths, ctx, budget, qk, kv) for p in parts):
                    best = min(best, sum(_cost(p, lengths, ctx, overhead, w, sw) for p in parts))
    return best


@pytest.mark.parametrize("seed", range(16))
def test_plan_batches_is_the_cheapest_feasible_split(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 10))
    lengths = [int(x) for x in rng.integers(1, 60, n)]
    ctx = [int(x) for x in rng.integers(0, 40, n)] if seed % 2 else [0] * n
    budget, qk, kv, overhead = int(rng.integers(40, 200)), int(rng.integers(20_000, 400_000)), 2_000, int(rng.integers(0, 80))
    w = [0.0, 1e-3, 0.05][seed % 3]
    sw = [1.0, 0.1, 0.0, 0.5][seed % 4]  # what a padding slot costs (packed batches: little)
    got = plan_batches(lengths, budget, contexts=ctx, bytes_per_qk=4, qk_budget=qk, bytes_per_context=8,
                       context_budget=kv, overhead=overhead, qk_weight=w, slot_weight=sw)
    assert sorted(i for b in got for i in b) == list(range(n))  # every row exactly once
    assert all(_feasible(b, lengths, ctx, budget, qk, kv) for b in got)
    assert [max(lengths[i] for i in b) for b in got] == sorted((max(lengths[i] for i in b) for b in got), reverse=True)
    cost = sum(_cost(b, lengths, ctx, overhead, w, sw) for b in got)
    assert cost == pytest.approx(_brute(lengths, ctx, budget, qk, kv, overhead, w, sw), rel=1e-12)


def test_plan_batches_cuts_padding_that_greedy_filling_keeps():
    # one long prompt and many short ones: filling batches greedily pads them all to 200
    lengths = [200] + [20] * 15
    got = plan_batches(lengths, 4096, overhead=64)
    assert [len(b) for b in got] == [1, 15]
    assert plan_batches([], 4096) == []


def test_plan_batches_merges_when_padding_is_cheap():
    # packed batches pay for padding only in attention: the long and short rows share a pass
    lengths = [200] + [20] * 15
    assert len(plan_batches(lengths, 4096, overhead=64, slot_weight=0.0)) == 1
    assert len(plan_batches(lengths, 4096, overhead=64, slot_weight=0.0, qk_weight=5e-3)) == 2


def test_plan_batches_keeps_long_prefixes_apart_when_attention_costs():
    # 4 rows continue a 200-token prefix, 60 rows a 20-token one: padding every row's
    # prefix to 200 costs more attention than one extra forward pass
    lengths, ctx = [16] * 64, [200] * 4 + [20] * 60
    assert len(plan_batches(lengths, 4096, contexts=ctx)) == 1  # attention free: one batch
    got = plan_batches(lengths, 4096, contexts=ctx, qk_weight=2e-3)
    assert sorted(map(sorted, got)) == [list(range(4)), list(range(4, 64))]
