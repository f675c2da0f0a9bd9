"""Shared fixtures: the embedded tokenizer (real chat template) and tiny random models
built from a config, in float32 on CPU, so most tests run in seconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tok():
    from promptshift.models import load_tokenizer

    return load_tokenizer()


def tiny_llama(tok, n_layers: int = 3, seed: int = 0, **kw):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **kw,
    )
    model = LlamaForCausalLM(cfg).float().eval()
    # random weights give near-uniform attention; a larger init makes patterns (and bugs) visible
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
    return model


@pytest.fixture(scope="session")
def tiny_model(tok):
    return tiny_llama(tok)


def write_sweep(path: Path, systems=None, users=None, **settings) -> Path:
    import yaml

    systems = systems or [
        {"name": "brief", "text": "Be brief.", "tags": ["concise"]},
        {"name": "pirate", "text": "You are a pirate. Speak like one in every answer, matey.", "tags": ["persona"]},
        {"name": "french", "text": "Always answer in French.", "tags": ["language"]},
    ]
    users = users or [
        {"id": "capital", "text": "What is the capital of France?", "category": "factual", "expected": "Paris"},
        {"id": "add", "text": "What is 2 + 3?", "category": "reasoning", "expected": "5"},
        {"id": "poem", "text": "Write a short poem about rain.", "category": "creative"},
    ]
    d = {"name": path.stem, "system_prompts": systems, "user_prompts": users, **settings}
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path
