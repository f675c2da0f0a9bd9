"""The five causal analyses. Each takes the model, the store's plan and a :class:`Scope`
and returns ``(arrays, meta)`` for :meth:`Store.write_causal`: raw per-pair measurements
(KL divergences, log-probabilities, norms) from which ``promptshift metrics`` derives the
recovered fractions, onsets and their bootstrap intervals.

Every output distribution is the full next-token distribution at the prompt's last
position, so every KL here is exact over the vocabulary (no top-k approximation).
Notation: ``v`` variant (with the system prompt), ``b`` baseline, ``y_v`` the variant's
top-1 next token, ``L`` layers; sites 0..L as in :mod:`promptshift.causal.runner`.

A sweep's instruction prefixes are variants too: their *instruction span* is the ``prefix``
region (the instruction and its separator, at the start of the user turn) where a system
prompt's is the ``system`` region; knockout blocks it, phrase ablation leaves its phrases
out, token attribution runs over its tokens. Every array is per pair (or per instruction
label, ``prefix:<name>`` for a prefix), so ``promptshift metrics`` can tell them apart.

Size: five analyses that share the reference runs, the scope and the row builders; each is
one function of about eighty lines.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from promptshift.causal.phrases import split_phrases, without
from promptshift.causal.runner import Edit, Row, Runner, kl
from promptshift.errors import PromptShiftError
from promptshift.extract.batching import plan_batches
from promptshift.progress import progress
from promptshift.sweep.chat import conversation, render
from promptshift.sweep.plan import pair_placement
from promptshift.vocabulary import REGION_CODE, REGIONS

SYSTEM = REGION_CODE["system"]
PREFIX = REGION_CODE["prefix"]


def _span_code(r) -> int:
    """Region code of a pair's instruction span: the prefix for a prefix pair, else the system prompt."""
    return PREFIX if getattr(r, "placement", "system") == "prefix" else SYSTEM


def _instructions(sweep) -> dict[str, tuple[str, str]]:
    """Instruction label -> (placement, text) for every system prompt compared and every prefix."""
    from promptshift.sweep.plan import prefix_label

    out = {s.name: ("system", s.text) for s in sweep.variants}
    out.update({prefix_label(x.name): ("prefix", x.text) for x in sweep.instruction_prefixes})
    return out


def _messages(tok, sweep, label: str, text: str, user: str, clock):
    """The conversation of instruction ``label`` with its text replaced by ``text`` (a phrase
    left out): a system prompt, or a prefix of the user turn under the sweep's baseline."""
    placement, _ = _instructions(sweep)[label]
    if placement == "system":
        return conversation(tok, text, user, no_system_role=sweep.no_system_role, clock=clock)
    base = sweep.baseline
    system = None if base in ("no_system_turn", "empty_system") else \
        next(s.text for s in sweep.system_prompts if s.name == base)
    return conversation(tok, system, user, no_system_role=sweep.no_system_role, empty_system=base == "empty_system",
                        clock=clock, prefix=text, prefix_separator=sweep.prefix_separator)


class CausalError(PromptShiftError):
    """A causal analysis cannot run on this input."""


@dataclass
class Scope:
    """Which pairs an analysis covers (all by default) and how it reports progress."""

    users: list[str]  # user prompt ids in scope, in sweep order
    progress: bool = True


