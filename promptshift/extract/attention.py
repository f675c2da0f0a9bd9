"""An attention function that reduces attention probabilities to statistics inside each
layer, as soon as they exist, so no more than one layer's (B, heads, Sq, Sk) matrix is
ever alive. Registered with transformers' AttentionInterface as ``promptshift``.

When no statistics are being collected (generation, self-checks) it runs PyTorch's fused
scaled-dot-product attention instead.

Packed batches (:class:`Packing`): the rows of a batch travel through the model as one
sequence of their real tokens, (1, N), so every per-token module (projections, MLP,
norms) does no work on padding; only here, for the scores, are queries unpacked into the
padded (B, heads, S, P + S) layout, and the output packed again.

Mask hooks (:func:`register_mask_hook`) are the one opening this function offers to
interventions: a hook may change which keys each query sees. Extraction registers none.

Sliding-window layers (:class:`Positions`): the window is a distance in positions, so the
mask is built here from each query's and key's absolute position, not from slot indices,
which a batch layout does not keep in step with positions (a row's own keys sit after the
longest prefix of its batch, generated tokens after the longest prompt).

Size: one attention function and the statistics it reduces in-layer (regions, entropy,
sink, last row, patterns), with the packing and sliding-window masks it must honour.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.hooks import RemovableHandle

ATTN_NAME = "promptshift"
_local = threading.local()


@dataclass
class AttnStats:
    """Per-batch accumulators, filled layer by layer. Shapes use L layers, NH heads, R regions."""

    q_onehot: torch.Tensor  # (B, Sq, R) float: query region one-hot (zero rows for padding)
    k_onehot: torch.Tensor  # (B, Sk, R) float: key region one-hot
    q_notfirst: torch.Tensor  # (B, Sq) float: real query that is not absolute position 0
    last_q: torch.Tensor  # (B,) long: index of the last real query row
    sink_k: torch.Tensor  # (B,) long: key index of absolute position 0 (moves with left padding)
    region_mass: torch.Tensor  # (B, L, NH, R, R) sum over queries of mass to each key region
    entropy: torch.Tensor  # (B, L, NH, R) sum over queries of row entropy
    sink: torch.Tensor  # (B, L, NH) sum over queries (pos > 0) of mass on key 0
    last_row: torch.Tensor  # (B, L, NH, Sk) last real query's attention row
    full_layers: tuple[int, ...] = ()  # layers whose whole pattern the user opted into
    patterns: dict | None = None  # layer -> (B, NH, Sq, Sk) on CPU, in ``pattern_dtype``
    pattern_dtype: torch.dtype = torch.float16  # the store's storage dtype
    _on: dict = field(default_factory=dict, repr=False)  # device -> the per-row tensors above, copied there

    @classmethod
    def allocate(cls, q_regions, k_regions, q_positions, last_q, sink_k, n_layers, n_heads, n_regions,
                 full_layers=(), pattern_dtype=torch.float16):
        """q_regions (B, Sq) / k_regions (B, Sk): region codes, -1 for padding."""
        B, Sq = q_regions.shape
        Sk = k_regions.shape[1]
        dev = q_regions.device
        qo = F.one_hot(q_regions.clamp(min=0).long(), n_regions).float() * (q_regions >= 0).unsqueeze(-1)
        ko = F.one_hot(k_regions.clamp(min=0).long(), n_regions).float() * (k_regions >= 0).unsqueeze(-1)
        z = lambda *s: torch.zeros(*s, device=dev, dtype=torch.float32)  # noqa: E731
        return cls(
            q_onehot=qo,
            k_onehot=ko,
            q_notfirst=((q_regions >= 0) & (q_positions > 0)).float(),
            last_q=last_q,
            sink_k=sink_k,
            region_mass=z(B, n_layers, n_heads, n_regions, n_regions),
            entropy=z(B, n_layers, n_heads, n_regions),
            sink=z(B, n_layers, n_heads),
            last_row=z(B, n_layers, n_heads, Sk),
            full_layers=tuple(full_layers),
            pattern_dtype=pattern_dtype,
            patterns={},
        )

    def _inputs_on(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(q_onehot, k_onehot, q_notfirst, sink_k, last_q) on ``device``. A model split over
        devices computes each layer's probabilities on that layer's device, where the
        one-hots and indices must be too; they are copied there once per batch."""
        t = self._on.get(device)
        if t is None:
            t = self._on[device] = tuple(x.to(device) for x in (self.q_onehot, self.k_onehot, self.q_notfirst,
                                                                  self.sink_k, self.last_q))
        return t

    def reduce(self, layer: int, probs: torch.Tensor) -> None:
        """probs: (B, NH, Sq, Sk) float32 attention probabilities of one layer, on any device
        (the accumulators stay where they were allocated)."""
        q_onehot, k_onehot, q_notfirst, sink_k, last_q = self._inputs_on(probs.device)
        dev = self.region_mass.device
        to_region = probs @ k_onehot.unsqueeze(1)  # (B, NH, Sq, R)
        self.region_mass[:, layer] = torch.einsum("bhqr,bqs->bhsr", to_region, q_onehot).to(dev)
        ent = torch.special.entr(probs).sum(-1)  # (B, NH, Sq): -p log p, 0 where p = 0
        self.entropy[:, layer] = torch.einsum("bhq,bqs->bhs", ent, q_onehot).to(dev)
        b = torch.arange(probs.shape[0], device=probs.device)
        to_sink = probs[b, :, :, sink_k]  # (B, NH, Sq)
        self.sink[:, layer] = (to_sink * q_notfirst.unsqueeze(1)).sum(-1).to(dev)  # (B, NH)
        self.last_row[:, layer] = probs[b, :, last_q, :].to(dev)  # (B, NH, Sk)
        if layer in self.full_layers:
            self.patterns[layer] = probs.to("cpu", self.pattern_dtype)  # (B, NH, Sq, Sk)


