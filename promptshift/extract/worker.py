"""`promptshift extract`: plan -> store -> fill this worker's blocks.

Each block is computed whole, handed to a writer thread through a bounded queue (so the
model never waits on the disk), written, and only then marked done. A killed worker
loses at most the blocks in flight; rerunning the same command skips finished blocks
and recomputes the rest, producing the same bytes.

Size: the stage (configuration, provenance, the block loop, its writer thread and the
resume logic) in one place; the forward passes are in :mod:`promptshift.extract.engine`.
"""

from __future__ import annotations

import platform
import queue
import sys
import threading
import time
from dataclasses import dataclass
from importlib import metadata

import numpy as np

from promptshift.errors import StoreError
from promptshift.models import eos_ids
from promptshift.progress import progress
from promptshift.scale.signals import StopSignals, slurm_requeue
from promptshift.store.core import Store, check_layout, empty_block, resid_pre_derived, stored_name
from promptshift.sweep.config import SweepConfig, load_sweep
from promptshift.sweep.plan import Plan, build_plan, load_plan_inputs, parse_shard


@dataclass
class ExtractConfig:
    """Options of one extraction worker (the sweep decides what is extracted)."""

    store: str | None
    shard: str | None = None
    format: str = "zarr"
    overwrite: bool = False
    device: str | None = None
    dtype: str | None = None
    prefix_sharing: bool = True
    packing: bool = True  # packed batches where the model allows (False: padded, for comparison)
    min_shared: int = 2  # share a prefix among at least this many prompts of a block
    selfcheck: bool = True
    progress: bool = True
    allow_pickle: bool = False
    queue_blocks: int = 2
    padding_side: str = "right"
    init_only: bool = False  # create the store from the plan and stop (the SLURM "plan" step)
    requeue: bool = True  # on SIGTERM/SIGUSR1 under SLURM, requeue this task after the current block

    def __post_init__(self):
        self.shard_index, self.n_shards = parse_shard(self.shard)
        if self.format not in ("zarr", "hdf5", "null"):
            raise StoreError(f"--format must be zarr or hdf5, got {self.format!r}")
        if self.format == "hdf5" and self.n_shards > 1:
            raise StoreError("HDF5 stores take one writer; use --format zarr for --shard, then export to HDF5")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("promptshift", "torch", "transformers", "zarr", "numpy", "h5py", "tokenizers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def provenance(model, tok, sweep: SweepConfig, plan: Plan) -> dict:
    from promptshift.models import chat_template_hash, weights_hash

    src = getattr(model, "promptshift_source", None)
    loc = getattr(model, "promptshift_location", None)
    return {
        "model_id": src.model_id if src else getattr(model.config, "_name_or_path", "") or "in-memory model",
        "model_source": src.kind if src else "object",
        "model_location": src.location if src else None,
        "weights_sha256": weights_hash(loc) if loc else _state_hash(model),
        "model_type": model.config.model_type,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "storage_dtype": sweep.storage_dtype,
        "device": str(next(model.parameters()).device),
        "attn_implementation": "promptshift (probabilities reduced in-layer; SDPA for generation)",
        "chat_template_sha256": chat_template_hash(tok),
        "baseline": sweep.baseline,
        "injected_system": plan.meta.get("injected_system"),
        "baseline_carries_default": plan.meta.get("baseline_carries_default"),
        "eos_token_ids": list(eos_ids(model, tok)),  # a continuation ending in one of these is finished
        "versions": versions(),
        "sweep": sweep.to_dict(),
    }


def _state_hash(model) -> str:
    """Hash of an in-memory model's parameters (tests and notebooks pass models directly)."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


class _Writer(threading.Thread):
    """Writes finished blocks in order; errors surface in the main thread."""

    def __init__(self, store: Store, maxsize: int):
        super().__init__(daemon=True)
        self.store, self.q, self.error = store, queue.Queue(maxsize=maxsize), None

    def run(self):
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error is None:
                try:
                    self.store.write_block(*item)
                except OSError as e:  # disk full, permissions, lost mount: the block stays not-done
                    self.error = StoreError(
                        f"writing block {item[0]} to {self.store.path} failed ({e.strerror or e}); the block is not "
                        "marked done: fix the cause and rerun the same command to resume"
                    )
                    self.error.__cause__ = e
                except BaseException as e:  # reported by put()/close()
                    self.error = e

    def put(self, item):
        if self.error:
            raise self.error
        self.q.put(item)

    def close(self):
        self.q.put(None)
        self.join()
        if self.error:
            raise self.error


class BlockExtractor:
    """Computes the arrays of one block of the plan with an Engine."""

    def __init__(self, engine, plan: Plan, tok, *, prefix_sharing: bool = True, selfcheck: bool = True,
                 min_shared: int = 2):
        self.engine, self.plan, self.tok = engine, plan, tok
        self.prefix_sharing, self.selfcheck = prefix_sharing, selfcheck
        # A prefix shared by at least ``min_shared`` prompts of a block is run once; its
        # prompts then run only their own tokens, batched with any other prompts.
        self.min_shared = max(2, int(min_shared))
        self.sweep = plan.sweep
        self.sdtype = np.float16 if self.sweep.storage_dtype == "float16" else np.float32
        self.tokens_done = 0  # prompt tokens actually run through the model (shared prefixes once)
        self.attn_qk = 0  # query-key pairs scored by attention, for FLOP counts
        self.eos = eos_ids(engine.model, tok)

    def _item(self, p: int):
        from promptshift.extract.engine import Item

        r = self.plan.prompts.iloc[p]
        return Item(p, self.plan.prompt_tokens(p).astype(np.int64), self.plan.prompt_regions(p), int(r.keep_start))

    def compute(self, block: int) -> tuple[dict[str, np.ndarray], dict[int, object], float]:
        eng = self.engine
        b = self.plan.blocks.iloc[block]
        prompts = list(range(int(b.prompt_start), int(b.prompt_end)))
        items = {p: self._item(p) for p in prompts}
        results: dict[int, object] = {}

        groups: dict[tuple, list[int]] = {}
        singles: list[int] = []
        if self.prefix_sharing:
            for p in prompts:
                plen = int(self.plan.prompts.at[p, "prefix_len"])
                groups.setdefault(tuple(items[p].ids[:plen].tolist()), []).append(p)
            for key, members in list(groups.items()):
                if len(members) < self.min_shared or len(key) == 0:
                    singles += members
                    del groups[key]
        else:
            singles = prompts

        keys = list(groups)
        prefixes = eng.compute_prefixes([(items[groups[k][0]].ids[: len(k)], items[groups[k][0]].regions[: len(k)],
                                          min(items[p].keep_start for p in groups[k])) for k in keys]) if keys else []
        of = {p: pre for k, pre in zip(keys, prefixes) for p in groups[k]}
        for pre in prefixes:
            self.tokens_done += pre.length
            self.attn_qk += pre.length * (pre.length + 1) // 2
        # one pass over the block: rows of different prefixes (and rows without one) share
        # batches, each attending to its own prefix's cached keys
        rows = [p for k in keys for p in groups[k]] + singles
        pres = [of.get(p) for p in rows]
        ctx = [pre.length if pre is not None else 0 for pre in pres]
        lengths = [len(items[p].ids) - c for p, c in zip(rows, ctx)]
        for batch in eng.batches(lengths, contexts=ctx):
            results.update(self._run([rows[i] for i in batch], items, [pres[i] for i in batch]))
        self.tokens_done += sum(lengths)
        self.attn_qk += sum(n * c + n * (n + 1) // 2 for n, c in zip(lengths, ctx))

        self.engine.flush_decode(self.sweep.gen_tokens, self.eos)
        check = float("nan")
        if self.selfcheck:
            check = self._selfcheck(block, prompts, items, results)

        return self._assemble(block, prompts, results), results, check

    def _run(self, ps: list[int], items, prefixes: list) -> dict[int, object]:
        from promptshift.extract.engine import run_with_oom_retry

        pre = dict(zip(ps, prefixes))

        def fn(sub):  # an out-of-memory retry runs halves of the batch, each row with its prefix
            return self.engine.extract_batch([items[p] for p in sub], [pre[p] for p in sub], self.sweep.gen_tokens,
                                             self.eos, defer_decode=True)

        return dict(zip(ps, run_with_oom_retry(fn, ps)))

    def _selfcheck(self, block, prompts, items, results) -> float:
        """Re-run one prompt alone (no batching, no shared prefix) and compare."""
        p = prompts[(block * 7919) % len(prompts)]
        alone = self.engine.extract_batch([items[p]])[0]
        return max_rel_diff(alone, results[p])

    def _assemble(self, block, prompts, results) -> dict[str, np.ndarray]:
        import torch

        from promptshift.extract.engine import check_finite, check_fp16

        plan, s = self.plan, self.sweep
        b = plan.blocks.iloc[block]
        data = empty_block(plan, block)
        gens = s.gen_tokens > 0
        # activations are cast by torch (numpy's float16 conversion is ~8x slower), then
        # checked once per block; only a failing block is searched for the prompt to name
        dst = {}
        for c in s.components:  # a derived resid_pre is stored at layer 0 only: (tokens, 1, hidden)
            a = data[stored_name(plan, c)]
            dst[c] = torch.from_numpy(a if a.ndim == 3 else a[:, None, :])
        for j, p in enumerate(prompts):
            r, row = results[p], plan.prompts.iloc[p]
            k0 = int(row.kept_start - b.kept_start)
            for c in s.components:
                v = r.comps[c][:, : dst[c].shape[1]]  # an engine that captured every layer: keep what is stored
                dst[c][k0 : k0 + len(v)].copy_(torch.from_numpy(v))
            data["attn_region_mass"][j] = r.region_mass
            data["attn_entropy"][j] = r.entropy
            data["attn_sink"][j] = r.sink
            y0 = int(row.key_start - b.key_start)
            data["attn_last"][y0 : y0 + len(r.last_row)] = r.last_row
            data["logits_topk_ids"][j] = r.topk_ids
            data["logits_topk_logprobs"][j] = r.topk_logprobs
            data["logits_entropy"][j] = r.entropy_out
            data["logits_lse"][j] = r.lse
            if s.full_logprobs:
                data["logits_logprobs"][j] = r.logprobs
            data["lens_topk_ids"][j] = r.lens_ids
            data["lens_topk_logprobs"][j] = r.lens_logprobs
            data["lens_entropy"][j] = r.lens_entropy
            data["lens_final_top1_logprob"][j] = r.lens_final_top1
            if s.full_attention_layers:
                q0 = int(row.pattern_start - b.pattern_start)
                data["attn_pattern"][q0 : q0 + len(r.pattern)] = r.pattern
            if gens:
                g = r.gen_ids
                data["gen_ids"][j, : len(g)] = g
                data["gen_len"][j] = len(g)
                data["gen_text"][j] = self.tok.decode(g.tolist(), skip_special_tokens=True)
        # NaN, inf, or beyond float16's range: float16 values are at most 65504 (float32's
        # 3.4e38), so their float32 (float64) sum is finite unless one of them is not (one
        # pass, ~7x faster than isfinite().all()); only a failing block is searched for the
        # prompt to name. The output side too (lse: NaN or inf if any logit is), so that
        # non-finite values are refused whatever components are kept.
        f16, model = self.sdtype == np.float16, self.engine.model

        def what(p: int, name: str) -> str:
            row = plan.prompts.iloc[p]
            return f"{name} of prompt {p} ({row.system}, {row.user_id})"

        for c in s.components:
            if not bool(torch.isfinite(dst[c].sum(dtype=torch.float32 if f16 else torch.float64))):
                for p in prompts:
                    if f16:
                        check_fp16(what(p, c), results[p].comps[c], model)
                    else:
                        check_finite(what(p, c), results[p].comps[c], model)
        if not np.isfinite(data["logits_lse"]).all():
            for p in prompts:
                check_finite(what(p, "the logits"), np.asarray([results[p].lse]), model)
        return data


def max_rel_diff(a, b) -> float:
    """Largest |a - b| / max|b| over the components, attention mass and top-k log-probs of
    two Results: scale-free, so massive activations do not hide small relative errors."""
    pairs = [(a.comps[c], b.comps[c]) for c in a.comps]
    pairs += [(a.region_mass, b.region_mass), (a.topk_logprobs, b.topk_logprobs)]
    out = 0.0
    for x, y in pairs:
        if y.size and np.isfinite(y).any():  # all-NaN arrays are caught by the float16/NaN check instead
            scale = max(float(np.nanmax(np.abs(y))), 1e-12)
            out = max(out, float(np.nanmax(np.abs(x - y))) / scale)
    return out


def fill_shard(sweep: str | SweepConfig | None, cfg: ExtractConfig, *, model=None, tok=None) -> Store:
    """Fill this worker's shard of the store (``cfg.shard``, default all of it): plan (the
    first worker only; later ones follow the stored plan), create the store, and compute,
    write and mark done each block still missing. ``model``/``tok``: an already loaded HF
    model and tokenizer (default: load the sweep's). Returns the :class:`Store`, with
    ``run_stats`` (tokens, blocks, seconds, decode work, the signal that stopped it).
    Errors: SweepError / TemplateError (the sweep), StoreError (a store holding another
    plan without ``overwrite``), ExtractError (a model the hooks cannot read, non-finite
    activations). ``promptshift.extract(...)`` and ``promptshift extract`` call this."""
    from promptshift.extract.engine import Engine
    from promptshift.models import load_model

    if not isinstance(sweep, SweepConfig):
        sweep = load_sweep(sweep)
    if tok is None:
        tok, dims = load_plan_inputs(sweep)
    else:
        from promptshift.sweep.plan import ModelDims

        dims = ModelDims.from_config(model.config)
    plan = build_plan(sweep, tok, dims, clock=stored_clock(cfg.store, cfg.format, cfg.overwrite))
    if model is None:
        model = load_model(sweep.model, device=cfg.device, dtype=cfg.dtype, trust_remote_code=sweep.trust_remote_code,
                           allow_pickle=cfg.allow_pickle)
    check_layout(plan)  # e.g. full_attention_layers in range, before the model runs
    derived = resid_pre_derived(plan)
    engine = Engine(model, components=sweep.components, top_k=sweep.top_k, lens_top_k=sweep.lens_top_k,
                    token_budget=sweep.token_budget, padding_side=cfg.padding_side,
                    full_attention_layers=sweep.full_attention_layers, resid_pre_layers=1 if derived else None,
                    packed=None if cfg.packing else False, pattern_dtype=sweep.storage_dtype,
                    full_logprobs=sweep.full_logprobs)
    try:
        # before anything is written: non-finite activations first, then (the store will keep
        # resid_pre at layer 0 only) the residual chain
        engine.preflight(chain=derived)
        try:
            store = Store.create(cfg.store, plan, provenance(model, tok, sweep, plan), cfg.format, cfg.overwrite)
        except StoreError:
            # another worker created the store first, with its own reading of a clock the
            # template uses: follow that worker's plan (any other difference is reported)
            clock = stored_clock(cfg.store, cfg.format, cfg.overwrite)
            if clock is None or clock == plan.template_clock():
                raise
            plan = build_plan(sweep, tok, dims, clock=clock)
            store = Store.create(cfg.store, plan, provenance(model, tok, sweep, plan), cfg.format, cfg.overwrite)
    except BaseException:
        engine.remove_hooks()
        raise
    if cfg.init_only:
        engine.remove_hooks()
        store.run_stats = {"tokens": 0, "attn_qk": 0, "blocks": 0, "seconds": 0.0, "stopped_by": None}
        return store
    plan = store.plan  # the persisted plan is the one every worker follows
    blocks = plan.shard_blocks(cfg.shard_index, cfg.n_shards)
    done = store.done()
    todo = [b for b in blocks if not done[b]]
    runner = BlockExtractor(engine, plan, tok, prefix_sharing=cfg.prefix_sharing, selfcheck=cfg.selfcheck,
                         min_shared=cfg.min_shared)
    n_prompts = int(sum(plan.blocks.iloc[b].prompt_end - plan.blocks.iloc[b].prompt_start for b in todo))
    writer = _Writer(store, cfg.queue_blocks)
    writer.start()
    bar = progress(n_prompts, f"extract {cfg.shard_index}/{cfg.n_shards}", unit="prompt", enabled=cfg.progress)
    t0 = time.perf_counter()
    stop = StopSignals()
    try:
        for b in todo:
            if stop.signal is not None:
                break
            data, _, check = runner.compute(b)
            writer.put((b, data, check))
            blk = plan.blocks.iloc[b]
            bar.update(int(blk.prompt_end - blk.prompt_start))
            el = time.perf_counter() - t0
            bar.set_postfix(tok_s=f"{runner.tokens_done / max(el, 1e-9):.0f}", block=f"{b}")
    finally:
        stop.restore()
        bar.close()
        writer.close()
        engine.remove_hooks()
    if hasattr(store.backend, "flush"):
        store.backend.flush()
    store.run_stats = {"tokens": runner.tokens_done, "attn_qk": runner.attn_qk, "blocks": len(todo),
                       "seconds": time.perf_counter() - t0, "stopped_by": stop.signal,
                       "decode_rows": engine.decode_rows, "decode_keys": engine.decode_keys,
                       "decode_seconds": engine.decode_seconds}
    if stop.signal is not None:
        print(f"promptshift: stopped by signal {stop.signal} after finishing the current block; "
              "rerun the same command to resume", file=sys.stderr, flush=True)
        if cfg.requeue:
            slurm_requeue()
    return store


def stored_clock(path, fmt: str = "zarr", overwrite: bool = False):
    """The template clock of the plan a store at ``path`` already holds (a resume, a task
    started after the plan step, possibly the next day), or None: rendering a template that
    reads the clock (Llama 3.2's "Today Date") at that time gives the plan the store holds."""
    from pathlib import Path

    from promptshift.store.core import open_store

    if path is None or overwrite or fmt == "null" or not Path(path).exists():
        return None
    try:
        return open_store(path).plan.template_clock()
    except (StoreError, OSError, ValueError, KeyError):  # Store.create reports what is wrong with it
        return None


def run_prompt_alone(engine, plan: Plan, p: int):
    """One prompt, unbatched and without prefix sharing: the reference for tests."""
    from promptshift.extract.engine import Item

    r = plan.prompts.iloc[p]
    item = Item(p, plan.prompt_tokens(p).astype(np.int64), plan.prompt_regions(p), int(r.keep_start))
    return engine.extract_batch([item])[0]


__all__ = ["BlockExtractor", "ExtractConfig", "fill_shard", "provenance", "run_prompt_alone"]