class Refs:
    """The unpatched runs every analysis compares against: for each prompt in scope, its
    last-position log-probabilities and its residual stream at every site, at the aligned
    suffix positions (from the end of the instruction for variants).

    Each prompt runs as a tail on a shared head: a variant from the end of its system
    prompt (or its aligned suffix, if that starts earlier), so all variants of one system
    prompt share its head; a baseline from its aligned suffix, so all baselines share the
    template's head."""

    def __init__(self, runner: Runner, plan, scope: Scope):
        self.plan = plan
        pairs = pair_placement(plan.pairs)
        self.pairs = pairs[pairs["user_id"].isin(scope.users)].reset_index(drop=True)
        if self.pairs.empty:
            raise CausalError("no pairs in scope: the store's sweep has none of the requested user prompts")
        self.logprobs: dict[int, torch.Tensor] = {}
        self.resid: dict[int, torch.Tensor] = {}  # (n, L+1, H) at the positions below
        self.first: dict[int, int] = {}  # first position held in resid
        head: dict[int, int] = {}  # where each prompt's tail starts
        for r in self.pairs.itertuples():
            # variants: from the end of the instruction (knockout reruns from there) or the suffix
            reg = plan.prompt_regions(int(r.variant))
            span = reg == _span_code(r)
            sys_end = int(np.flatnonzero(span)[-1]) + 1 if span.any() else int(r.v_suffix_start)
            self.first[int(r.variant)] = head[int(r.variant)] = min(int(r.v_suffix_start), sys_end)
        variants = set(head)
        for r in self.pairs.itertuples():
            b = int(r.baseline)
            if b not in variants:  # from its aligned suffix (over all its pairs): the template before it is its head
                first = min(int(r.b_suffix_start), len(plan.prompt_tokens(b)) - 1)
                self.first[b] = head[b] = min(first, head.get(b, first))
        prompts = sorted(head)
        rows = []
        for p in prompts:
            ids = plan.prompt_tokens(p)
            h = max(1, min(head[p], len(ids) - 1))
            rows.append(Row(ids[:h], ids[h:], capture=np.arange(min(self.first[p], len(ids) - 1), len(ids)) - h))
        bar = progress(len(prompts), "reference runs", unit="row", enabled=scope.progress, leave=False)
        for i, o in runner.stream(rows, capture=True, progress=bar):
            self.resid[prompts[i]], self.logprobs[prompts[i]] = o.resid, o.logprobs.clone()
        bar.close()

    def last_resid(self, p: int) -> torch.Tensor:
        return self.resid[p][-1]  # (L+1, H)

    def top1(self, p: int) -> int:
        return int(self.logprobs[p].argmax())

    def pair_refs(self) -> dict[str, tuple[np.ndarray, tuple[str, ...]]]:
        """Per pair: KL(v||b), log p_v(y_v), log p_b(y_v), and whether the top-1 changed."""
        kl_vb, lp_v, lp_b, changed = [], [], [], []
        for _, r in self.pairs.iterrows():
            v, b = int(r.variant), int(r.baseline)
            y = self.top1(v)
            kl_vb.append(float(kl(self.logprobs[v], self.logprobs[b])))
            lp_v.append(float(self.logprobs[v][y]))
            lp_b.append(float(self.logprobs[b][y]))
            changed.append(y != self.top1(b))
        return {
            "pair": (self.pairs["pair"].to_numpy(np.int32), ("pair",)),
            "kl_vb": (np.asarray(kl_vb, np.float32), ("pair",)),
            "lp_v": (np.asarray(lp_v, np.float32), ("pair",)),
            "lp_b": (np.asarray(lp_b, np.float32), ("pair",)),
            "top1_changed": (np.asarray(changed, np.uint8), ("pair",)),
        }


def unpatched(refs: Refs, b: int, bs: int) -> torch.Tensor | None:
    """The baseline ``b``'s own residual stream (n_al, L+1, H) from its aligned suffix start
    ``bs`` on, if its reference run holds it (None otherwise). A patched row whose patched
    values equal these at its site (bitwise: site 0 of every aligned position patches the
    same token embeddings in a model without position embeddings) is the baseline's own run
    from that site on, so its output is the baseline's reference and it is not run."""
    if b not in refs.first or refs.first[b] > bs:
        return None
    return refs.resid[b][bs - refs.first[b] :]


