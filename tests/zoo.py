"""Tiny random-weight models from transformers configs: the unit-test zoo.

Each loads in milliseconds and exercises a different set of channel rules.
"""

from __future__ import annotations

import torch
import transformers as tf

VOCAB, HIDDEN, INTER, LAYERS, HEADS, KV, HEAD_DIM = 128, 64, 96, 2, 4, 2, 16
SEQ = 7


def _llama_like(config_cls, model_cls, **extra):
    cfg = config_cls(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                     num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                     num_key_value_heads=KV, head_dim=HEAD_DIM, **extra)
    return model_cls(cfg)


def build(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if name == "llama":
        m = _llama_like(tf.LlamaConfig, tf.LlamaForCausalLM, tie_word_embeddings=True)
    elif name == "qwen2":
        m = _llama_like(tf.Qwen2Config, tf.Qwen2ForCausalLM, max_window_layers=LAYERS)
    elif name == "mistral":
        m = _llama_like(tf.MistralConfig, tf.MistralForCausalLM)
    elif name == "opt":
        m = tf.OPTForCausalLM(tf.OPTConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=INTER, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, word_embed_proj_dim=HIDDEN, max_position_embeddings=64))
    elif name == "gpt2":
        m = tf.GPT2LMHeadModel(tf.GPT2Config(
            vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=64,
            bos_token_id=0, eos_token_id=0))
    elif name == "bert":
        m = tf.BertForSequenceClassification(tf.BertConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
            num_hidden_layers=LAYERS, num_attention_heads=HEADS, max_position_embeddings=64))
    else:
        raise KeyError(name)
    return m.eval()


ZOO = ["llama", "qwen2", "mistral", "opt", "gpt2", "bert"]


def example(name: str) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (1, SEQ), generator=g)
    kwargs = {} if name == "bert" else {"use_cache": False}
    return (ids,), kwargs