def set_stats(stats: AttnStats | None) -> None:
    _local.stats = stats


@dataclass
class Packing:
    """The rows of a batch packed into one sequence of their real tokens.

    Packed token ``k`` sits at row ``b[k]``, slot ``s[k]`` of the padded (B, S) layout the
    attention works in; ``mask`` is the additive (B, 1, S, P + S) mask of that layout
    (prefix keys, then the row's own keys causally, padding hidden)."""

    b: torch.Tensor  # (N,) long
    s: torch.Tensor  # (N,) long
    B: int
    S: int
    mask: torch.Tensor  # (B, 1, S, P+S)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(1, heads, N, D) -> (B, heads, S, D), contiguous, zeros in the padding slots."""
        _, H, _, D = x.shape
        out = x.new_zeros(self.B, H, self.S, D)
        out[self.b, :, self.s] = x[0].transpose(0, 1)  # (N, heads, D)
        return out

    def pack(self, y: torch.Tensor) -> torch.Tensor:
        """(B, heads, S, D) -> (1, N, heads, D): the real tokens only."""
        return y[self.b, :, self.s].unsqueeze(0)


@dataclass
class Positions:
    """Absolute positions of the query and key slots of a batch, for models with
    sliding-window layers; ``-1`` marks a slot that holds no token (padding).

    A real query at position ``q`` sees the keys at positions ``k`` with ``k <= q`` and, in a
    layer with window ``w``, ``q - k < w`` (transformers' ``sliding_window_overlay``: a query
    sees itself and the ``w - 1`` positions before it). Padding queries see every key, so
    that no row of scores is all masked (their outputs are never read)."""

    q: torch.Tensor  # (B, Sq) long
    k: torch.Tensor  # (B, Sk) long: the key slots of the cache layout, in order
    windows: tuple[int | None, ...]  # per layer: its window, None for global attention
    _masks: dict | None = None

    def mask(self, layer: int, window: int | None, Sk: int, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask (B, 1, Sq, Sk) for ``layer``; ``window`` as the layer passes it
        (None: the layer's entry in ``windows``)."""
        w = window if window is not None else self.windows[layer]
        if self._masks is None:
            self._masks = {}
        key = (w, Sk, dtype)
        m = self._masks.get(key)
        if m is None:
            q, k = self.q[:, :, None], self.k[:, None, :Sk]  # (B, Sq, 1), (B, 1, Sk)
            ok = (k >= 0) & (k <= q)
            if w is not None:
                ok &= q - k < w
            ok |= q < 0
            m = torch.zeros(ok.shape, dtype=dtype, device=ok.device).masked_fill_(~ok, torch.finfo(dtype).min)
            m = self._masks[key] = m[:, None]  # (B, 1, Sq, Sk)
        return m


@dataclass
class Decoding:
    """One greedy decode step of many rows (one query each), each row continuing its own
    shared prefix: cascade attention (Juravsky et al., "Hydragen: High-Throughput LLM
    Inference with Shared Prefixes", 2024; FlashInfer's cascade attention).

    Row b attends to the keys of its prefix group ``group[b]`` (none for -1), then to its
    own keys (the cache layer's: the prompt tokens after the prefix, padding, the tokens
    generated so far). A group's prefix keys and values are held once per layer
    (``prefix_kv``), and the queries of all its rows meet them in one product, so a step
    reads each shared prefix once instead of once per row: on a block of the built-in
    sweep the keys and values read per step shrink several-fold, and they, not the
    weights, were the larger read. The softmax runs over the prefix's and the row's own
    scores together, so it is the same function as attention over the concatenated keys;
    only the order of the float sums differs.

    Windows: a key slot's absolute position is ``key_pos`` (-1: padding, or not yet
    written), so sliding-window layers see a query at position q attend to positions
    q - w + 1 .. q, as :class:`Positions` does for prompt passes."""

    prefix_kv: list[tuple[torch.Tensor, torch.Tensor] | None]  # per layer (G, NKV, Pmax, D); None: no prefix
    group: torch.Tensor  # (B,) long: each row's prefix group, -1 for none
    key_pos: torch.Tensor  # (B, Pmax + T) long: positions of the prefix slots, then of the own slots
    windows: tuple[int | None, ...]  # per layer: its window, None for global attention
    q_pos: torch.Tensor | None = None  # (B,) long: position of this step's query
    _dev: dict = field(default_factory=dict, repr=False)  # device -> (gq, slot, slot_any, key_pos) there
    _qdev: dict = field(default_factory=dict, repr=False)  # device -> this step's q_pos there
    _masks: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        G = next((kv[0].shape[0] for kv in self.prefix_kv if kv is not None), 0)
        g = self.group.cpu()
        sizes = torch.bincount(g[g >= 0], minlength=G) if G else torch.zeros(0, dtype=torch.long)
        self.G, self.nmax = G, int(sizes.max()) if G else 0
        # the rows of each group side by side, padded to the largest group: group slot
        # g * nmax + j holds the j-th row of group g (padding slots: row 0, never read back)
        gq = torch.zeros(G * self.nmax, dtype=torch.long)
        slot = torch.full((len(g),), G * self.nmax, dtype=torch.long)  # no group: a zero row after the last slot
        filled = [0] * G
        for b, gb in enumerate(g.tolist()):
            if gb >= 0:
                slot[b] = gb * self.nmax + filled[gb]
                gq[slot[b]] = b
                filled[gb] += 1
        self._no_group = bool((g < 0).any())
        # scores of rows without a group may come from any slot: the mask hides them all
        self._gq, self._slot, self._slot_any = gq, slot, slot.clamp(max=max(G * self.nmax - 1, 0))

    def step(self, q_pos: torch.Tensor) -> None:
        """Start a step whose queries sit at ``q_pos`` (B,)."""
        self.q_pos = q_pos
        self._qdev, self._masks = {}, {}

    def _on(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(gq, slot, slot_any, key_pos, q_pos) on ``device``: each layer of a model split over
        devices attends on its own device; the indices are copied there once."""
        t = self._dev.get(device)
        if t is None:
            t = self._dev[device] = tuple(x.to(device) for x in (self._gq, self._slot, self._slot_any, self.key_pos))
        q = self._qdev.get(device)
        if q is None:
            q = self._qdev[device] = self.q_pos.to(device)
        return (*t, q)

    def mask(self, layer: int, window: int | None, Sk: int, dtype: torch.dtype, device) -> torch.Tensor:
        """Additive (B, 1, 1, Sk) mask over the prefix slots and the first own slots."""
        w = window if window is not None else self.windows[layer]
        key = (w, Sk, dtype, device)
        m = self._masks.get(key)
        if m is None:
            *_, kpos, qpos = self._on(device)
            k = kpos[:, :Sk]  # (B, Sk)
            ok = (k >= 0) & (k <= qpos[:, None])  # slots not yet written hold -1 or later positions
            if w is not None:  # a query at q sees q - w + 1 .. q, as Positions does
                ok &= qpos[:, None] - k < w
            m = torch.zeros(ok.shape, dtype=dtype, device=device).masked_fill_(~ok, torch.finfo(dtype).min)
            m = self._masks[key] = m[:, None, None]  # (B, 1, 1, Sk)
        return m

    def attend(self, module, query, key, value, scaling: float, softcap, window, hooks=None) -> torch.Tensor:
        """query (B, NH, 1, D); key/value (B, NKV, T, D): the rows' own keys; ``hooks``:
        the module's mask hooks, given the (B, 1, 1, Pmax + T) mask of this layout. Returns
        (B, 1, NH, D)."""
        B, NH, _, D = query.shape
        NKV, T = key.shape[1], key.shape[2]
        rep = NH // NKV
        q = (query * scaling).reshape(B, NKV, rep, D)  # head h = kv * rep + r, as in promptshift_attention
        scores = q @ key.transpose(2, 3)  # (B, NKV, rep, T)
        kv = self.prefix_kv[module.layer_idx]
        G, n = self.G, self.nmax
        P = 0
        if kv is not None:
            gq, slot, slot_any, _, _ = self._on(query.device)
            kp, vp = kv  # (G, NKV, P, D)
            P = kp.shape[2]
            qg = q.index_select(0, gq).view(G, n, NKV, rep, D).transpose(1, 2).reshape(G, NKV, n * rep, D)
            sp = (qg @ kp.transpose(2, 3)).view(G, NKV, n, rep, P).transpose(1, 2).reshape(G * n, NKV, rep, P)
            scores = torch.cat([sp.index_select(0, slot_any), scores], dim=-1)  # (B, NKV, rep, P + T)
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        mask = self.mask(module.layer_idx, window, P + T, scores.dtype, query.device)
        for fn in (hooks or {}).values():
            mask = fn(module, mask)
        probs = torch.softmax(scores + mask, dim=-1, dtype=torch.float32).to(value.dtype)  # (B, NKV, rep, P + T)
        out = probs[..., P:] @ value  # (B, NKV, rep, D)
        if kv is not None:
            pg = probs[..., :P].index_select(0, gq).view(G, n, NKV, rep, P).transpose(1, 2).reshape(G, NKV, n * rep, P)
            og = (pg @ vp).view(G, NKV, n, rep, D).transpose(1, 2).reshape(G * n, NKV, rep, D)
            if self._no_group:  # rows without a prefix add nothing: they read the zero row
                og = torch.cat([og, og.new_zeros(1, NKV, rep, D)])
            out = out + og.index_select(0, slot)
        return out.reshape(B, 1, NH, D)


def set_decoding(decoding: Decoding | None) -> None:
    _local.decoding = decoding


def get_decoding() -> Decoding | None:
    return getattr(_local, "decoding", None)


def set_positions(positions: Positions | None) -> None:
    _local.positions = positions


def get_positions() -> Positions | None:
    return getattr(_local, "positions", None)


def set_packing(packing: Packing | None) -> None:
    _local.packing = packing


def get_packing() -> Packing | None:
    return getattr(_local, "packing", None)


def get_stats() -> AttnStats | None:
    return getattr(_local, "stats", None)


_MASK_HOOKS = "_promptshift_mask_hooks"


def register_mask_hook(module, fn) -> RemovableHandle:
    """Let ``fn(module, mask) -> mask`` decide which keys each query of ``module`` (one
    attention module, with its ``layer_idx``) may see: it gets the additive mask
    (B, 1, Sq, Sk) before the scores are masked (the causal mask when the model passed
    none) and returns the one to use. How interventions such as attention knockout
    (:mod:`promptshift.causal`) reach into attention without extraction knowing of them;
    a forward pass with no hook registered runs exactly as before. Remove with the
    returned handle's ``remove()``."""
    hooks = module.__dict__.get(_MASK_HOOKS)
    if hooks is None:
        hooks = OrderedDict()  # weakly referenced by the handles, as torch keeps its own hooks
        setattr(module, _MASK_HOOKS, hooks)
    handle = RemovableHandle(hooks)
    hooks[handle.id] = fn
    return handle


def promptshift_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                          softcap=None, sliding_window=None, **kwargs):
    """query (B, NH, Sq, D), key/value (B, NKV, Sk, D); attention_mask additive (B, 1, Sq, Sk).

    Grouped-query heads are handled by folding the ``rep`` query heads of each key/value
    head into the query axis, so keys and values are never copied per head."""
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    hooks = getattr(module, _MASK_HOOKS, None)
    dec = get_decoding()
    if dec is not None:  # a greedy decode step: one query per row, shared prefixes read once
        return dec.attend(module, query, key, value, scaling, softcap, sliding_window, hooks), None
    pk = get_packing()
    if pk is not None:  # a packed batch: its keys are already padded (the cache wrote them so)
        query, attention_mask = pk.unpack(query), pk.mask
    B, NH, Sq, D = query.shape
    NKV, Sk = key.shape[1], key.shape[2]
    rep = NH // NKV
    stats = get_stats()
    pos = get_positions()
    if pos is not None:  # sliding windows: the mask from positions replaces the slot-index one
        mask = pos.mask(module.layer_idx, sliding_window, Sk, query.dtype)
    else:
        mask = attention_mask[:, :, :, :Sk] if attention_mask is not None else None
    if hooks:
        if mask is None:
            causal = torch.ones(Sq, Sk, dtype=torch.bool, device=query.device).tril(Sk - Sq)
            mask = torch.zeros(B, 1, Sq, Sk, dtype=query.dtype, device=query.device).masked_fill(
                ~causal, torch.finfo(query.dtype).min)
        for fn in hooks.values():
            mask = fn(module, mask)  # (B, 1, Sq, Sk)
    if stats is None and softcap is None and pk is None:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                             is_causal=mask is None and Sq > 1, enable_gqa=rep > 1)
        return out.transpose(1, 2).contiguous(), None
    # the scale goes on the queries (Sq x D) rather than the scores (Sq x Sk): a power of two
    # for most head sizes, so the same scores, one pass less over the largest tensor
    q = (query * scaling).reshape(B, NKV, rep * Sq, D)  # (B, NKV, rep*Sq, D): head h = kv*rep + r
    scores = (q @ key.transpose(2, 3)).view(B, NH, Sq, Sk)  # (B, NH, Sq, Sk)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores.add_(mask)
    elif Sq > 1:
        causal = torch.ones(Sq, Sk, dtype=torch.bool, device=query.device).tril(Sk - Sq)
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)  # (B, NH, Sq, Sk)
    if stats is not None:
        stats.reduce(module.layer_idx, probs)
    out = (probs.to(value.dtype).view(B, NKV, rep * Sq, Sk) @ value).view(B, NH, Sq, D)  # (B, NH, Sq, D)
    if pk is not None:
        return pk.pack(out), None  # (1, N, NH, D)
    return out.transpose(1, 2).contiguous(), None


def _mask(*args, **kwargs):
    """transformers' eager additive mask, except for packed batches, whose attention builds
    its own padded-layout mask (:class:`Packing`)."""
    from transformers.masking_utils import eager_mask

    return None if get_packing() is not None else eager_mask(*args, **kwargs)


_registered = False


def register() -> str:
    """Register the attention function and its (additive, eager-style) mask builder."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

        AttentionInterface.register(ATTN_NAME, promptshift_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, _mask)
        _registered = True
    return ATTN_NAME


def install(model) -> None:
    """Make ``model`` use the promptshift attention function: on its config and on every
    sub-module config (some models cache the implementation per sub-config)."""
    register()
    model.config._attn_implementation = ATTN_NAME
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = ATTN_NAME
