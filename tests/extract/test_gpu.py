"""GPU checks (marker ``gpu``): low-precision compute against float32, float16 storage
overflow, CUDA out-of-memory halving, packed vs padded batches, one process per device,
and models split over devices, on random-weight models with real shapes
(scripts/gpu_models.py) and the embedded SmolLM2.

On a machine with CUDA they run on the GPU at full size (``scripts/gpu_check.sh`` runs
them, with the benchmarks, in a few minutes). Without CUDA they are skipped, except under
``PROMPTSHIFT_GPU_CHECK=dry`` (``scripts/gpu_check.sh --dry-run``, itself run by
tests/scale/test_gpu_check.py), where the same tests run on the CPU with tiny models of
the same families, so that their code paths cannot rot.

Tolerances (``tolerance`` below) come from the compute dtype's unit roundoff, not from a
measured run.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from promptshift.errors import ExtractError
from promptshift.extract.worker import ExtractConfig, fill_shard
from promptshift.sweep.config import load_sweep
from tests.conftest import REPO, write_sweep
from tests.tolerance import U32, layer_terms

DRY = os.environ.get("PROMPTSHIFT_GPU_CHECK") == "dry"
CUDA = torch.cuda.is_available() and not DRY
DEVICE = "cuda:0" if CUDA else "cpu"
N_GPUS = torch.cuda.device_count() if CUDA else 0

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (CUDA or DRY), reason="needs a CUDA device (`scripts/gpu_check.sh --dry-run` runs these "
                       "tests on the CPU with tiny models)"),
]

SHAPES = ("llama-3.2-1b", "gemma-3-1b", "smollm2-135m")
# the compute dtype of the checks that are not about the dtype: bfloat16 on a GPU; on the
# CPU of a dry run float32 (bfloat16 matmuls are slow on CPUs; the code path is the same)
WORK_DTYPE = "float32" if DRY else "bfloat16"
COMPONENTS = ("resid_pre", "attn_out", "mlp_out", "resid_post")

# --- tolerances -----------------------------------------------------------------------------
# Unit roundoff u of each compute dtype (half the distance from 1 to the next number).
UNIT_ROUNDOFF = {torch.float32: U32, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
# Points per decoder layer where an activation is rounded to the compute dtype on its way from
# the layer's input to its output: input norm (2), q/k/v projections (3), rotary embedding
# (1), attention scores and probabilities (2), attention output and o_proj (2), residual add
# (1), second norm (2), gate/up (2), activation and product (2), down projection (1),
# residual add (1); Gemma's extra norms fit within the count's rounding-up.
ROUNDINGS_PER_LAYER = 20


def tolerance(dtype: torch.dtype, depth: int, cfg, n_keys: int) -> float:
    """Norm-wise relative error ``||x - x_ref|| / ||x_ref||`` allowed between ``dtype``
    compute and exact arithmetic for an activation ``depth`` layers deep.

    Per layer, ROUNDINGS_PER_LAYER roundings to the dtype (unit roundoff u) and the float32
    accumulation of the layer's sums (``layer_terms`` of tests/tolerance.py, unit roundoff
    U32; matmuls in bf16/fp16 accumulate in float32). As there (``forward_bound``,
    ``statistical``), rounding errors of random sign add like a random walk, standard
    deviation ``sqrt(n / 3) u`` for n errors uniform in [-u, u] (Higham, *Accuracy and
    Stability of Numerical Algorithms*, 2002, section 2.8), and the bound is 10 standard
    deviations. Two runs that each satisfy it differ by at most twice it."""
    var = depth * (ROUNDINGS_PER_LAYER * UNIT_ROUNDOFF[dtype] ** 2 + layer_terms(cfg, n_keys) * U32**2)
    return 10.0 * math.sqrt(var / 3.0)


def layer_errors(a, b, name: str, real: np.ndarray) -> np.ndarray:
    """(L,) norm-wise relative error of component ``name`` per layer over the real tokens."""
    x = np.asarray(a.array(name)[...], np.float64)[real]
    y = np.asarray(b.array(name)[...], np.float64)[real]
    return np.linalg.norm(x - y, axis=(0, 2)) / np.linalg.norm(y, axis=(0, 2))


def assert_components_close(a, b, dtype, cfg, factor: float = 1.0, label: str = "") -> dict:
    """Every component at every layer within ``factor`` x :func:`tolerance`; returns the
    worst error and its bound per component (printed into the check's log)."""
    real = np.asarray(a.array("token_prompt")[...]) >= 0
    max_len = int(a.plan.prompts.n_tokens.max())
    out = {}
    for c in COMPONENTS:
        e = layer_errors(a, b, c, real)
        bound = np.array([factor * tolerance(dtype, la + 1, cfg, max_len) for la in range(len(e))])
        assert np.isfinite(e).all() and (e <= bound).all(), (
            f"{label} {c}: relative error {e.max():.3g} at layer {int(np.argmax(e / bound))} exceeds "
            f"{bound[int(np.argmax(e / bound))]:.3g}")
        out[c] = (float(e.max()), float(bound.max()))
    print(f"{label}: " + ", ".join(f"{c} {v[0]:.2e} (bound {v[1]:.2e})" for c, v in out.items()))
    return out


# --- models and sweeps ----------------------------------------------------------------------
@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, str]:
    """Shape name -> model spec. ``PROMPTSHIFT_GPU_CHECK_MODELS``: a directory with a
    ``models.json`` of them (written by scripts/gpu_check.py); otherwise built here."""
    given = os.environ.get("PROMPTSHIFT_GPU_CHECK_MODELS")
    if given:
        return json.loads((Path(given) / "models.json").read_text())
    sys.path.insert(0, str(REPO / "scripts"))
    from gpu_models import CHECK_WINDOWS, build

    from promptshift.models import load_tokenizer

    tok = load_tokenizer()
    d = tmp_path_factory.mktemp("gpu_models")
    out = {name: str(build(name, d / name, tokenizer=tok, tiny=DRY, device=DEVICE,
                           sliding_window=CHECK_WINDOWS.get(name)))
           for name in SHAPES if name != "smollm2-135m" or DRY}
    if not DRY:
        out["smollm2-135m"] = "embedded"
    return out


