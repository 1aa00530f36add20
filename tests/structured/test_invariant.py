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
from slimgraph.structured.removal import remove_units
from slimgraph.structured.unit_slicing import mask_units
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


@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma3", "olmo2", "phi3", "glm"])
@pytest.mark.parametrize("seed", [0, 1])
def test_query_heads_within_kv_groups_invariant(name, seed):
    """qheads: the same query head slot of every KV-group goes (alone, or with whole
    KV-groups, MLP and hidden channels in the same selection)."""
    model = zoo.build(name, seed=seed)
    args, kwargs = zoo.example(name)
    r = analyze(trace(model, args, kwargs))
    qheads = [g for g in r.groups if g.kind == "qheads"]
    assert len(qheads) == zoo.LAYERS and all(g.prunable and g.unit == "q-head" and
                                             g.units == zoo.HEADS // zoo.KV for g in qheads)
    kinds = ("qheads",) if seed == 0 else ("heads", "qheads", "mlp", "hidden")
    assert check_invariant(model, args, kwargs, seed, kinds) <= 1e-5


def test_one_kv_head_model_prunes_query_heads():
    """Gemma 3 1B has one KV head per layer: no heads group (a single unit), but its
    query heads are prunable, and the slim model has fewer heads per layer."""
    torch.manual_seed(0)
    model = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=8, pad_token_id=0,
        bos_token_id=1, eos_token_id=2)).eval()
    ids = torch.randint(0, 64, (1, 6))
    masked = copy.deepcopy(model)
    r = analyze(trace(model, (ids,), {"use_cache": False}))
    assert not [g for g in r.groups if g.kind == "heads"]
    sel = {g.id: [0, 2] for g in r.groups if g.kind == "qheads"}
    assert len(sel) == 2
    mask_units(analyze(trace(masked, (ids,), {"use_cache": False})), sel)
    report = remove_units(model, r, sel)
    assert model.config.num_attention_heads == 2 and model.config.num_key_value_heads == 1
    assert model.model.layers[0].self_attn.num_key_value_groups == 2
    assert report["config_updates"]["num_attention_heads"] == 2
    with torch.no_grad():
        a = masked(ids, use_cache=False).logits
        b = model(ids, use_cache=False).logits
    assert float((a - b).norm() / a.norm()) <= 1e-5
