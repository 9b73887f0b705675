"""Tiny random causal LMs (GPT-2 and Llama shapes) with the embedded tokenizer.

For tests only: they make exactness checks fast. Each is saved as a local
model directory, so it goes through the same loader as any user's model.
"""
from __future__ import annotations

from pathlib import Path

import torch

from dowsing.models import embedded_tokenizer_dir


def build_tiny(kind: str, folder: Path, seed: int = 0, n_layer: int = 2) -> Path:
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(embedded_tokenizer_dir()))
    torch.manual_seed(seed)
    vocab = len(tokenizer)
    if kind == "gpt2":
        config = GPT2Config(
            vocab_size=vocab, n_positions=128, n_embd=16, n_layer=n_layer, n_head=2, n_inner=24,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        model = GPT2LMHeadModel(config)
    elif kind == "llama":
        config = LlamaConfig(
            vocab_size=vocab, hidden_size=16, intermediate_size=24, num_hidden_layers=n_layer,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = LlamaForCausalLM(config)
    else:
        raise ValueError(kind)
    # Random init gives near-uniform predictions; larger weights give the
    # loss real curvature so the tests separate right from wrong.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.mul_(8.0)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