@pytest.fixture(scope="session")
def sweep_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gpu_sweeps")


def sweep_for(spec: str, sweep_dir: Path, **settings) -> Path:
    """The test sweep on model ``spec``: 3 system x 3 user prompts (12 prompts, 2 blocks) on
    a GPU, 2 x 2 (6 prompts, 2 blocks) on a dry run; every position kept, float32 storage
    unless set. Its longest system prompt is the one Gemma's shortened window is sized for."""
    kw = dict(keep="all", storage_dtype="float32", max_new_tokens=4, block_prompts=3 if DRY else 6, top_k=16,
              lens_top_k=4)
    kw.update(settings)
    name = "s" + hashlib.sha1(repr((spec, sorted(kw.items()))).encode()).hexdigest()[:12] + ".yaml"
    path = write_sweep(sweep_dir / name, model=None if spec == "embedded" else spec, **kw)
    if DRY:  # the first two system prompts (brief, pirate) and user prompts of the same sweep
        import yaml

        d = yaml.safe_load(path.read_text())
        d["system_prompts"], d["user_prompts"] = d["system_prompts"][:2], d["user_prompts"][:2]
        path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def load(spec: str, dtype: str, device: str = DEVICE):
    from promptshift.models import load_model

    return load_model(None if spec == "embedded" else spec, device=device, dtype=dtype)


def run(model, sweep: Path, **cfg):
    from promptshift.models import load_tokenizer

    spec = load_sweep(sweep).model
    return fill_shard(load_sweep(sweep), ExtractConfig(store=cfg.pop("store", None), progress=False, **cfg),
                      model=model, tok=load_tokenizer(spec))


# --- the checks ------------------------------------------------------------------------------
# every shape in both dtypes on a GPU; on a dry run each shape once and each dtype at least once
DTYPE_CASES = ([(s, d) for s in SHAPES for d in ("bfloat16", "float16")] if not DRY else
               [("llama-3.2-1b", "bfloat16"), ("gemma-3-1b", "float16"), ("smollm2-135m", "bfloat16")])


