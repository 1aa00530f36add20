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
