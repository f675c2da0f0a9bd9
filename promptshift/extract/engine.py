"""The extraction engine: batched, padding-aware forward passes with hooks, prefix sharing,
attention statistics reduced in-layer, logits and logit lens at the last position, and
greedy continuations. One block at a time; a writer thread stores finished blocks.

Size: the forward pass of a batch (hooks, prefix caches, packing, the output side) is one
state machine over one batch; decoding is in :mod:`promptshift.extract.decode`, attention
statistics in :mod:`promptshift.extract.attention`, caches in :mod:`promptshift.extract.kvcache`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from promptshift.errors import ExtractError
from promptshift.extract.alloc import tune_glibc_malloc
from promptshift.extract.arch import bind_model
from promptshift.extract.attention import AttnStats, Packing, Positions, install, set_packing, set_positions, set_stats
from promptshift.extract.batching import plan_batches
from promptshift.extract.decode import Pending, greedy, own_keys
from promptshift.extract.kvcache import prefilled_cache
from promptshift.vocabulary import REGIONS

R = len(REGIONS)
_ATTN_BYTES_BUDGET = 1 << 29  # (B, NH, Sq, Sk) float32 probabilities of one layer
_KV_BYTES_BUDGET = 1 << 30  # a batch's padded prefix key/value cache, all layers
# what a padding slot of a packed batch costs outside attention (unpacking queries, keys and
# values into the padded layout), as a share of a real token's pass through the layers
_PACKED_SLOT_WEIGHT = 0.1


@dataclass
class Item:
    """One prompt to run: its tokens, regions and which absolute positions to keep."""

    prompt: int
    ids: np.ndarray
    regions: np.ndarray
    keep_start: int


@dataclass
class Prefix:
    """A shared prefix, computed once: its key/value cache and its own contributions."""

    length: int
    ids: np.ndarray
    regions: np.ndarray
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (1, NKV, P, D)
    keep_from: int  # first prefix position whose components are kept
    comps: dict[str, np.ndarray]  # component -> (P - keep_from, L, H)
    region_mass: np.ndarray  # (L, NH, R, R) sums over prefix queries
    entropy: np.ndarray  # (L, NH, R)
    sink: np.ndarray  # (L, NH)
    q_counts: np.ndarray  # (R,)
    sink_count: float
    patterns: np.ndarray | None = None  # (NFL, NH, P, P) opted-in full patterns


@dataclass
class Forward:
    """One padded batch's forward pass (:meth:`Engine._forward`), before any output side."""

    comps: dict[str, list[np.ndarray]]  # component -> per row (n_keep_b, L, H), kept positions only
    stats: AttnStats  # attention statistics reduced inside the layers
    last_resid: torch.Tensor | None  # (B, L, H) residual at each row's last position (want_output only)
    final_h: torch.Tensor | None  # (B, H) final hidden state at the last position (want_output only)
    cache: object | None  # the batch's key/value cache (prefix + padded rows), when kept
    lens: list[int]  # real tokens of each row in this pass (after its prefix)
    attn_mask: torch.Tensor  # (B, P+S) 1 on real keys (prefix and row)
    pad: list[int]  # padding slots before each row's tokens (left padding; 0 with right padding)
    prefix_len: int  # P: longest prefix of the batch (key slots before the rows' own tokens)


@dataclass
class PromptResult:
    """Everything extracted for one prompt, in float32 (storage casting happens later)."""

    comps: dict[str, np.ndarray]  # (n_kept, L, H)
    region_mass: np.ndarray  # (L, NH, R, R) mean over queries in each query region
    entropy: np.ndarray  # (L, NH, R)
    sink: np.ndarray  # (L, NH)
    last_row: np.ndarray  # (n_tokens, L, NH)
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    entropy_out: float
    lse: float
    lens_ids: np.ndarray  # (L, lens_k)
    lens_logprobs: np.ndarray
    lens_entropy: np.ndarray  # (L,)
    lens_final_top1: np.ndarray  # (L,)
    gen_ids: np.ndarray | None = None  # greedy continuation, up to and including EOS
    pattern: np.ndarray | None = None  # (n*n, NFL, NH) opted-in full patterns, query-major
    logprobs: np.ndarray | None = None  # (V,) full next-token log-probabilities (``full_logprobs``)


