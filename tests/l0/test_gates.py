"""Hard-concrete gates, their placement from the groups, and the expected-size model."""

from __future__ import annotations

import math

import pytest
import torch

from slimgraph.frontends.build import graph_of
from slimgraph.frontends.loading import LoadedModel
from slimgraph.ir.dependency import analyze
from slimgraph.l0.gates import (
    LIMIT_L,
    LIMIT_R,
    GateSet,
    SizeModel,
    deterministic_gate,
    hard_concrete_sample,
    plan_families,
    prob_kept,
)
from tests import zoo


def test_prob_kept_matches_the_formula_and_samples():
    la = torch.tensor([-3.0, 0.0, 2.0])
    expected = [1 - 1 / (1 + math.exp(-(2 / 3 * math.log(-LIMIT_L / LIMIT_R) - a))) for a in la.tolist()]
    assert prob_kept(la).tolist() == pytest.approx(expected, rel=1e-6)
    g = torch.Generator().manual_seed(0)
    z = torch.stack([hard_concrete_sample(la, g) for _ in range(20000)])
    assert z.min() >= 0 and z.max() <= 1
    assert (z != 0).float().mean(0).tolist() == pytest.approx(prob_kept(la).tolist(), abs=0.02)


def test_deterministic_gate_zeros_the_expected_count_and_keeps_one():
    la = torch.tensor([5.0, -5.0, 4.0, -4.0, 3.0])
    z = deterministic_gate(la)
    zeros = round(5 - float(prob_kept(la).sum()))
    assert int((z == 0).sum()) == zeros == 2
    assert z[1] == 0 and z[3] == 0 and 0.9 < float(z[0]) <= 1.0
    assert (deterministic_gate(la, binary=True)[[0, 2, 4]] == 1).all()
    assert int((deterministic_gate(torch.full((4,), -5.0)) > 0).sum()) == 1  # never all removed


@pytest.fixture(scope="module")
def llama():
    model = zoo.build("llama")
    loaded = LoadedModel(spec="t", kind="module", model=model, onnx_path=None, config=model.config,
                         tokenizer=None, meta=False)
    return model, analyze(graph_of(loaded))


def test_families_gate_where_units_are_read_or_written(llama):
    model, result = llama
    fams = plan_families(model, result, {"heads", "mlp", "hidden"})
    by_kind = {}
    for f in fams:
        by_kind.setdefault(f.group.kind, []).append(f)
    assert len(by_kind["heads"]) == len(by_kind["mlp"]) == zoo.LAYERS and len(by_kind["hidden"]) == 1
    heads0 = by_kind["heads"][0]
    assert [(t.module, t.where) for t in heads0.targets] == [("model.layers.0.self_attn.o_proj", "input")]
    # a KV-group unit owns the o_proj columns of its query heads
    per_unit = zoo.HEADS // zoo.KV * zoo.HEAD_DIM
    assert [int((heads0.targets[0].owner == u).sum()) for u in range(zoo.KV)] == [per_unit] * zoo.KV
    assert [(t.module, t.where) for t in by_kind["mlp"][1].targets] == [("model.layers.1.mlp.down_proj", "input")]
    hidden = {(t.module, t.where) for t in by_kind["hidden"][0].targets}
    assert hidden == {("model.embed_tokens", "output")} | {
        (f"model.layers.{i}.{m}", "output") for i in range(zoo.LAYERS)
        for m in ("self_attn.o_proj", "mlp.down_proj")}


def test_expected_sparsity_counts_parameters_per_unit(llama):
    model, result = llama
    fams = plan_families(model, result, {"mlp", "heads"})
    size = SizeModel.build(model, result, fams)
    d, i = zoo.HIDDEN, zoo.INTER
    attn = d * zoo.HEADS * zoo.HEAD_DIM * 2 + d * zoo.KV * zoo.HEAD_DIM * 2
    assert size.prunable() == zoo.LAYERS * (attn + 3 * d * i)
    ones = [torch.ones(f.group.units, dtype=torch.float64) for f in fams]
    assert float(size.expected_sparsity(ones)) == pytest.approx(0.0)
    half_mlp = [torch.full_like(p, 0.5) if f.group.kind == "mlp" else p for p, f in zip(ones, fams)]
    assert float(size.expected_sparsity(half_mlp, "mlp")) == pytest.approx(0.5)
    assert float(size.expected_sparsity(half_mlp)) == pytest.approx(
        0.5 * 3 * d * i / (attn + 3 * d * i))


def test_gates_scale_what_they_gate(llama):
    model, result = llama
    fams = plan_families(model, result, {"mlp"})
    gates = GateSet(fams)
    ids = zoo.example("llama")[0][0]
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        gates.install(model)
        gates.open()
        assert torch.equal(model(input_ids=ids).logits, ref)
        gates.current = [torch.zeros(f.group.units) for f in fams]
        down = [model.model.layers[k].mlp.down_proj for k in range(zoo.LAYERS)]
        saved = [m.weight.clone() for m in down]
        for m in down:
            m.weight.zero_()
        no_mlp = model(input_ids=ids).logits
        for m, w in zip(down, saved):
            m.weight.copy_(w)
        assert torch.allclose(model(input_ids=ids).logits, no_mlp, atol=1e-6)
        gates.remove_hooks()
        assert torch.equal(model(input_ids=ids).logits, ref)
