"""Real-model tier: SmolLM2-135M (run with -m slow)."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from slimgraph.frontends.build import graph_of
from slimgraph.frontends.loading import load_model
from slimgraph.ir.dependency import analyze
from slimgraph.structured.removal import remove_units
from slimgraph.structured.unit_slicing import mask_units

pytestmark = pytest.mark.slow

LAYERS, HIDDEN, INTER, KV, QPK, HD = 30, 576, 1536, 3, 3, 64


@pytest.fixture(scope="module")
def smol():
    loaded = load_model("smollm2-135m")
    return loaded, analyze(graph_of(loaded))


def test_groups_of_smollm2(smol):
    _, r = smol
    prunable = r.prunable()
    heads = [g for g in prunable if g.kind == "heads"]
    mlp = [g for g in prunable if g.kind == "mlp"]
    hidden = [g for g in prunable if g.kind == "hidden"]
    qheads = [g for g in prunable if g.kind == "qheads"]
    assert len(prunable) == 3 * LAYERS + 1
    for g in qheads:  # the j-th query head of each of the 3 KV-groups
        p = f"model.layers.{g.layer}.self_attn."
        assert (g.units, g.unit) == (QPK, "q-head")
        assert {(m.param, m.dim): len(m.indices(0)) for m in g.members} == {
            (p + "q_proj.weight", 0): KV * HD, (p + "o_proj.weight", 1): KV * HD}
    assert sorted(g.layer for g in heads) == list(range(LAYERS))
    assert sorted(g.layer for g in mlp) == list(range(LAYERS))
    for g in heads:
        assert (g.units, g.unit, g.queries_per_unit) == (KV, "kv-group", QPK)
        p = f"model.layers.{g.layer}.self_attn."
        dims = {(m.param, m.dim): len(m.indices(0)) for m in g.members}
        # a unit: 1 k head + 1 v head + its 3 q heads + their o_proj input columns
        assert dims == {(p + "q_proj.weight", 0): QPK * HD, (p + "k_proj.weight", 0): HD,
                        (p + "v_proj.weight", 0): HD, (p + "o_proj.weight", 1): QPK * HD}
    for g in mlp:
        p = f"model.layers.{g.layer}.mlp."
        assert g.units == INTER
        assert {(m.param, m.dim) for m in g.members} == {
            (p + "gate_proj.weight", 0), (p + "up_proj.weight", 0), (p + "down_proj.weight", 1)}
    (h,) = hidden
    assert h.layer is None and h.units == HIDDEN
    members = {(m.param, m.dim) for m in h.members}
    assert ("model.embed_tokens.weight", 1) in members  # tied lm_head is the same tensor
    assert ("model.norm.weight", 0) in members
    for layer in range(LAYERS):
        p = f"model.layers.{layer}."
        for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj",
                  "mlp.up_proj"):
            assert (p + n + ".weight", 1) in members
        for n in ("self_attn.o_proj", "mlp.down_proj"):
            assert (p + n + ".weight", 0) in members
        for n in ("input_layernorm", "post_attention_layernorm"):
            assert (p + n + ".weight", 0) in members
    assert len(members) == 1 + 1 + LAYERS * 9


def test_invariant_on_smollm2(smol):
    loaded, r = smol
    model = loaded.model
    masked = copy.deepcopy(model)
    rng = random.Random(0)
    sel = {}
    for g in r.prunable():
        if g.kind in ("heads", "qheads") and rng.random() < 0.3:
            sel[g.id] = [rng.randrange(g.units)]
        elif g.kind == "mlp" and rng.random() < 0.5:
            sel[g.id] = sorted(rng.sample(range(g.units), rng.randint(1, g.units - 1)))
        elif g.kind == "hidden":
            sel[g.id] = sorted(rng.sample(range(g.units), 64))
    from slimgraph.frontends.torch_export import trace

    args, kwargs = loaded.example_inputs(seq=16)
    mask_units(analyze(trace(masked, args, kwargs)), sel)
    remove_units(model, r, sel)
    ids = torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = masked(input_ids=ids, use_cache=False).logits
        b = model(input_ids=ids, use_cache=False).logits
    assert float((a - b).norm() / a.norm()) <= 1e-5