@pytest.mark.parametrize("shape,dtype", DTYPE_CASES)
def test_low_precision_matches_float32(shape, dtype, models, sweep_dir):
    """bf16/fp16 compute against the same weights in float32, through promptshift, and
    the layer inputs and final log-probs against Hugging Face's own float32 forward pass."""
    low = load(models[shape], dtype)
    ref = copy.deepcopy(low).float()  # the same (rounded) weights: only the arithmetic differs
    sw = sweep_for(models[shape], sweep_dir)
    a, b = run(low, sw), run(ref, sw)
    dt, cfg = getattr(torch, dtype), low.config.get_text_config()
    assert_components_close(a, b, dt, cfg, label=f"{shape} {dtype} vs float32")
    assert (np.asarray(a.array("gen_len")[...]) > 0).all()
    # independent reference: the model's own float32 forward, one prompt at a time
    ref.config._attn_implementation = "sdpa"
    for m in ref.modules():
        if hasattr(getattr(m, "config", None), "_attn_implementation"):
            m.config._attn_implementation = "sdpa"
    max_len = int(a.plan.prompts.n_tokens.max())
    L = cfg.num_hidden_layers
    for p in (int(a.plan.pairs.iloc[0].variant), len(a.plan.prompts) - 1):
        ids = torch.as_tensor(a.plan.prompt_tokens(p), dtype=torch.long, device=ref.device)[None]
        with torch.no_grad():
            o = ref(ids, output_hidden_states=True)
        got = a.component("resid_pre", p)  # (n, L, H): keep=all, so every position
        for la in range(L):
            want = o.hidden_states[la][0].float().cpu().numpy()
            e = np.linalg.norm(got[:, la] - want) / np.linalg.norm(want)
            assert e <= tolerance(dt, la + 1, cfg, max_len), (shape, dtype, p, la, e)
        # top-k log-probs: the k-th largest value moves by at most the largest change of any
        # entry, and a log-prob by at most twice the largest logit change; a logit (a dot
        # product with the final hidden state) changes by about the hidden state's relative
        # error times the logits' RMS, and the largest of V such changes by sqrt(2 ln V) times that
        logits = o.logits[0, -1].float()
        want_lp = torch.log_softmax(logits, -1).topk(16).values.cpu().numpy()
        got_lp = np.asarray(a.array("logits_topk_logprobs")[p])
        V = logits.numel()
        bound = (2 * math.sqrt(2 * math.log(V)) * tolerance(dt, L + 1, cfg, max_len)
                 * float(logits.pow(2).mean().sqrt()))
        assert np.abs(got_lp - want_lp).max() <= bound, (shape, dtype, p, np.abs(got_lp - want_lp).max(), bound)


def test_float16_storage_overflow_is_a_clear_error(models, sweep_dir):
    """bf16 compute holds activations beyond 65504; storing them as float16 stops with the
    fix named, float32 storage keeps them. fp16 compute overflows inside the model: the
    non-finite values are refused, not stored (checked with the sub-layer outputs kept, so
    that the run reaches the storage check)."""
    from promptshift.extract.arch import resolve_arch

    sw16 = sweep_for(models["llama-3.2-1b"], sweep_dir, storage_dtype="float16", max_new_tokens=0)
    sw32 = sweep_for(models["llama-3.2-1b"], sweep_dir, storage_dtype="float32", max_new_tokens=0)
    sw16_sub = sweep_for(models["llama-3.2-1b"], sweep_dir, storage_dtype="float16", max_new_tokens=0,
                         components=["attn_out", "mlp_out"])
    for dtype in ("bfloat16", "float16"):
        model = load(models["llama-3.2-1b"], dtype)
        # 1e9: beyond float16's 65504 for any model's MLP output, far inside bfloat16's 3.4e38
        resolve_arch(model).layers[0].mlp.register_forward_hook(lambda m, a, o: o * 1e9)
        if dtype == "bfloat16":
            with pytest.raises(ExtractError, match=r"beyond float16's range \(65504\); set `storage_dtype: float32`"):
                run(model, sw16, selfcheck=False)
            st = run(model, sw32, selfcheck=False)
            big = np.abs(np.asarray(st.array("mlp_out")[...])).max()
            assert np.isfinite(big) and big > 65504
        else:
            with pytest.raises(ExtractError, match="NaN or inf"):
                run(model, sw16_sub, selfcheck=False)


