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
    elif name == "qwen3":  # q_norm / k_norm over head_dim
        m = _llama_like(tf.Qwen3Config, tf.Qwen3ForCausalLM)
    elif name == "gemma3":  # norms times (1 + w), embeddings times sqrt(hidden_size), tied
        m = _llama_like(tf.Gemma3TextConfig, tf.Gemma3ForCausalLM)
    elif name == "olmo2":  # q_norm / k_norm over all heads of a layer
        m = _llama_like(tf.Olmo2Config, tf.Olmo2ForCausalLM, pad_token_id=0, bos_token_id=None,
                        eos_token_id=1)
    elif name == "phi3":  # fused qkv_proj split by config head counts, fused gate_up_proj
        m = tf.Phi3ForCausalLM(tf.Phi3Config(
            vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
            num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV,
            pad_token_id=0, bos_token_id=1, eos_token_id=2))
    elif name == "glm":  # interleaved rotary on half of head_dim: x[..., ::2], stack, flatten
        m = _llama_like(tf.GlmConfig, tf.GlmForCausalLM, pad_token_id=0, eos_token_id=1)
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


ZOO = ["llama", "qwen2", "mistral", "qwen3", "gemma3", "olmo2", "phi3", "glm", "opt", "gpt2",
       "bert"]


def example(name: str) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (1, SEQ), generator=g)
    kwargs = {} if name == "bert" else {"use_cache": False}
    return (ids,), kwargs


WORDS = [f"w{i}" for i in range(1, VOCAB)]


def tiny_tokenizer():
    """A word-level tokenizer over WORDS ("w1".."w127"), ids matching the zoo's vocab."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{w: i for i, w in enumerate(WORDS, start=1)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="[UNK]",
                                   model_max_length=64)


def tiny_text(n_words: int, seed: int = 0) -> str:
    """Random words from WORDS, 12 a line, CRLF line ends (like wiki.test.raw)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    words = [WORDS[i] for i in rng.integers(0, len(WORDS), n_words)]
    lines = [" ".join(words[i : i + 12]) for i in range(0, n_words, 12)]
    return "\r\n".join(lines) + "\r\n"