class _Targets:
    """Per row of an analysis: the distribution its output is compared with (the pair's
    variant) and the token whose log-probability is kept (the variant's top-1)."""

    def __init__(self, refs: Refs, variants: list[int]):
        self.lp = {v: refs.logprobs[v] for v in set(variants)}
        self.y = {v: refs.top1(v) for v in set(variants)}

    def measure(self, v: int, out: torch.Tensor) -> tuple[float, float]:
        """KL(p_v || out) and log out(y_v)."""
        return float(kl(self.lp[v], out)), float(out[self.y[v]])


# --- 1. activation patching ------------------------------------------------------------------
PATCH_MODES = ("suffix", "last")
PATCHED = (slice(None), slice(-1, None))  # per mode: the aligned suffix positions it patches


def patching(runner: Runner, plan, scope: Scope, refs: Refs | None = None):
    """Run each baseline with the variant's residual stream patched in at one site: at every
    aligned suffix position (``suffix``), or at the last position only (``last``).

    Rows: pairs x modes x sites 0..L. Site 0 of ``suffix`` patches identical token
    embeddings (recovers nothing); site L of ``last`` patches the final residual of the
    last position (recovers everything): the two ends of every curve are fixed points.
    Every tail position is replaced at the site, so each row runs only the layers from
    its site on; the suffix rows of all pairs share the template's head, the last-position
    rows of one user prompt share its baseline's. A row whose patched values are the
    baseline's own (:func:`unpatched`) takes the baseline's reference output instead of
    running."""
    refs = refs or Refs(runner, plan, scope)
    L = runner.L
    n = len(refs.pairs)
    out_kl = np.zeros((n, len(PATCH_MODES), L + 1), np.float32)
    out_lp = np.zeros_like(out_kl)
    rows, where = [], []
    targets = _Targets(refs, refs.pairs["variant"].astype(int).tolist())
    for i, r in enumerate(refs.pairs.itertuples()):
        v, b = int(r.variant), int(r.baseline)
        b_ids = plan.prompt_tokens(b)
        src = refs.resid[v][int(r.v_suffix_start) - refs.first[v] :]  # (n_al, L+1, H)
        bs = int(r.b_suffix_start)
        own = unpatched(refs, b, bs)  # (n_al, L+1, H) the baseline's own residuals there, if held
        for site in range(L + 1):
            # every tail position is replaced at `site`: the layers below it need not run
            start = min(site, L - 1)
            for m, (head, tail) in enumerate([(b_ids[:bs], b_ids[bs:]), (b_ids[:-1], b_ids[-1:])]):  # suffix, last
                pos = PATCHED[m]
                if own is not None and torch.equal(src[pos, site], own[pos, site]):
                    # the baseline's own values (site 0 of `suffix`: the same token embeddings): its own run
                    out_kl[i, m, site], out_lp[i, m, site] = targets.measure(v, refs.logprobs[b])
                    continue
                rows.append(Row(head, tail, [Edit(site, np.arange(len(tail)), src[pos, site])], start=start))
                where.append((i, m, site, v))
    bar = progress(len(rows), "patching", unit="row", enabled=scope.progress, leave=False)
    for j, o in runner.stream(rows, progress=bar):
        i, m, site, v = where[j]
        out_kl[i, m, site], out_lp[i, m, site] = targets.measure(v, o.logprobs)
    bar.close()
    arrays = refs.pair_refs()
    arrays["kl"] = (out_kl, ("pair", "mode", "site"))
    arrays["lp"] = (out_lp, ("pair", "mode", "site"))
    return arrays, {"modes": list(PATCH_MODES), "n_sites": L + 1, "users": scope.users}