class Engine:
    def __init__(self, model, *, components, top_k: int, lens_top_k: int, token_budget: int,
                 padding_side: str = "right", full_attention_layers: tuple[int, ...] = (),
                 resid_pre_layers: int | None = None, packed: bool | None = None,
                 pattern_dtype: str = "float16", full_logprobs: bool = False):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be left or right, got {padding_side!r}")
        self.padding_side = padding_side
        self.full_layers = tuple(full_attention_layers)
        # opted-in full patterns are kept (on the CPU, until stored) in the storage dtype
        self._pattern_dtype = {"float16": torch.float16, "float32": torch.float32}[pattern_dtype]
        install(model)
        bind_model(self, model)
        cfg = self.cfg
        self.NH = cfg.num_attention_heads
        self.components = tuple(components)
        # resid_pre is captured at the first ``resid_pre_layers`` layers only (1: the store
        # derives the rest from resid_post, see check_residual_chain); None: every layer
        self._pre_layers = self.L if resid_pre_layers is None else int(resid_pre_layers)
        self.top_k, self.lens_top_k, self.token_budget = top_k, lens_top_k, token_budget
        self.full_logprobs = bool(full_logprobs)  # also return each prompt's whole (V,) log-probs
        if self.device.type == "cpu":
            tune_glibc_malloc()
        self._gather: tuple[torch.Tensor, torch.Tensor] | None = None
        self._on_dev: dict = {}  # (index name, device) -> the batch's index tensor copied there
        self._lens_ws: dict = {}  # the logit lens's buffers, reused by every batch
        self._pending: list[tuple[Pending, list[PromptResult]]] = []
        # decode work so far: row-steps through the model, keys they attended, seconds
        self.decode_rows, self.decode_keys, self.decode_seconds = 0, 0, 0.0
        # sliding-window layers get their masks from absolute positions (attention.Positions),
        # so padding gaps (rows of different prefix lengths in one batch, decode batches
        # merged after prompts of different lengths) never shift a window; and every layer
        # keeps its whole key/value cache (a sliding layer's own cache would drop the keys a
        # window has passed, which the attention statistics still report, as zeros)
        self._sliding = any(w is not None for w in self.windows)
        # cost of one query-key pair (all layers and heads: scores, softmax, statistics) in
        # token-passes through the layers' weights; 400 fits SmolLM2-135M on a CPU (measured
        # in docs/BENCHMARKS.md, batching), scaled by layers x heads over layer parameters
        n_layer_params = sum(p.numel() for layer in self.arch.layers for p in layer.parameters())
        self._qk_weight = 400.0 * self.L * self.NH / max(n_layer_params, 1)
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        nkv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self._nkv, self._hd, self._dtype = nkv, hd, next(model.parameters()).dtype
        self._kv_bytes = 2 * self.L * nkv * hd * self._dtype.itemsize  # per cached token
        self._layer_dev = [next(layer.parameters()).device for layer in self.arch.layers]  # (split models)
        # packed batches (real tokens only through every per-token module): on one device
        if packed is None:
            packed = len(set(self._layer_dev)) == 1
        self.packed = bool(packed)
        self._last: torch.Tensor | None = None
        self._buf: dict[str, list] = {}
        self._last_resid: list | None = None
        self._install_hooks()

    # --- hooks --------------------------------------------------------------------------
    def _install_hooks(self) -> None:
        def take(name, layer):
            def fn(t):
                if self._gather is None:
                    return
                b, s = self._index_on("gather_b", t.device), self._index_on("gather_s", t.device)
                self._buf[name][layer] = t[b, s].float().to(self.device)  # (N_keep, H)

            return fn

        self._handles = []
        for i in range(self.L):
            pre, post = take("resid_pre", i), take("resid_post", i)

            def pre_fn(h, pre=pre, i=i):
                if i < len(self._buf.get("resid_pre", ())):
                    pre(h)

            def post_fn(h, post=post, i=i):
                post(h)
                if self._last is not None:
                    b = torch.arange(h.shape[0], device=h.device)
                    self._last_resid[i] = h[b, self._index_on("last", h.device)].float().to(self.device)  # (B, H)

            self._handles += [self.arch.hook("resid_pre", i, pre_fn), self.arch.hook("resid_post", i, post_fn),
                              self.arch.hook("attn_out", i, take("attn_out", i)),
                              self.arch.hook("mlp_out", i, take("mlp_out", i))]

    def _index_on(self, name: str, device: torch.device) -> torch.Tensor:
        """The batch's index tensor ``name`` (``gather_b``, ``gather_s``: kept positions;
        ``last``: last real query) on ``device``. A model split over devices
        (``device="auto-split"``) runs each layer on its own device, and an index must sit
        on the device of the tensor it indexes; each is copied there once per batch."""
        t = self._on_dev.get((name, device))
        if t is None:
            t = self._on_dev[(name, self.device)].to(device)
            self._on_dev[(name, device)] = t
        return t

    @torch.inference_mode()
    def preflight(self, chain: bool, n_tokens: int = 8) -> None:
        """One short forward pass before anything is written. Non-finite activations are
        refused first (:func:`nonfinite_error`: a float16 overflow, a NaN weight), since a
        comparison with NaN would otherwise read as any other fault. Then, where the sweep
        keeps ``attn_out`` or ``mlp_out``, that the hooks capture what each layer adds to the
        residual stream (``resid_post = resid_pre + attn_out + mlp_out`` to the rounding of
        two additions): a family whose :class:`~promptshift.extract.arch.ArchSpec` points at
        the wrong modules (a norm applied after the hooked output) is refused, not stored.
        Then, with ``chain``, that the input of layer l+1 is bit for bit the output of layer
        l, which is what lets a store keep ``resid_pre`` at layer 0 only. True of every
        decoder stack that feeds each layer's output straight to the next; a model that
        changes the residual stream between layers is refused here."""
        vocab = int(self.cfg.vocab_size)
        n = max(2, min(n_tokens, vocab - 1))
        ids = (np.arange(1, n + 1, dtype=np.int64) * 7919) % vocab
        saved, comps = self._pre_layers, self.components
        self._pre_layers = self.L
        self.components = tuple(dict.fromkeys((*comps, "resid_pre", "resid_post", "attn_out", "mlp_out")))
        try:  # one pass, every layer's resid_pre captured, no output side
            got = self._forward([ids], [np.zeros(n, np.int8)], [None], [np.arange(n)], want_output=False).comps
        finally:
            self._pre_layers, self.components = saved, comps
        pre, post = got["resid_pre"][0], got["resid_post"][0]  # (n, L, H) each
        for name, a in (("resid_pre", pre), ("resid_post", post)):
            if not np.isfinite(a).all():
                layer = int(np.flatnonzero(~np.isfinite(a).all(axis=(0, 2)))[0])
                raise nonfinite_error(f"{name} of layer {layer} (a probe of {n} tokens, before any prompt)", self.model)
        if {"attn_out", "mlp_out"} & set(comps):
            attn, mlp = got["attn_out"][0].astype(np.float64), got["mlp_out"][0].astype(np.float64)
            u = torch.finfo(self._dtype).eps / 2  # unit roundoff of the dtype the layer adds in
            err = np.abs(post - (pre.astype(np.float64) + attn + mlp))  # (n, L, H)
            bad = err > 2 * u * (1 + u) * (np.abs(pre) + np.abs(attn) + np.abs(mlp))
            if bad.any():
                layer = int(np.flatnonzero(bad.any(axis=(0, 2)))[0])
                spec = self.arch.spec
                raise ExtractError(
                    f"{type(self.model).__name__} (model_type {self.arch.model_type!r}): resid_post of layer {layer} "
                    f"is not resid_pre + attn_out + mlp_out, so the modules hooked for attn_out and mlp_out "
                    f"({spec.attn_add!r}, {spec.mlp_add!r} in promptshift/extract/arch.py) are not what the layer "
                    "adds to the residual stream; fix its ArchSpec, or keep only resid_pre and resid_post"
                )
        if not chain:
            return
        bad = [la for la in range(1, self.L) if not np.array_equal(pre[:, la], post[:, la - 1])]
        if bad:
            raise ExtractError(
                f"{type(self.model).__name__} changes the residual stream between layers (resid_pre of layer "
                f"{bad[0]} differs from resid_post of layer {bad[0] - 1}), so resid_pre cannot be derived from "
                "resid_post; extract resid_pre and resid_post in separate sweeps (`components`)"
            )

    def check_residual_chain(self, n_tokens: int = 8) -> None:
        """:meth:`preflight` with the residual-chain check."""
        self.preflight(True, n_tokens)

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()

    # --- forward ------------------------------------------------------------------------
    def _context(self, prefixes: list[Prefix | None], S: int):
        """The cached keys/values every row attends to before its own ``S`` tokens.

        Rows may have different prefixes (or none): each row's prefix sits at the start of
        the key axis, padded to the longest, and the mask hides the padding, so one batch
        can mix suffixes of many system prompts. The keys and values are written once into
        buffers with room for the batch's own tokens (:func:`prefilled_cache`), instead of
        being concatenated in every layer of every forward pass. Packed batches get such
        buffers even without a prefix: their cache is where the keys are unpacked."""
        B = len(prefixes)
        offsets = [p.length if p is not None else 0 for p in prefixes]
        P = max(offsets)
        if P == 0 and not self.packed:
            return offsets, 0, None, None, None
        k_reg = torch.full((B, P), -1, dtype=torch.long)
        mask = torch.zeros(B, P, dtype=torch.long)
        for b, p in enumerate(prefixes):
            if p is not None:
                k_reg[b, : p.length] = torch.as_tensor(p.regions.astype(np.int64))
                mask[b, : p.length] = 1
        cache = prefilled_cache(self.model.config, [p.kv if p is not None else None for p in prefixes], offsets, S,
                                n_kv_heads=self._nkv, head_dim=self._hd, dtype=self._dtype,
                                layer_devices=self._layer_dev)
        return offsets, P, cache, k_reg, mask

    def _forward(self, ids_list, regions_list, prefixes: list[Prefix | None], keep_local, want_output: bool,
                 keep_cache: bool = False):
        """Run one padded batch; row b continues ``prefixes[b]`` (None: starts at position 0).

        Returns a :class:`Forward`: kept components, attention statistics, and with
        ``want_output`` the last position's residuals and final hidden state."""
        B = len(ids_list)
        lens = [len(x) for x in ids_list]
        S = max(lens)
        dev = self.device
        offsets, P, cache, pre_reg, pre_mask = self._context(prefixes, S)
        # pad[b]: padding slots before row b's tokens (left padding) -- 0 with right padding
        pad = [S - n if self.padding_side == "left" else 0 for n in lens]
        input_ids = torch.zeros(B, S, dtype=torch.long)
        q_reg = torch.full((B, S), -1, dtype=torch.long)
        for b, (ids, reg) in enumerate(zip(ids_list, regions_list)):
            input_ids[b, pad[b] : pad[b] + len(ids)] = torch.as_tensor(ids)
            q_reg[b, pad[b] : pad[b] + len(ids)] = torch.as_tensor(reg.astype(np.int64))
        real = q_reg >= 0  # (B, S)
        attn_mask = torch.cat([pre_mask, real.long()], dim=1) if P else real.long()  # (B, P+S)
        # explicit positions: row b's tokens sit at offsets[b]..offsets[b]+n-1 wherever padding puts them
        position_ids = (torch.as_tensor(offsets).unsqueeze(1) + torch.arange(S).unsqueeze(0)
                        - torch.as_tensor(pad).unsqueeze(1)).clamp(min=0)
        k_reg = torch.cat([pre_reg, q_reg], dim=1) if P else q_reg  # (B, P+S)
        last_q = torch.as_tensor([pad[b] + n - 1 for b, n in enumerate(lens)])
        keep_local = [k + pad[b] for b, k in enumerate(keep_local)]
        # key index of absolute position 0: the prefix's first key, or the row's first token
        sink_k = torch.as_tensor([0 if offsets[b] else P + pad[b] for b in range(B)])
        stats = AttnStats.allocate(q_reg.to(dev), k_reg.to(dev), position_ids.to(dev), last_q.to(dev),
                                   sink_k.to(dev), self.L, self.NH, R, self.full_layers, self._pattern_dtype)
        b_idx = torch.as_tensor(np.concatenate([np.full(len(k), b) for b, k in enumerate(keep_local)]),
                                dtype=torch.long)
        s_idx = torch.as_tensor(np.concatenate(keep_local), dtype=torch.long)
        packing = None
        if self.packed:
            # the real tokens as one sequence (1, N); slot[b, s]: packed index of padded slot (b, s)
            rows, slots = real.nonzero(as_tuple=True)  # (N,) each, row-major: row 0's tokens, then row 1's, ...
            slot = torch.full((B, S), -1, dtype=torch.long)
            slot[real] = torch.arange(len(rows))
            allowed = attn_mask.bool()[:, None, :] & (
                torch.arange(P + S)[None, None, :] <= P + torch.arange(S)[None, :, None])  # (B, S, P+S)
            mask = torch.zeros(B, 1, S, P + S, dtype=self._dtype).masked_fill(
                ~allowed[:, None], torch.finfo(self._dtype).min)
            packing = Packing(rows.to(dev), slots.to(dev), B, S, mask.to(dev))
            input_ids, position_ids = input_ids[real][None], position_ids[real][None]  # (1, N)
            b_idx, s_idx = torch.zeros_like(s_idx), slot[b_idx, s_idx]
            last_q_h = slot[torch.arange(B), last_q]  # where each row's last token is in the packed sequence
            fwd_mask, use_cache = None, True
        else:
            last_q_h = last_q
            fwd_mask, use_cache = attn_mask.to(dev), keep_cache or (cache is None and not want_output)
        positions = None
        if self._sliding:
            from transformers import DynamicCache

            if cache is None and use_cache:
                cache = DynamicCache()  # no config: whole-sequence layers, not sliding ones that drop keys
            k_pos = _key_positions(offsets, P, pad, lens, S)  # (B, P+S)
            positions = Positions(k_pos[:, P:].to(dev), k_pos.to(dev), self.windows)
        self._gather = (b_idx.to(dev), s_idx.to(dev))
        self._on_dev = {("gather_b", dev): self._gather[0], ("gather_s", dev): self._gather[1]}
        self._buf = {c: [None] * self.L for c in ("attn_out", "mlp_out", "resid_post")}
        self._buf["resid_pre"] = [None] * self._pre_layers
        self._last = last_q_h.to(dev) if want_output else None
        if want_output:
            self._on_dev[("last", dev)] = self._last
        self._last_resid = [None] * self.L
        set_stats(stats)
        set_packing(packing)
        set_positions(positions)
        try:
            with torch.inference_mode():
                out = self.base(input_ids=input_ids.to(dev), attention_mask=fwd_mask,
                                position_ids=position_ids.to(dev), cache=cache, use_cache=use_cache)
        finally:
            set_stats(None)
            set_packing(None)
            set_positions(None)
            self._gather = None
            self._last = None
            self._on_dev = {}
        comps = {}
        counts = [len(k) for k in keep_local]
        for c in self.components:
            stacked = torch.stack(self._buf[c], dim=1).cpu().numpy()  # (N_keep, L, H)
            comps[c] = np.split(stacked, np.cumsum(counts)[:-1])
        last_resid = torch.stack(self._last_resid, dim=1) if want_output else None  # (B, L, H)
        final_h = None
        if want_output:
            h = out.last_hidden_state  # (B, S, H), or (1, N, H) packed
            # the final norm's device: the last layer's, not the first's, on a split model
            final_h = h[torch.arange(h.shape[0], device=h.device), last_q_h.to(h.device)].float().to(dev)  # (B, H)
        new_cache = cache if cache is not None else out.get("cache", None)
        self._buf = {}
        return Forward(comps, stats, last_resid, final_h, new_cache, lens, attn_mask, pad, P)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return unembed(self.lm_head, self.softcap, h)

    @torch.inference_mode()
    def _output_stats(self, final_h, last_resid):
        nw = self.arch.final_norm.weight
        normed = self.arch.final_norm(last_resid.to(nw.device, nw.dtype)).float()  # (B, L, H)
        # the lens works where the unembedding is (split models: often not the final norm's device)
        normed = normed.to(self.lm_head.weight.device)
        return output_stats(self._logits(final_h), normed, self._unembed_into, self.top_k, self.lens_top_k,
                            self._lens_ws, full=self.full_logprobs)

    def _unembed_into(self, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return unembed(self.lm_head, self.softcap, h, out)

    # --- public -------------------------------------------------------------------------
    @torch.inference_mode()
    def compute_prefixes(self, specs: list[tuple[np.ndarray, np.ndarray, int]]) -> list[Prefix]:
        """Run shared prefixes once, in padded batches, and keep each one's cache and its own
        contributions. ``specs``: (token ids, region codes, first kept position) each."""
        out: list[Prefix | None] = [None] * len(specs)
        lengths = [len(ids) for ids, _, _ in specs]
        for batch in self.batches(lengths):
            ids_l = [specs[i][0] for i in batch]
            regs_l = [specs[i][1] for i in batch]
            keeps = [np.arange(min(specs[i][2], lengths[i]), lengths[i]) for i in batch]
            fw = self._forward(ids_l, regs_l, [None] * len(batch), keeps, want_output=False)
            comps, st, cache, lens, pad = fw.comps, fw.stats, fw.cache, fw.lens, fw.pad
            qc = st.q_onehot.sum(1).cpu().numpy()  # (B, R)
            sc = st.q_notfirst.sum(1).cpu().numpy()
            rm, en, sk = st.region_mass.cpu().numpy(), st.entropy.cpu().numpy(), st.sink.cpu().numpy()
            for b, i in enumerate(batch):
                n, o = lens[b], pad[b]
                kv = [(layer.keys[b : b + 1, :, o : o + n], layer.values[b : b + 1, :, o : o + n])
                      for layer in cache.layers]  # (1, NKV, P, D) views
                out[i] = Prefix(
                    length=n, ids=ids_l[b], regions=regs_l[b], kv=kv,
                    keep_from=int(keeps[b][0]) if len(keeps[b]) else n,
                    comps={c: v[b] for c, v in comps.items()},
                    region_mass=rm[b], entropy=en[b], sink=sk[b], q_counts=qc[b], sink_count=float(sc[b]),
                    patterns=(np.stack([st.patterns[la][b, :, o : o + n, o : o + n].numpy() for la in self.full_layers])
                              if self.full_layers else None),
                )
        return out

    @torch.inference_mode()
    def extract_batch(self, items: list[Item], prefix: Prefix | list[Prefix | None] | None = None,
                      max_new_tokens: int = 0, eos_ids: tuple[int, ...] = (),
                      defer_decode: bool = False) -> list[PromptResult]:
        """Run a batch of prompts, each continuing its shared prefix when given (one for
        all rows, or one per row), reduce them, and continue each greedily for
        ``max_new_tokens`` on the same key/value cache.

        With ``defer_decode`` the continuation waits for :meth:`flush_decode`, which
        decodes the pending batches of a whole block together: one decode step costs
        nearly the same for 64 rows as for 16 on a CPU."""
        prefixes = list(prefix) if isinstance(prefix, (list, tuple)) else [prefix] * len(items)
        offs = [p.length if p is not None else 0 for p in prefixes]
        seqs = [it.ids[o:] for it, o in zip(items, offs)]
        regs = [it.regions[o:] for it, o in zip(items, offs)]
        keep_local = [np.arange(max(it.keep_start, o), len(it.ids)) - o for it, o in zip(items, offs)]
        fw = self._forward(seqs, regs, prefixes, keep_local, True, keep_cache=max_new_tokens > 0)
        comps, st, final_h, cache = fw.comps, fw.stats, fw.final_h, fw.cache
        lens, pad, P = fw.lens, fw.pad, fw.prefix_len
        outs = self._output_stats(final_h, fw.last_resid)
        del fw
        gens = [None] * len(items)
        state = None
        if max_new_tokens > 0:
            state = Pending(own_keys(cache, P, pad, lens), lens, prefixes, final_h, [o + n for o, n in zip(offs, lens)])
            del cache  # the batch's padded cache: the rows' own keys are copied out
        if state is not None and not defer_decode:
            gens = greedy(self, [state], max_new_tokens, eos_ids)
        rm = st.region_mass.cpu().numpy()
        en = st.entropy.cpu().numpy()
        sk = st.sink.cpu().numpy()
        qc = st.q_onehot.sum(1).cpu().numpy()  # (B, R)
        sc = st.q_notfirst.sum(1).cpu().numpy()  # (B,)
        lr = st.last_row.cpu().numpy()  # (B, L, NH, P+S)
        results = []
        for b, it in enumerate(items):
            c_rm, c_en, c_sk, c_qc, c_sc = rm[b], en[b], sk[b], qc[b], sc[b]
            cps = {c: comps[c][b] for c in self.components}
            pre, o = prefixes[b], offs[b]
            if pre is not None:
                c_rm, c_en, c_sk = c_rm + pre.region_mass, c_en + pre.entropy, c_sk + pre.sink
                c_qc, c_sc = c_qc + pre.q_counts, c_sc + pre.sink_count
                if it.keep_start < o:
                    if it.keep_start < pre.keep_from:
                        raise ValueError(f"prompt {it.prompt} keeps position {it.keep_start}, but its prefix kept "
                                         f"only from {pre.keep_from}")
                    cps = {c: np.concatenate([pre.comps[c][it.keep_start - pre.keep_from :], v])
                           for c, v in cps.items()}
            with np.errstate(invalid="ignore", divide="ignore"):
                denom = np.where(c_qc > 0, c_qc, np.nan)
                region_mass = c_rm / denom[None, None, :, None]
                entropy = c_en / denom[None, None, :]
                sink = c_sk / (c_sc if c_sc > 0 else np.nan)
            row = lr[b]  # (L, NH, P+S): keys are the (padded) prefix, then this row's padded sequence
            keys = np.concatenate([row[..., :o], row[..., P + pad[b] : P + pad[b] + lens[b]]], axis=-1)
            pattern = None
            if self.full_layers:
                n, Lb = o + lens[b], lens[b]
                full = np.zeros((len(self.full_layers), self.NH, n, n),
                                torch.empty(0, dtype=self._pattern_dtype).numpy().dtype)  # (NFL, NH, q, k)
                if pre is not None:
                    full[:, :, :o, :o] = pre.patterns
                rows = np.stack([st.patterns[la][b].numpy() for la in self.full_layers])  # (NFL, NH, Sq, Sk)
                rows = rows[:, :, pad[b] : pad[b] + Lb]
                full[:, :, o:, :o] = rows[..., :o]
                full[:, :, o:, o:] = rows[..., P + pad[b] : P + pad[b] + Lb]
                pattern = np.ascontiguousarray(full.transpose(2, 3, 0, 1)).reshape(n * n, *full.shape[:2])
            results.append(PromptResult(
                comps=cps, region_mass=region_mass.astype(np.float32), entropy=entropy.astype(np.float32),
                sink=sink.astype(np.float32), last_row=np.ascontiguousarray(keys.transpose(2, 0, 1)),
                topk_ids=outs["topk_ids"][b], topk_logprobs=outs["topk_logprobs"][b],
                entropy_out=float(outs["entropy_out"][b]), lse=float(outs["lse"][b]),
                lens_ids=outs["lens_ids"][b], lens_logprobs=outs["lens_logprobs"][b],
                lens_entropy=outs["lens_entropy"][b], lens_final_top1=outs["lens_final_top1"][b],
                gen_ids=gens[b], pattern=pattern,
                logprobs=outs["logprobs"][b] if self.full_logprobs else None,
            ))
        if state is not None and defer_decode:
            self._pending.append((state, results))
        return results

    def batches(self, lengths: list[int], contexts: list[int] | None = None) -> list[list[int]]:
        """Indices of ``lengths`` in padded batches under the token budget and the memory
        caps (see :func:`promptshift.extract.batching.plan_batches`); ``contexts``: the
        length of the cached prefix each row continues."""
        return plan_batches(lengths, self.token_budget, contexts=contexts, bytes_per_qk=4 * self.NH,
                            qk_budget=_ATTN_BYTES_BUDGET, bytes_per_context=self._kv_bytes,
                            context_budget=_KV_BYTES_BUDGET, qk_weight=self._qk_weight,
                            slot_weight=_PACKED_SLOT_WEIGHT if self.packed else 1.0)

    @torch.inference_mode()
    def flush_decode(self, max_new_tokens: int, eos_ids: tuple[int, ...]) -> None:
        """Decode every deferred batch, all as one batch (:func:`promptshift.extract.decode.greedy`)."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        gens = greedy(self, [st for st, _ in pending], max_new_tokens, eos_ids)
        rows = [r for _, results in pending for r in results]
        for r, g in zip(rows, gens):
            r.gen_ids = g

    def greedy_token(self, h: torch.Tensor) -> torch.Tensor:
        """(B,) the greedy next token after (B, H) last hidden states (after the final
        norm): the argmax of the logits, the first of equal maxima, as ``generate`` takes it."""
        return self._logits(h).argmax(-1)


# Rows per chunk of the logit lens, as bytes of one (rows, vocab) float32 buffer. The lens
# works in two such buffers, kept by the caller between batches (``workspace``), so large
# chunks cost no page faults: on 2 CPU cores the (rows, 576) @ (576, 49,152) product ran at
# 118 GFLOP/s with 128 rows into fresh memory and 154 with 512 rows into a reused buffer
# (docs/BENCHMARKS.md, "Allocator, in-place logit lens, ..."); GPUs take bigger chunks.
_LENS_CHUNK_BYTES_CPU = 96 << 20
_LENS_CHUNK_BYTES_GPU = 1 << 30


@torch.inference_mode()
def output_stats(logits: torch.Tensor, normed_last: torch.Tensor, unembed_fn, top_k: int, lens_top_k: int,
                 workspace: dict | None = None, full: bool = False) -> dict:
    """Last-position outputs of a batch, as numpy: ``logits`` (B, V); ``normed_last``
    (B, L, H): every layer's last-position residual after the final norm; ``unembed_fn``:
    ``(rows (N, H), out (N, V) float32) -> out``, the logits written into ``out``. Top-k
    log-probs, entropy and log-sum-exp of the output, and the logit lens of every layer
    (top-k, entropy, log-prob of the final top-1), as one (rows, H) @ (H, V) product per
    chunk of rows, so the unembedding matrix is read once per chunk instead of once per
    layer. The lens is computed in place in two (chunk, V) buffers held in ``workspace``
    (a dict the caller keeps between calls; None: buffers for this call only). ``full``
    adds ``logprobs`` (B, V): the whole next-token log-softmax, float32."""
    logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    top = logp.topk(top_k, dim=-1)
    B, L, _ = normed_last.shape
    rows = normed_last.reshape(B * L, -1)  # (B*L, H)
    t1 = top.indices[:, 0].repeat_interleave(L)  # (B*L,)
    V = logits.shape[-1]
    n = rows.shape[0]
    chunk = min(n, max(8, (_LENS_CHUNK_BYTES_GPU if rows.is_cuda else _LENS_CHUNK_BYTES_CPU) // (4 * V)))
    ws = workspace if workspace is not None else {}
    if "x" not in ws or ws["x"].shape[0] < chunk or ws["x"].shape[1] != V or ws["x"].device != rows.device:
        ws["x"] = ws["e"] = None  # free the old pair before allocating the new one
        ws["x"], ws["e"] = (torch.empty(chunk, V, dtype=torch.float32, device=rows.device) for _ in range(2))
    ids_c, lp_c, ent_c, t1_c = [], [], [], []
    for i in range(0, n, chunk):
        m = min(chunk, n - i)
        x, e = ws["x"][:m], ws["e"][:m]
        unembed_fn(rows[i : i + m], x)  # logits
        x.sub_(x.amax(-1, keepdim=True))
        torch.exp(x, out=e)
        z = e.sum(-1, keepdim=True)
        x.sub_(z.log())  # log-probabilities, as log_softmax computes them
        e.div_(z)  # probabilities
        t = x.topk(lens_top_k, dim=-1)
        ids_c.append(t.indices)
        lp_c.append(t.values)
        ent_c.append(-torch.bmm(e.unsqueeze(1), x.unsqueeze(2)).view(m))
        t1_c.append(x.gather(1, t1[i : i + m, None])[:, 0])
    np_ = lambda t: t.cpu().numpy()  # noqa: E731
    extra = {"logprobs": np_(logp)} if full else {}
    return dict(**extra,
        topk_ids=np_(top.indices).astype(np.int32), topk_logprobs=np_(top.values),
        entropy_out=np_(-(logp.exp() * logp).sum(-1)), lse=np_(torch.logsumexp(logits, dim=-1)),
        lens_ids=np_(torch.cat(ids_c).view(B, L, -1)).astype(np.int32),
        lens_logprobs=np_(torch.cat(lp_c).view(B, L, -1)),
        lens_entropy=np_(torch.cat(ent_c).view(B, L)), lens_final_top1=np_(torch.cat(t1_c).view(B, L)),
    )


def unembed(lm_head, softcap: float | None, h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """float32 logits of (…, H) hidden states already after the final norm; written into
    ``out`` (float32, on the weights' device) when given."""
    w = lm_head.weight
    h = h.to(w.device, w.dtype)
    if out is not None and w.dtype == torch.float32 and h.dim() == 2:
        logits = torch.mm(h, w.T, out=out)
    else:
        logits = (h @ w.T).float()
        if out is not None:
            logits = out.copy_(logits)
    if getattr(lm_head, "bias", None) is not None:
        logits.add_(lm_head.bias.float())
    if softcap:
        logits.div_(softcap).tanh_().mul_(softcap)
    return logits


def _key_positions(offsets, P: int, pad, lens, S: int) -> torch.Tensor:
    """(B, P + S) absolute position of every key slot of a batch's layout: row b's prefix
    (``offsets[b]`` tokens) at slots 0.., its own ``lens[b]`` tokens at slots P + pad[b]..;
    -1 for padding."""
    B = len(lens)
    out = torch.full((B, P + S), -1, dtype=torch.long)
    for b in range(B):
        out[b, : offsets[b]] = torch.arange(offsets[b])
        out[b, P + pad[b] : P + pad[b] + lens[b]] = offsets[b] + torch.arange(lens[b])
    return out


def nonfinite_error(what: str, model) -> ExtractError:
    """The error for NaN or inf activations, with the cause where one can be named: weights
    that are themselves non-finite, or a half-precision computation that overflowed (the
    fix: compute in float32)."""
    bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    if bad:
        cause = (f"the model's weights hold NaN or inf ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}): "
                 "the checkpoint is damaged; computing in float32 cannot help")
    elif dtype == "float16":
        cause = "its float16 computation overflowed (float16 ends at 65504): compute in float32 (`--dtype float32`)"
    elif dtype != "float32":
        cause = f"its {dtype} computation produced them: compute in float32 (`--dtype float32`)"
    else:
        cause = "computing in float32 already, with finite weights: check the model's inputs and configuration"
    return ExtractError(f"{what} contains NaN or inf: the model produced non-finite activations; {cause}")


def check_finite(name: str, a: np.ndarray, model) -> None:
    """Raise :func:`nonfinite_error` if ``a`` holds NaN or inf."""
    if a.size and not np.isfinite(a).all():
        raise nonfinite_error(name, model)


def check_fp16(name: str, a: np.ndarray, model=None) -> None:
    m = float(np.abs(a).max()) if a.size else 0.0
    if not math.isfinite(m):
        if model is not None:
            raise nonfinite_error(name, model)
        raise ExtractError(f"{name} contains NaN or inf; the model produced non-finite activations")
    if m > 65504.0:
        raise ExtractError(
            f"{name} has values up to {m:.3g}, beyond float16's range (65504); set `storage_dtype: float32` in the "
            "sweep (or --storage-dtype float32)"
        )


def run_with_oom_retry(fn, batch: list) -> list:
    """Call ``fn(batch)``; on CUDA out-of-memory, halve the batch and retry each half.

    Halved batches give the same values up to float rounding (batch shape changes the
    kernels), which the batched-vs-alone tolerance covers."""
    try:
        return fn(batch)
    except torch.OutOfMemoryError:
        if len(batch) == 1:
            raise ExtractError("CUDA out of memory on a single prompt; lower token_budget or use a bigger GPU")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = len(batch) // 2
        return run_with_oom_retry(fn, batch[:half]) + run_with_oom_retry(fn, batch[half:])


__all__ = ["Engine", "Item", "Prefix", "PromptResult", "check_finite", "check_fp16", "nonfinite_error", "output_stats",
           "run_with_oom_retry", "unembed"]
