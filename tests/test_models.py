"""Model sources: embedded GGUF, a .gguf path, local folders, the hub (offline here), and
every failure as an error that says what to do."""

from __future__ import annotations

import json

import numpy as np
import pytest

from promptshift.errors import ModelLoadError, TemplateError
from promptshift.models import embedded_gguf_path, load_model, load_tokenizer, resolve_source
from tests.conftest import tiny_llama


@pytest.fixture(scope="module")
def tiny_dir(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    tiny_llama(tok, n_layers=1).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_embedded_and_gguf_path_resolve_to_the_same_cache(tok):
    g = embedded_gguf_path()
    assert g.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert resolve_source(None).kind == "embedded" and resolve_source(str(g)).kind == "gguf"
    t2 = load_tokenizer(str(g))
    assert t2("hello")["input_ids"] == tok("hello")["input_ids"]


def test_local_directory(tiny_dir):
    m = load_model(str(tiny_dir))
    assert m.config.num_hidden_layers == 1 and next(m.parameters()).dtype.is_floating_point
    assert str(next(m.parameters()).dtype) == "torch.float32"  # float32 on CPU


def test_missing_path():
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_source("./no/such/model")
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_source("/tmp/definitely-missing.gguf")


def test_hub_unreachable_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="pass its directory with --model"):
        load_tokenizer("promptshift-test-org/does-not-exist")


def test_unsupported_gguf_architecture(tmp_path, monkeypatch):
    gguf = pytest.importorskip("gguf")
    monkeypatch.setenv("PROMPTSHIFT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "foo.gguf"
    w = gguf.GGUFWriter(str(path), arch="foo")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match="architecture foo is not supported.*Hugging Face folder"):
        load_model(str(path))


def test_no_chat_template_names_the_flag(tiny_dir, tmp_path):
    import shutil

    d = tmp_path / "notemplate"
    shutil.copytree(tiny_dir, d)
    (d / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TemplateError, match="--chat-template"):
        load_tokenizer(str(d))
    tpl = tmp_path / "t.jinja"
    tpl.write_text("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    t = load_tokenizer(str(d), chat_template=str(tpl))
    assert "<|im_start|>user\nhi" in t.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    with pytest.raises(TemplateError, match="does not exist"):
        load_tokenizer(str(d), chat_template=str(tmp_path / "missing.jinja"))


def test_pickled_weights_refused_unless_opted_in(tok, tmp_path):
    import torch

    d = tmp_path / "pickled"
    m = tiny_llama(tok, n_layers=1)
    m.save_pretrained(d)
    for f in d.glob("*.safetensors"):
        f.unlink()
    torch.save(m.state_dict(), d / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickled .bin weights"):
        load_model(str(d))
    assert load_model(str(d), allow_pickle=True).config.num_hidden_layers == 1


def test_remote_code_needs_the_flag(tmp_path):
    d = tmp_path / "custom"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "model_type": "promptshift_custom",
        "auto_map": {"AutoConfig": "configuration_custom.CustomConfig",
                     "AutoModelForCausalLM": "modeling_custom.CustomModel"},
    }))
    (d / "configuration_custom.py").write_text("raise RuntimeError('remote code must not run without the flag')\n")
    with pytest.raises(ModelLoadError, match="--trust-remote-code"):
        load_model(str(d))
