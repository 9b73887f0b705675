"""Tiny random causal LMs (GPT-2 and Llama shapes) for the tests.

For tests only: they make exactness checks fast. Each is saved as a local
model directory, so it goes through the same loader as any user's model.

By default a model gets a small byte-level BPE tokenizer (1,024 tokens,
trained here on the shipped example domain sets). The embedded model's
tokenizer has 49,152: with 16-wide layers the LM head and its softmax were
most of every forward and backward pass, though no test of a tiny model is
about that tokenizer. `tokenizer="embedded"` builds with the embedded one.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

SMALL_VOCAB = 1024
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # the embedded tokenizer's unk, bos, eos/pad


@functools.lru_cache(maxsize=None)
def small_tokenizer():
    """A byte-level BPE tokenizer (any text encodes) with the embedded one's
    special tokens, trained on the facts of the shipped example sets; the
    training is deterministic, so every process builds the same one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from dowsing.domains import example_sets

    facts = [fact for path in sorted(example_sets().values())
             for domain in json.loads(Path(path).read_text(encoding="utf-8"))["domains"] for fact in domain["facts"]]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=SMALL_VOCAB, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(facts, trainer)
    unk, bos, eos = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=bos, eos_token=eos, pad_token=eos, unk_token=unk)


def build_tiny(kind: str, folder: Path, seed: int = 0, n_layer: int = 2, tokenizer: str = "small") -> Path:
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if tokenizer == "small":
        tokenizer = small_tokenizer()
    elif tokenizer == "embedded":
        from dowsing.access.models import embedded_tokenizer_dir

        tokenizer = AutoTokenizer.from_pretrained(str(embedded_tokenizer_dir()))
    else:
        raise ValueError(tokenizer)
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


def stand_in_result():
    """A one-domain analysis Result with made-up numbers, for tests of where results
    are kept and shown (jobs, stores), not of what they say."""
    from dowsing.result import DomainResult, Result

    domain = DomainResult(
        name="Biology", rank=1, mean=1.0, share_pct=100.0, t_vs_rest=None, p_value=None, n_facts=3,
        delta_n_10pct=None, delta_n_direct=None, delta_n_reason="test", saturation={}, solver={},
        concept_vector_norm=1.0,
    )
    return Result(model={"parameters": 7}, config={}, domains=[domain], per_example=[], timings={})
