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
    pk = get_packing()
    if pk is not None:  # a packed batch: its keys are already padded (the cache wrote them so)
        query, attention_mask = pk.unpack(query), pk.mask
    B, NH, Sq, D = query.shape
    NKV, Sk = key.shape[1], key.shape[2]
    rep = NH // NKV
    scaling = scaling if scaling is not None else D**-0.5
    stats = get_stats()
    pos = get_positions()
    if pos is not None:  # sliding windows: the mask from positions replaces the slot-index one
        mask = pos.mask(module.layer_idx, sliding_window, Sk, query.dtype)
    else:
        mask = attention_mask[:, :, :, :Sk] if attention_mask is not None else None
    hooks = getattr(module, _MASK_HOOKS, None)
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