# --- 2. instruction-span attention knockout ---------------------------------------------------
def knockout(runner: Runner, plan, scope: Scope, refs: Refs | None = None):
    """Run each variant with attention from every token after the instruction (the system
    prompt, or an instruction prefix) to its tokens blocked in layers >= l, for l = 0..L
    (l = L: nothing blocked).

    The head (everything up to the end of the system region) is unaffected by the knockout
    and is computed once per system prompt, for all its user prompts."""
    refs = refs or Refs(runner, plan, scope)
    L = runner.L
    n = len(refs.pairs)
    out_kl = np.zeros((n, L + 1), np.float32)
    out_lp = np.zeros_like(out_kl)
    kl_ko0_b = np.zeros(n, np.float32)
    rows, where = [], []
    for i, r in enumerate(refs.pairs.itertuples()):
        v = int(r.variant)
        ids, reg = plan.prompt_tokens(v), plan.prompt_regions(v)
        code = _span_code(r)
        sys_pos = np.flatnonzero(reg == code)
        if sys_pos.size == 0:
            raise CausalError(f"variant prompt {v} ({r.system}, {r.user_id}) has no {REGIONS[code]} tokens to knock out")
        end = int(sys_pos[-1]) + 1
        keys = reg == code
        own = refs.resid[v][end - refs.first[v] :]  # (n - end, L+1, H): the unablated run's tail
        for start in range(L + 1):
            # below `start` the tail is the unablated variant's: inject it there, skip those layers
            s0 = min(start, L - 1)
            rows.append(Row(ids[:end], ids[end:], [Edit(s0, np.arange(len(ids) - end), own[:, s0])],
                            knockout_keys=keys, knockout_start=start, start=s0))
            where.append((i, start, v, int(r.baseline)))
    targets = _Targets(refs, [w[2] for w in where])
    bar = progress(len(rows), "knockout", unit="row", enabled=scope.progress, leave=False)
    for j, o in runner.stream(rows, progress=bar):
        i, start, v, b = where[j]
        out_kl[i, start], out_lp[i, start] = targets.measure(v, o.logprobs)
        if start == 0:
            kl_ko0_b[i] = float(kl(o.logprobs, refs.logprobs[b]))
    bar.close()
    arrays = refs.pair_refs()
    arrays["kl"] = (out_kl, ("pair", "start"))
    arrays["lp"] = (out_lp, ("pair", "start"))
    arrays["kl_ko0_b"] = (kl_ko0_b, ("pair",))
    return arrays, {"n_starts": L + 1, "users": scope.users}


# --- 3. phrase ablation and token attribution --------------------------------------------------
def _internal(h: torch.Tensor, hb: torch.Tensor) -> float:
    """Mean over layers of ||h - h_b|| / ||h_b|| at the last position (resid_post, sites 1..L)."""
    d = (h[1:] - hb[1:]).norm(dim=-1) / hb[1:].norm(dim=-1).clamp_min(1e-12)
    return float(d.mean())


def _common_prefix(seqs: list[np.ndarray]) -> int:
    """Length of the longest common prefix of token sequences."""
    n = min(len(x) for x in seqs)
    first = seqs[0][:n]
    for x in seqs[1:]:
        diff = np.flatnonzero(x[:n] != first[:n])
        n = int(diff[0]) if diff.size else n
    return n