def test_out_of_memory_halves_the_batch(models, sweep_dir, monkeypatch):
    """A real ``torch.cuda.OutOfMemoryError`` raised inside the model's forward pass (layer 0)
    on the first batch of more than one prompt: the batch is halved and retried, and the
    results equal the uninjected run's within twice the dtype's tolerance (batch shapes
    change the kernels' rounding; each run is within one tolerance of exact arithmetic)."""
    from promptshift.extract import engine as eng_mod
    from promptshift.extract.arch import resolve_arch
    from promptshift.extract.attention import get_stats

    model = load(models["llama-3.2-1b"], WORK_DTYPE)
    sw = sweep_for(models["llama-3.2-1b"], sweep_dir, max_new_tokens=0)
    clean = run(model, sw, selfcheck=False)
    state = {"in_run": False, "raised": 0, "rows": []}
    orig = eng_mod.Engine.extract_batch

    def tracked(self, items, *a, **k):
        state["in_run"] = True
        state["rows"].append(len(items))
        try:
            return orig(self, items, *a, **k)
        finally:
            state["in_run"] = False

    def inject(module, args, kwargs):
        st = get_stats()
        if state["in_run"] and state["raised"] == 0 and st is not None and st.last_q.numel() > 1:
            state["raised"] += 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")

    monkeypatch.setattr(eng_mod.Engine, "extract_batch", tracked)
    h = resolve_arch(model).layers[0].register_forward_pre_hook(inject, with_kwargs=True)
    try:
        got = run(model, sw, selfcheck=False)
    finally:
        h.remove()
    big = max(state["rows"])
    assert state["raised"] == 1 and big > 1 and big // 2 in state["rows"], state
    assert_components_close(got, clean, getattr(torch, WORK_DTYPE), model.config, factor=2.0,
                            label="after OOM halving")


@pytest.mark.parametrize("shape", ["llama-3.2-1b", "gemma-3-1b"])
def test_packed_padded_and_alone_agree(shape, models, sweep_dir):
    """Packed batches (the default on one device, sliding-window Gemma included: its masks
    come from absolute positions) against padded batches and against one prompt at a time
    without prefix sharing."""
    from promptshift.extract.engine import Engine

    model = load(models[shape], WORK_DTYPE)
    eng = Engine(model, components=("resid_post",), top_k=2, lens_top_k=2, token_budget=64)
    eng.remove_hooks()
    assert eng.packed and eng._sliding == shape.startswith("gemma")
    sw = sweep_for(models[shape], sweep_dir)
    packed = run(model, sw)
    padded = run(model, sw, packing=False)
    alone = run(model, sweep_for(models[shape], sweep_dir, token_budget=16), prefix_sharing=False)
    cfg, dt = model.config.get_text_config(), getattr(torch, WORK_DTYPE)
    if shape.startswith("gemma"):
        assert packed.plan.prompts.n_tokens.max() > cfg.sliding_window > packed.plan.prompts.prefix_len.max()
    assert_components_close(packed, padded, dt, cfg, factor=2.0, label=f"{shape} default vs padded")
    assert_components_close(packed, alone, dt, cfg, factor=2.0, label=f"{shape} default vs alone")
    # the store's own sampled self-check (one prompt per block re-run alone)
    check = np.asarray(packed.array("block_selfcheck")[...])
    assert np.isfinite(check).all()


def test_one_process_per_device(models, sweep_dir, tmp_path):
    """``extract --devices d0,d1``: one process per device, each filling one shard, gives the
    arrays of one process on one device. A dry run launches one process (``--devices cpu``:
    the same launcher with one shard: each process costs a CPU several seconds of start-up,
    and processes sharing one store are tests/extract/test_processes.py's subject)."""
    if DRY:
        devices = ["cpu"]
    elif N_GPUS < 2:
        pytest.skip(f"--devices needs two CUDA devices; this machine has {N_GPUS}")
    else:
        devices = [f"cuda:{i}" for i in range(N_GPUS)]
    from promptshift.store import open_store

    spec = models["llama-3.2-1b"]
    sw = sweep_for(spec, sweep_dir, max_new_tokens=2)
    ref = tmp_path / "one.zarr"
    fill_shard(load_sweep(sw), ExtractConfig(store=str(ref), device=devices[0], dtype=WORK_DTYPE, progress=False))
    multi = tmp_path / "multi.zarr"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": f"{REPO}{os.pathsep}"
           + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", "promptshift.cli", "extract", str(sw), "--store", str(multi),
                        "--devices", ",".join(devices), "--dtype", WORK_DTYPE, "--no-progress"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    a, b = open_store(multi), open_store(ref)
    assert a.complete and a.plan.hash() == b.plan.hash()
    same = all(np.array_equal(np.asarray(a.array(n)[...]), np.asarray(b.array(n)[...]), equal_nan=True)
               for n in ("resid_post", "attn_region_mass", "logits_topk_logprobs"))
    print(f"--devices {','.join(devices)}: arrays bit-identical to one process: {same}")
    assert_components_close(a, b, getattr(torch, WORK_DTYPE), load_sweep_model_config(spec), factor=2.0,
                            label=f"--devices {','.join(devices)} vs one process")


