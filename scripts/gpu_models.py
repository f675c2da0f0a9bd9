#!/usr/bin/env python
"""Random-weight models with the shapes of real checkpoints, for checks on machines that
cannot reach a model hub (GPU nodes without network, CI).

    python scripts/gpu_models.py OUT_DIR                    # all shapes, full size, on the CPU
    python scripts/gpu_models.py OUT_DIR --device cuda      # initialise on the GPU (seconds, not minutes)
    python scripts/gpu_models.py OUT_DIR --tiny             # the same families at hidden size 64

Shapes (configs in scripts/gpu_configs/, the values of the published config.json files):

- ``llama-3.2-1b``: Llama 3.2 1B (hidden 2048, 16 layers, 32 heads, 8 key/value heads,
  intermediate 8192, vocabulary 128,256, rope_theta 500,000 with llama3 rope scaling, tied
  embeddings);
- ``gemma-3-1b``: Gemma 3 1B (hidden 1152, 26 layers, 4 heads, 1 key/value head, head size
  256, vocabulary 262,144, sliding-window layers with one global layer in six);
- ``smollm2-135m``: SmolLM2-135M, the embedded model's shape (used when the embedded model's
  package is not installed; otherwise the real weights are used).

Tokenizer: every model gets the embedded SmolLM2 tokenizer (49,152 tokens, its chat
template), or the one in ``--tokenizer DIR``. Models with a larger vocabulary keep their
real embedding and unembedding sizes (what extraction costs depends on them); the
tokenizer only ever produces ids below 49,152, and generated ids above it decode to
nothing. The configs' special-token ids are set to the tokenizer's.

Weights: each family's own initialisation (``initializer_range`` 0.02), float32 rounded to
the checkpoint dtype (bfloat16) and saved as safetensors, with ``promptshift_random.json``
recording shape, seed and size.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent / "gpu_configs"
SHAPES = ("llama-3.2-1b", "gemma-3-1b", "smollm2-135m")

# hidden size, heads, head size, intermediate size and layers of the tiny variants: the same
# families (and for Gemma the same sliding/global mix), small enough for a CPU in seconds
_TINY = {"hidden_size": 64, "num_attention_heads": 4, "head_dim": 16, "intermediate_size": 128}
_TINY_LAYERS = {"llama-3.2-1b": 3, "gemma-3-1b": 6, "smollm2-135m": 3}
# tiny vocabularies: still larger than the SmolLM2 tokenizer's 49,152 where the real one is
# (so ids the tokenizer never makes exist), without the real ones' cost on a CPU
_TINY_VOCAB = 51_200
# Gemma's window in the GPU check (512 in the checkpoint): short enough to act on the test
# sweep's longest prompts (36-37 tokens), long enough for its shared system prefixes (at
# most 23 tokens) to fit inside it
CHECK_WINDOWS = {"gemma-3-1b": 24}


def shape_config(name: str, *, tiny: bool = False, sliding_window: int | None = None) -> dict:
    """The config dict of shape ``name`` (see :data:`SHAPES`); ``tiny``: hidden size 64 with
    the family and layer pattern kept; ``sliding_window``: a shorter window (so that it acts
    on short prompts)."""
    path = CONFIGS / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown model shape {name!r}; known: {', '.join(SHAPES)}")
    d = json.loads(path.read_text())
    if tiny:
        # grouped-query attention stays grouped (as many query heads per key/value head as fit)
        nkv = max(1, _TINY["num_attention_heads"] * d["num_key_value_heads"] // d["num_attention_heads"])
        d.update(_TINY, num_hidden_layers=_TINY_LAYERS[name], num_key_value_heads=nkv,
                 vocab_size=min(d["vocab_size"], _TINY_VOCAB))
        if "query_pre_attn_scalar" in d:
            d["query_pre_attn_scalar"] = _TINY["head_dim"]
    if sliding_window is not None:
        if "sliding_window" not in d:
            raise ValueError(f"{name} has no sliding window")
        d["sliding_window"] = int(sliding_window)
    return d


def build(name: str, out: str | Path, *, tokenizer=None, tiny: bool = False, device: str = "cpu",
          dtype: str = "bfloat16", seed: int = 0, sliding_window: int | None = None) -> Path:
    """Write a random-weight model of shape ``name`` with its tokenizer to ``out`` and
    return the directory (loadable by ``promptshift.models.load_model`` and ``--model``).

    ``tokenizer``: a tokenizer, a spec for :func:`promptshift.models.load_tokenizer`, or
    None for the embedded one. Initialising on ``device="cuda"`` takes seconds for 1B
    parameters; a CPU takes about a minute."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from promptshift.models import load_tokenizer

    tok = tokenizer if hasattr(tokenizer, "apply_chat_template") else load_tokenizer(tokenizer)
    d = shape_config(name, tiny=tiny, sliding_window=sliding_window)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
           "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id}
    d.update(ids)
    d.pop("torch_dtype", None)
    cfg = AutoConfig.for_model(**d)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model = model.to({"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]).eval()
    model.generation_config = GenerationConfig(**ids)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    (out / "promptshift_random.json").write_text(json.dumps(
        {"shape": name, "tiny": tiny, "seed": seed, "dtype": dtype, "parameters": n,
         "sliding_window": d.get("sliding_window")}, indent=1))
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="directory; one sub-directory per shape")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated, any of " + ", ".join(SHAPES))
    ap.add_argument("--tiny", action="store_true", help="hidden size 64 (same families, vocabularies, layer mix)")
    ap.add_argument("--device", default="cpu", help="where to initialise the weights (cuda: much faster)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the embedded SmolLM2's)")
    ap.add_argument("--sliding-window", type=int, default=None, help="override the Gemma window")
    args = ap.parse_args(argv)
    for name in args.shapes.split(","):
        sw = args.sliding_window if name.startswith("gemma") else None
        path = build(name, Path(args.out) / name, tokenizer=args.tokenizer, tiny=args.tiny, device=args.device,
                     sliding_window=sw)
        print(path)


if __name__ == "__main__":
    main()
