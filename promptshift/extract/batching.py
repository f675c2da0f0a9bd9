"""Splitting a block's prompts into padded batches.

A padded batch costs about ``rows x longest row`` token-passes through the linear layers,
plus a fixed cost per forward pass (Python, hooks, kernel launches, and small matrices
that use the hardware badly). Cutting rows sorted by length into batches greedily under
the token budget (the first rule here) can pad short prompts up to a long one's length: on
the default suite that was 46% more token-passes than real tokens. :func:`plan_batches`
instead finds the cut points that minimise ``sum(rows x longest + overhead)`` under the
same limits, exactly, by dynamic programming over the sorted rows (O(n^2), n = prompts of
one block).

Packed batches (the engine's default where the model allows) run only the real tokens
through the linear layers; their padding costs attention and a little unpacking, so the
engine prices a padding slot at ``slot_weight`` of a real token and the same search then
prefers fewer, fuller passes.
"""

from __future__ import annotations

# Fixed cost of one forward pass, in token-passes: with fewer than a few dozen rows of
# work the matrices are too small to keep a CPU's cores busy, and every pass pays the same
# per-layer Python and hook costs. Measured in docs/BENCHMARKS.md (batching).
BATCH_OVERHEAD_TOKENS = 64


def plan_batches(lengths: list[int], token_budget: int, *, contexts: list[int] | None = None,
                 bytes_per_qk: int = 0, qk_budget: int = 0, bytes_per_context: int = 0,
                 context_budget: int = 0, overhead: int = BATCH_OVERHEAD_TOKENS,
                 qk_weight: float = 0.0, slot_weight: float = 1.0) -> list[list[int]]:
    """Indices of ``lengths`` in batches, longest first, so that an out-of-memory error
    happens at the first batch rather than near the end.

    A batch holds ``rows x max(length) <= token_budget`` token slots (a single row may
    exceed it). ``contexts`` are cached keys each row attends to before its own tokens (a
    shared prefix); a batch pads them to the longest. Optional memory caps, each skipped
    when its budget is 0: ``rows x S x (S + C) x bytes_per_qk <= qk_budget`` (one layer's
    attention probabilities) and ``rows x C x bytes_per_context <= context_budget`` (the
    padded key/value cache of the contexts, all layers), with S the longest row and C the
    longest context of the batch.

    The cost minimised is ``slot_weight x rows x S + (1 - slot_weight) x tokens + qk_weight
    x rows x S x (S + C) + overhead`` per batch (``tokens``: the batch's real tokens;
    ``qk_weight``: the cost of one query-key pair, all layers and heads, in tokens).
    ``slot_weight`` is what a padding slot costs outside attention, as a share of a real
    token: 1 for padded batches, small for packed ones, whose per-token modules see only
    real tokens.
    Rows are cut in order of length and, when contexts differ, also in order of context
    (padding a short prefix to a long one costs attention); the cheaper plan is returned.
    """
    n = len(lengths)
    if n == 0:
        return []
    ctx = list(contexts) if contexts is not None else [0] * n
    orders = [sorted(range(n), key=lambda i: (-lengths[i], -ctx[i], i))]
    if len(set(ctx)) > 1:
        orders.append(sorted(range(n), key=lambda i: (-ctx[i], -lengths[i], i)))
    best_plan, best_cost = None, float("inf")
    for order in orders:
        cost, plan = _split(order, lengths, ctx, token_budget, bytes_per_qk, qk_budget, bytes_per_context,
                            context_budget, overhead, qk_weight, slot_weight)
        if cost < best_cost:
            best_plan, best_cost = plan, cost
    # longest batch first (an out-of-memory error shows at once)
    return sorted(best_plan, key=lambda b: -max(lengths[i] for i in b))


def _split(order, lengths, ctx, token_budget, bytes_per_qk, qk_budget, bytes_per_context, context_budget,
           overhead, qk_weight, slot_weight):
    """Cheapest cut of ``order`` into contiguous batches, by dynamic programming."""
    n = len(order)
    inf = float("inf")
    best = [0.0] + [inf] * n  # best[j]: cheapest split of order[:j]
    cut = [0] * (n + 1)
    for i in range(n):  # a batch starts at position i ...
        if best[i] == inf:
            continue
        s = c = tokens = 0
        for j in range(i + 1, n + 1):  # ... and ends before j
            rows = j - i
            s, c = max(s, lengths[order[j - 1]]), max(c, ctx[order[j - 1]])
            tokens += lengths[order[j - 1]]
            if rows > 1 and (
                rows * s > token_budget
                or (qk_budget and rows * s * (s + c) * bytes_per_qk > qk_budget)
                or (context_budget and rows * c * bytes_per_context > context_budget)
            ):
                break  # adding rows only grows every left-hand side
            cost = (best[i] + slot_weight * rows * s + (1 - slot_weight) * tokens + qk_weight * rows * s * (s + c)
                    + overhead)
            if cost < best[j]:
                best[j], cut[j] = cost, i
    out, j = [], n
    while j > 0:
        out.append(order[cut[j] : j])
        j = cut[j]
    return best[n], out[::-1]


__all__ = ["BATCH_OVERHEAD_TOKENS", "plan_batches"]
