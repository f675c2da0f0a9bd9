"""Activation patching scored on the continuation (``continuation``): which site carries
the behaviour, not only the first answer token.

``patching`` measures the next-token distribution at the last prompt position. A system
prompt's effect on behaviour (answer in French, be brief, reply in JSON) shows over the
reply, and the first token can miss it (a French reply may open with "Paris"). Here every
run is scored on the variant's own greedy continuation ``y`` (the one extraction stored,
its first ``n_tokens`` tokens), teacher-forced: the run continues with ``y`` and

    score = mean over t of log p(y_t | prompt, y_<t)

is the average log-probability the run gives the variant's reply. Per pair:

* ``lp_v``: the variant itself (the most a patched baseline can reach);
* ``lp_b``: the baseline prompt continued with ``y`` (how likely the reply is without the
  system prompt);
* ``lp[mode, site]``: the baseline with the variant's residual stream patched in at one site,
  at every aligned suffix position (``suffix``) or at the last prompt position only
  (``last``), as in ``patching``; the continuation tokens themselves are not patched (they
  read the patched positions through attention in the layers above the site).

``promptshift metrics`` derives ``recovered_cont(site) = sum (lp - lp_b) / sum (lp_v - lp_b)``
over pairs and the onset (first site recovering half), next to the first-token onset of
``patching``. Fixed point: ``suffix`` at site 0 patches identical token embeddings, so it
scores ``lp_b`` exactly.
"""

from __future__ import annotations

import numpy as np

from promptshift.causal.analyses import PATCH_MODES, Refs, Scope, _bar
from promptshift.causal.runner import Edit, Row, Runner


def continuation_rows(plan, refs: Refs, L: int, y: np.ndarray, r) -> tuple[list[Row], list[tuple]]:
    """The rows of one pair: the variant and the baseline continued with ``y``, and the
    patched baseline at every site in both modes. Returns (rows, keys) with keys
    ``("v",)``, ``("b",)`` or ``(mode index, site)``."""
    v, b = int(r.variant), int(r.baseline)
    v_ids, b_ids = plan.prompt_tokens(v), plan.prompt_tokens(b)
    cont = np.asarray(y[:-1], dtype=v_ids.dtype)  # the reply fed back in; its last token is only predicted
    n_al, bs = int(r.suffix_len), int(r.b_suffix_start)
    src = refs.resid[v][int(r.v_suffix_start) - refs.first[v] :]  # (n_al, L+1, H) the variant's residuals
    rows = [Row(v_ids[:1], np.concatenate([v_ids[1:], cont]), targets=y),
            Row(b_ids[:1], np.concatenate([b_ids[1:], cont]), targets=y)]
    keys: list[tuple] = [("v",), ("b",)]
    for site in range(L + 1):
        rows.append(Row(b_ids[:bs], np.concatenate([b_ids[bs:], cont]), [Edit(site, np.arange(n_al), src[:, site])],
                        targets=y))
        keys.append((0, site))
        rows.append(Row(b_ids[:-1], np.concatenate([b_ids[-1:], cont]), [Edit(site, np.array([0]), src[-1:, site])],
                        targets=y))
        keys.append((1, site))
    return rows, keys


def continuation(runner: Runner, plan, scope: Scope, refs: Refs, gen_ids: np.ndarray, gen_len: np.ndarray,
                 n_tokens: int = 16):
    """Patching scored on the variant's continuation (module docstring): per pair the mean
    log-probability of its first ``n_tokens`` continuation tokens under the variant, the
    baseline and the patched baseline at every site and mode. ``gen_ids`` (P, G) and
    ``gen_len`` (P,): the store's greedy continuations. Pairs whose variant generated
    nothing get NaN."""
    refs = refs or Refs(runner, plan, scope)
    L = runner.L
    n = len(refs.pairs)
    lp = np.full((n, len(PATCH_MODES), L + 1), np.nan, np.float32)
    lp_v = np.full(n, np.nan, np.float32)
    lp_b = np.full(n, np.nan, np.float32)
    n_cont = np.zeros(n, np.int32)
    rows, where = [], []
    for i, r in enumerate(refs.pairs.itertuples()):
        v = int(r.variant)
        y = np.asarray(gen_ids[v, : min(max(int(gen_len[v]), 0), n_tokens)], dtype=np.int64)
        n_cont[i] = len(y)
        if not len(y):
            continue
        rs, keys = continuation_rows(plan, refs, L, y, r)
        rows += rs
        where += [(i, k) for k in keys]
    bar = _bar(len(rows), "continuation patching", scope.progress)
    for j, o in runner.stream(rows, progress=bar):
        i, k = where[j]
        score = float(o.target_logprobs.double().mean())
        if k == ("v",):
            lp_v[i] = score
        elif k == ("b",):
            lp_b[i] = score
        else:
            lp[i, k[0], k[1]] = score
    bar.close()
    arrays = {
        "pair": (refs.pairs["pair"].to_numpy(np.int32), ("pair",)),
        "n_tokens": (n_cont, ("pair",)),
        "lp_v": (lp_v, ("pair",)),
        "lp_b": (lp_b, ("pair",)),
        "lp": (lp, ("pair", "mode", "site")),
    }
    meta = {"modes": list(PATCH_MODES), "n_sites": L + 1, "users": scope.users, "max_tokens": n_tokens,
            "score": "mean log-probability of the variant's greedy continuation (first max_tokens tokens, "
                     "teacher-forced)"}
    return arrays, meta


__all__ = ["continuation", "continuation_rows"]
