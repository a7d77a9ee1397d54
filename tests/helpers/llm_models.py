"""Tiny randomly initialised transformers of four families, shared by the calibration and LLM tests."""

from __future__ import annotations

import torch

VOCAB = 64


def tiny(family: str, layers: int = 2, seed: int = 0) -> torch.nn.Module:
    """A tiny model of ``family`` ("llama", "gpt2", "opt", "bert") in eval mode, deterministic for ``seed``."""
    import transformers as tf

    torch.manual_seed(seed)
    if family == "llama":
        cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        model = tf.LlamaForCausalLM(cfg)
    elif family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=layers, n_head=2, n_positions=64)
        model = tf.GPT2LMHeadModel(cfg)
    elif family == "opt":
        cfg = tf.OPTConfig(vocab_size=VOCAB, hidden_size=16, ffn_dim=32, num_hidden_layers=layers,
                           num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=16)
        model = tf.OPTForCausalLM(cfg)
    elif family == "bert":
        cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=64)
        model = tf.BertModel(cfg)
    else:
        raise ValueError(family)
    return model.eval()


FAMILIES = ("llama", "gpt2", "opt", "bert")

#: Where each family keeps its blocks.
BLOCK_PATHS = {"llama": "model.layers", "gpt2": "transformer.h", "opt": "model.decoder.layers", "bert": "encoder.layer"}


def tokens(n: int = 6, length: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))