def phrases(runner: Runner, plan, scope: Scope, refs: Refs | None = None, tok=None):
    """Leave each phrase of each instruction (system prompt or prefix) out
    (:func:`split_phrases`), rerun every user prompt, and measure the output and internal
    effects against the baseline; then attribute the output change to single instruction
    tokens by gradient x input."""
    from types import SimpleNamespace

    refs = refs or Refs(runner, plan, scope)
    sweep = plan.sweep
    pairs = refs.pairs
    inst = _instructions(sweep)
    systems = [SimpleNamespace(name=label, text=inst[label][1]) for label in dict.fromkeys(pairs["system"])]
    users = list(scope.users)
    U = len(users)
    key = {(r.system, r.user_id): r for r in pairs.itertuples()}
    phrase_rows, rows, where = [], [], []
    user_text = {x.id: x.text for x in sweep.user_prompts}
    clock = plan.template_clock()  # a template that reads the clock renders as it did for the plan
    for s in systems:
        spans = split_phrases(s.text)
        for j, span in enumerate(spans):
            pi = len(phrase_rows)
            phrase_rows.append({"system": s.name, "index": j, "text": s.text[span[0] : span[1]],
                                "start": span[0], "end": span[1], "n_phrases": len(spans)})
            text = without(s.text, span)
            group = []
            for u_i, u in enumerate(users):
                base = plan.prompt_tokens(int(key[(s.name, u)].baseline))
                if text.strip():
                    ids = render(tok, _messages(tok, sweep, s.name, text, user_text[u], clock), clock=clock).ids
                else:  # the only phrase: leaving it out leaves the baseline
                    ids = base
                group.append(ids)
                where.append((pi, u_i))
            # the user prompts of one ablated system prompt share everything before the user turn
            h = _common_prefix(group)
            rows += [Row(ids[: max(1, min(h, len(ids) - 1))], ids[max(1, min(h, len(ids) - 1)) :]) for ids in group]
    n_ph = len(phrase_rows)
    kl_ab = np.full((n_ph, U), np.nan, np.float32)
    kl_va = np.full((n_ph, U), np.nan, np.float32)
    internal_a = np.full((n_ph, U), np.nan, np.float32)
    bar = progress(len(rows), "phrase ablation", unit="row", enabled=scope.progress, leave=False)
    for j, o in runner.stream(rows, capture=True, progress=bar):
        pi, u_i = where[j]
        r = key[(phrase_rows[pi]["system"], users[u_i])]
        v, b = int(r.variant), int(r.baseline)
        kl_ab[pi, u_i] = float(kl(o.logprobs, refs.logprobs[b]))
        kl_va[pi, u_i] = float(kl(refs.logprobs[v], o.logprobs))
        internal_a[pi, u_i] = _internal(o.resid, refs.last_resid(b))
    bar.close()
    kl_vb = np.full((len(systems), U), np.nan, np.float32)
    internal_v = np.full_like(kl_vb, np.nan)
    for si, s in enumerate(systems):
        for u_i, u in enumerate(users):
            r = key[(s.name, u)]
            v, b = int(r.variant), int(r.baseline)
            kl_vb[si, u_i] = float(kl(refs.logprobs[v], refs.logprobs[b]))
            internal_v[si, u_i] = _internal(refs.last_resid(v), refs.last_resid(b))
    attr, token_rows = token_attribution(runner, plan, scope, refs, systems, key, tok)
    arrays = {
        "kl_ab": (kl_ab, ("phrase", "user")),
        "kl_va": (kl_va, ("phrase", "user")),
        "internal_a": (internal_a, ("phrase", "user")),
        "kl_vb": (kl_vb, ("system", "user")),
        "internal_v": (internal_v, ("system", "user")),
        "token_attr": (attr, ("system_token", "user")),
    }
    meta = {"phrases": phrase_rows, "systems": [s.name for s in systems], "users": users, "tokens": token_rows,
            "attribution": "gradient x input of KL(p || p_baseline) at the variant, per system token embedding"}
    return arrays, meta


# share of the runner's token budget that one gradient pass takes (its backward keeps every
# layer's activations: ~0.5 MB per token for a 30-layer, 576-wide model)
_GRAD_BUDGET_SHARE = 4


