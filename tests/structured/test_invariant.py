"""The pruning invariant: removing units == zeroing them in the original model."""

from __future__ import annotations

import copy
import random

import pytest
import torch
import transformers as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slimgraph.frontends.torch_export import trace
from slimgraph.ir.dependency import analyze
from slimgraph.structured.removal import mask_units, remove_units
from tests import zoo

LAYERNORM_MODELS = {"opt", "gpt2", "bert"}  # hidden removal is approximate there


def _logits(model, args, kwargs):
    with torch.no_grad():
        return model(*args, **kwargs).logits


def check_invariant(model, args, kwargs, seed: int, kinds=("heads", "mlp", "hidden")) -> float:
    masked = copy.deepcopy(model)
    r = analyze(trace(model, args, kwargs))
    rng = random.Random(seed)
    selection = {}
    groups = [g for g in r.prunable() if g.kind in kinds]
    assert groups
    for i, g in enumerate(groups):
        if rng.random() < 0.8 or (i == len(groups) - 1 and not selection):  # never empty
            k = rng.randint(1, g.units - 1)
            selection[g.id] = sorted(rng.sample(range(g.units), k))
    mask_units(analyze(trace(masked, args, kwargs)), selection)
    report = remove_units(model, r, selection)
    assert report["params_after"] < report["params_before"]
    a, b = _logits(masked, args, kwargs), _logits(model, args, kwargs)
    # the slim model traces and analyses again
    analyze(trace(model, args, kwargs))
    return float((a - b).norm() / a.norm())


@pytest.mark.parametrize("name", zoo.ZOO)
@pytest.mark.parametrize("seed", [0, 1])
def test_zoo_invariant(name, seed):
    kinds = ("heads", "mlp") if name in LAYERNORM_MODELS else ("heads", "mlp", "hidden")
    model = zoo.build(name, seed=seed)
    args, kwargs = zoo.example(name)
    assert check_invariant(model, args, kwargs, seed, kinds) <= 1e-5


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mult=st.sampled_from([8, 12, 16]), kv=st.sampled_from([1, 2]), rep=st.sampled_from([1, 2, 3]),
       head_dim=st.sampled_from([8, 16]), inter=st.integers(8, 40), layers=st.integers(1, 2),
       tied=st.booleans(), seed=st.integers(0, 1000))
def test_random_llama_configs_invariant(mult, kv, rep, head_dim, inter, layers, tied, seed):
    torch.manual_seed(seed)
    hidden = kv * rep * mult  # transformers wants hidden divisible by the head count
    cfg = tf.LlamaConfig(vocab_size=50, hidden_size=hidden, intermediate_size=inter,
                         num_hidden_layers=layers, num_attention_heads=kv * rep,
                         num_key_value_heads=kv, head_dim=head_dim, tie_word_embeddings=tied)
    model = tf.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 50, (1, 6))
    assert check_invariant(model, (ids,), {"use_cache": False}, seed) <= 1e-5


def test_rms_gain_form_classifies_norms_by_running_them():
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from slimgraph.structured.removal import rms_gain_form

    class Shifted(LlamaRMSNorm):  # x/rms(x) * w + 0.1: neither form, left uncorrected
        def forward(self, x):
            return super().forward(x) + 0.1

    llama, gemma, shifted = LlamaRMSNorm(8), Gemma3RMSNorm(8), Shifted(8)
    for norm in (llama, gemma, shifted):
        torch.nn.init.normal_(norm.weight)
    assert rms_gain_form(llama) == "scale"
    assert rms_gain_form(gemma) == "offset"  # x/rms(x) * (1 + w)
    assert rms_gain_form(shifted) is None
    assert rms_gain_form(torch.nn.RMSNorm(8, eps=1e-6)) == "scale"
    assert rms_gain_form(torch.nn.RMSNorm(8)) == "scale"  # eps=None: the dtype's epsilon
    assert rms_gain_form(gemma.to(torch.bfloat16)) == "offset"


def test_interleaved_rotary_leaves_heads_prunable():
    """GPT-J rotates channel pairs (2i, 2i+1): x[..., ::2] and torch.stack. Only head_dim
    stops being tracked there; heads stay prunable, and removing them is exact."""
    torch.manual_seed(0)
    model = tf.GPTJForCausalLM(tf.GPTJConfig(vocab_size=64, n_embd=32, n_layer=2, n_head=4,
                                             rotary_dim=4, n_positions=32)).eval()
    ids = torch.randint(0, 64, (1, 6))
    r = analyze(trace(model, (ids,), {"use_cache": False}))
    heads = [g for g in r.groups if g.kind == "heads"]
    assert len(heads) == 2 and all(g.prunable and g.units == 4 for g in heads)
    assert check_invariant(model, (ids,), {"use_cache": False}, 0, ("heads", "mlp")) <= 1e-5


def test_weightless_layer_norm_follows_hidden_removal():
    """OLMo's LayerNorm has no weight: its normalized_shape is set from the hidden group,
    and the report says the result is approximate (LayerNorm subtracts a mean)."""
    torch.manual_seed(0)
    model = tf.OlmoForCausalLM(tf.OlmoConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
        eos_token_id=2)).eval()
    ids = torch.randint(0, 64, (1, 6))
    r = analyze(trace(model, (ids,), {"use_cache": False}))
    (hidden,) = [g for g in r.groups if g.kind == "hidden"]
    report = remove_units(model, r, {hidden.id: [1, 5, 9]})
    assert model.model.layers[0].input_layernorm.normalized_shape == (29,)
    assert report["module_attrs"]["model.layers.0.input_layernorm"]["normalized_shape"] == [29]
    assert any("approximates" in n for n in report["notes"])
    with torch.no_grad():
        assert model(ids, use_cache=False).logits.shape == (1, 6, 64)
