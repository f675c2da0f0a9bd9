"""Fixtures shared by the sweep tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def sp_tok():
    """A Llama-2-style tokenizer (BPE over ``▁``-joined text, no pre-tokenizer, BOS added by
    its post-processor), trained here on template-like text so that its merges straddle
    scaffolding and content."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    prose = ["Say Hi! Hello. Be brief. What is the capital of France? Hi there, how can I help?",
             "Rule. one two three. Sure, always. Never mind. You are a helpful assistant. What is 2+2?"] * 20
    corpus = prose + ["[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\nHello [/INST] Hi </s>",
                      "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
                      "<|user|>\nHi<|end|>\n<|assistant|>\n"] * 4
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Strip(" ", 1, 0)])
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'\"-:;()[]{}<>|/\\+*=#_\n\t▁"
    alphabet = sorted(set("".join(corpus).replace(" ", "▁")) | set(letters))
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                                        initial_alphabet=alphabet, show_progress=False))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tk.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