def _embedding_gradients(runner: Runner, seqs: list[np.ndarray], targets: torch.Tensor):
    """One right-padded forward and backward pass: for each row b, the gradient of
    f_b = KL(p_b || targets[b]) at its last position with respect to its input embeddings,
    and those embeddings, both (B, S, H). Rows do not interact (each sees only its own
    tokens), so the gradient of the sum is every row's own gradient."""
    B, lens = len(seqs), [len(x) for x in seqs]
    S, dev = max(lens), runner.device
    x = torch.zeros(B, S, dtype=torch.long)
    mask = torch.zeros(B, S, dtype=torch.long)
    for b, ids in enumerate(seqs):
        x[b, : lens[b]] = torch.as_tensor(ids)
        mask[b, : lens[b]] = 1
    pos = torch.arange(S).unsqueeze(0).expand(B, S)
    emb = runner.model.get_input_embeddings()
    # only the inputs' gradient is wanted: parameters that do not require one keep autograd
    # from saving every layer's inputs for weight gradients (memory, not arithmetic)
    params = [p for p in runner.model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            e = emb(x.to(dev)).detach().requires_grad_(True)  # (B, S, H)
            out = runner.base(inputs_embeds=e, attention_mask=mask.to(dev), position_ids=pos.to(dev),
                              use_cache=False)
            h = out.last_hidden_state[torch.arange(B, device=dev), torch.as_tensor(lens, device=dev) - 1]  # (B, H)
            lp = runner.logprobs(h)  # (B, V)
            f = kl(lp, targets.to(lp.device))  # (B,)
            (g,) = torch.autograd.grad(f.sum(), e)
    finally:
        for p in params:
            p.requires_grad_(True)
    return g.detach(), e.detach()


def token_attribution(runner: Runner, plan, scope: Scope, refs: Refs, systems, key, tok):
    """Gradient x input over the instruction's tokens (system, or prefix): for f(x) = KL(p_x || p_b) at the variant
    (the size of the output change), attribution of token i = <e_i, df/de_i>, the
    first-order change in f when e_i is removed. One forward and one backward pass per
    pair, instead of one forward per token for occlusion; the phrase ablation above is the
    occlusion check of these attributions at the phrase level (see docs/CAUSAL.md)."""
    users = list(scope.users)
    token_rows, blocks = [], []
    bar = progress(len(systems) * len(users), "token attribution", unit="row", enabled=scope.progress, leave=False)
    for s in systems:
        first = key[(s.name, users[0])]
        code = _span_code(first)
        reg0 = plan.prompt_regions(int(first.variant))
        ids0 = plan.prompt_tokens(int(first.variant))
        sys_idx0 = np.flatnonzero(reg0 == code)
        spans = split_phrases(s.text)
        u0 = next(x.text for x in plan.sweep.user_prompts if x.id == users[0])
        clock = plan.template_clock()
        rd = render(tok, _messages(tok, plan.sweep, s.name, s.text, u0, clock), clock=clock)
        sp = next(x for x in rd.spans if x.region == REGIONS[code] and x.message >= 0)
        for t, p in enumerate(sys_idx0):
            # character offset of the token inside the system text (a token may start with the
            # template's whitespace before it, or the template may have trimmed the text)
            c = max(int(rd.offsets[p][0]), sp.start) - sp.start + sp.source_start
            while c < len(s.text) and s.text[c].isspace():
                c += 1
            phrase = next((j for j, (a, b) in enumerate(spans) if a <= c < b), -1)
            token_rows.append({"system": s.name, "index": t, "token": tok.decode([int(ids0[p])]), "phrase": phrase})
        block = np.full((len(sys_idx0), len(users)), np.nan, np.float32)
        seqs, targets, where = [], [], []
        for u in users:
            r = key[(s.name, u)]
            v, b = int(r.variant), int(r.baseline)
            ids, reg = plan.prompt_tokens(v), plan.prompt_regions(v)
            sys_idx = np.flatnonzero(reg == code)
            if len(sys_idx) != len(sys_idx0) or not np.array_equal(ids[sys_idx], ids0[sys_idx0]):
                raise CausalError(f"instruction {s.name!r} tokenizes differently with user prompt {u!r}; "
                                  "token attribution needs the same instruction tokens in every pair")
            seqs.append(ids)
            targets.append(refs.logprobs[b])
            where.append(sys_idx)
        # the user prompts of one system prompt in right-padded batches; a smaller token budget
        # than the forward-only runs, since the backward pass keeps every layer's activations
        lengths = [len(x) for x in seqs]
        for batch in plan_batches(lengths, max(1, runner.token_budget // _GRAD_BUDGET_SHARE)):
            g, e = _embedding_gradients(runner, [seqs[i] for i in batch], torch.stack([targets[i] for i in batch]))
            for k, u_i in enumerate(batch):
                block[:, u_i] = (g[k, where[u_i]] * e[k, where[u_i]]).sum(-1).float().cpu().numpy()
            bar.update(len(batch))
        blocks.append(block)
    bar.close()
    return np.concatenate(blocks) if blocks else np.zeros((0, len(users)), np.float32), token_rows


# --- 4. steering vectors -----------------------------------------------------------------------
def steering(runner: Runner, plan, scope: Scope, refs: Refs | None = None):
    """Per system prompt and site, the steering vector is the mean over user prompts of the
    last-position residual difference (variant - baseline). Each baseline is run with the
    vector computed *without its own user prompt* (leave one out) added at its last
    position at one site, and compared with its variant.

    Rows: pairs x sites 0..L, one token each (the baseline's head is cached), each run from
    its site on: the residual there is the baseline's own (from the reference run) plus the
    vector."""
    refs = refs or Refs(runner, plan, scope)
    pairs = refs.pairs
    L = runner.L
    if len(scope.users) < 2:
        raise CausalError("steering vectors are tested on held-out user prompts: the scope needs at least 2")
    diffs = {}
    for r in pairs.itertuples():
        diffs[(r.system, r.user_id)] = refs.last_resid(int(r.variant)) - refs.last_resid(int(r.baseline))
    systems = list(dict.fromkeys(pairs["system"]))
    total = {s: sum(d for (s2, _), d in diffs.items() if s2 == s) for s in systems}
    count = {s: sum(1 for (s2, _) in diffs if s2 == s) for s in systems}
    norms = np.stack([(total[s] / count[s]).norm(dim=-1).numpy() for s in systems]).astype(np.float32)
    rows, where = [], []
    for i, r in enumerate(pairs.itertuples()):
        if count[r.system] < 2:
            raise CausalError(f"system prompt {r.system!r} has one user prompt in scope: nothing to hold out")
        vec = (total[r.system] - diffs[(r.system, r.user_id)]) / (count[r.system] - 1)  # (L+1, H)
        b_ids = plan.prompt_tokens(int(r.baseline))
        steered = refs.last_resid(int(r.baseline)) + vec  # (L+1, H): the baseline's own residual, plus the vector
        for site in range(L + 1):
            # below `site` the baseline's last position is its unsteered run: start at the site
            # with the steered residual instead of adding the vector to a rerun of those layers
            rows.append(Row(b_ids[:-1], b_ids[-1:], [Edit(site, np.array([0]), steered[site][None])],
                            start=min(site, L - 1)))
            where.append((i, site, int(r.variant)))
    out_kl = np.zeros((len(pairs), L + 1), np.float32)
    out_lp = np.zeros_like(out_kl)
    targets = _Targets(refs, [w[2] for w in where])
    bar = progress(len(rows), "steering", unit="row", enabled=scope.progress, leave=False)
    for j, o in runner.stream(rows, progress=bar):
        i, site, v = where[j]
        out_kl[i, site], out_lp[i, site] = targets.measure(v, o.logprobs)
    bar.close()
    arrays = refs.pair_refs()
    arrays["kl"] = (out_kl, ("pair", "site"))
    arrays["lp"] = (out_lp, ("pair", "site"))
    arrays["norm"] = (norms, ("system", "site"))
    return arrays, {"systems": systems, "n_sites": L + 1, "users": scope.users,
                    "vector": "mean over held-out-excluded user prompts of resid(variant) - resid(baseline) at the "
                              "last position, added at the last position"}


__all__ = ["CausalError", "PATCHED", "PATCH_MODES", "Refs", "Scope", "knockout", "patching", "phrases", "steering",
           "token_attribution", "unpatched"]