def load_sweep_model_config(spec: str):
    from transformers import AutoConfig

    from promptshift.models import materialize, resolve_source

    return AutoConfig.from_pretrained(materialize(resolve_source(None if spec == "embedded" else spec)))


def split_devices() -> tuple[list[str], str]:
    """Two devices to split a model over, and the dtype to run it in: two GPUs in bf16; one
    GPU and the CPU in float32 (a CPU's bf16 is slow), which is the same split for the hooks;
    on a CPU-only dry run the CPU twice, behind the same accelerate hooks."""
    if DRY:
        return ["cpu", "cpu"], "float32"
    if N_GPUS >= 2:
        return ["cuda:0", "cuda:1"], "bfloat16"
    return ["cuda:0", "cpu"], "float32"


def dispatch_split(model, devices: list[str]):
    """Spread ``model`` over ``devices`` with accelerate's hooks, as ``device_map`` does: the
    embeddings (and the tied unembedding) and the first half of the layers on the first
    device, the rest and the final norm on the second, every module's inputs moved to
    its own device by its hook."""
    from accelerate import dispatch_model

    from promptshift.extract.arch import resolve_arch

    arch = resolve_arch(model)
    base_path = arch.spec.layers.rsplit(".", 1)[0]  # "model"
    layers_name = arch.spec.layers.rsplit(".", 1)[1]
    norm_name = arch.spec.final_norm.rsplit(".", 1)[1]
    dev = [d if d == "cpu" else int(d.split(":")[1]) for d in devices]
    L = len(arch.layers)
    device_map = {}
    for name, _ in model.named_children():
        if name != base_path:
            device_map[name] = dev[0]
    for name, _ in model.get_submodule(base_path).named_children():
        if name == layers_name:
            for i in range(L):
                device_map[f"{base_path}.{layers_name}.{i}"] = dev[0] if i < L // 2 else dev[1]
        else:
            device_map[f"{base_path}.{name}"] = dev[1] if name == norm_name else dev[0]
    # main_device "cpu": modules mapped to the CPU run there (not offloaded to the first GPU)
    main = "cpu" if "cpu" in devices else dev[0]
    return dispatch_model(model, device_map=device_map, main_device=main, force_hooks=True), device_map


def test_model_split_over_devices(models, sweep_dir):
    """A model whose layers sit on two devices (hooks, attention statistics, key/value
    buffers, the logit lens and decoding each on the right device) gives the arrays of the
    same model on one device."""
    from promptshift.extract.engine import Engine

    devices, dtype = split_devices()
    spec = models["llama-3.2-1b"]
    sw = sweep_for(spec, sweep_dir)
    whole = load(spec, dtype, device=devices[0])
    a = run(whole, sw)
    split = load(spec, dtype, device="cpu")
    split, dm = dispatch_split(split, devices)
    eng = Engine(split, components=("resid_post",), top_k=2, lens_top_k=2, token_budget=64)
    eng.remove_hooks()
    assert len({str(d) for d in eng._layer_dev}) == len(set(devices))
    assert not eng.packed or len(set(devices)) == 1  # packing needs one device
    b = run(split, sw)
    assert_components_close(b, a, getattr(torch, dtype), split.config, factor=2.0,
                            label=f"split over {'+'.join(devices)} vs {devices[0]}")
    assert (np.asarray(b.array("gen_len")[...]) > 0).all()


@pytest.mark.skipif(N_GPUS < 2, reason="`--device auto-split` spreads a model over several GPUs; fewer than two here")
def test_auto_split_spreads_over_gpus(models, sweep_dir):
    from promptshift.extract.engine import Engine

    spec = models["llama-3.2-1b"]
    sw = sweep_for(spec, sweep_dir)
    split = load(spec, "bfloat16", device="auto-split")
    eng = Engine(split, components=("resid_post",), top_k=2, lens_top_k=2, token_budget=64)
    eng.remove_hooks()
    assert len(set(eng._layer_dev)) > 1, f"auto-split put every layer on {eng._layer_dev[0]}"
    b = run(split, sw)
    a = run(load(spec, "bfloat16"), sw)
    assert_components_close(b, a, torch.bfloat16, split.config, factor=2.0, label="auto-split vs one GPU")
