from __future__ import annotations

import copy

import pytest
import torch

from slimgraph.errors import PipelineError
from slimgraph.frontends.torch_export import trace
from slimgraph.ir.dependency import analyze
from slimgraph.structured.importance import group_importance
from slimgraph.structured.selection import choose, plan_counts, removal_count
from tests import zoo


def test_removal_count_rounding():
    assert removal_count(3, 0.33, 1) == 1  # 1 of 3 KV-groups
    assert removal_count(1536, 0.5, 1) == 768
    assert removal_count(1536, 0.3, 64) == 1536 - 1088  # kept rounded to a multiple of 64
    assert removal_count(100, 0.0, 8) == 0


@pytest.fixture(scope="module")
def llama():
    model = zoo.build("llama")
    args, kw = zoo.example("llama")
    return model, analyze(trace(model, args, kw))


def test_plan_counts_constraints(llama):
    _, r = llama
    counts, skipped = plan_counts(r.groups, {"heads": 0.5, "mlp": 0.25}, 1, {1})
    heads = {g.id: g for g in r.groups if g.kind == "heads"}
    assert [counts.get(g) for g in heads] == [1, None]  # layer 1 is protected
    assert any("layer is protected" in s for s in skipped)
    mlp0 = next(g for g in r.groups if g.kind == "mlp" and g.layer == 0)
    assert counts[mlp0.id] == 24
    with pytest.raises(PipelineError, match="would remove all 2 units"):
        plan_counts(r.groups, {"heads": 0.9}, 1, set())
    with pytest.raises(PipelineError, match="no channels groups|no .* groups"):
        plan_counts([g for g in r.groups if g.kind != "mlp"], {"mlp": 0.5}, 1, set())


def test_unprunable_kind_is_an_error():
    model = zoo.build("bert")
    args, kw = zoo.example("bert")
    r = analyze(trace(model, args, kw))
    hidden = [g for g in r.groups if g.kind == "hidden"]
    for g in hidden:
        g.prunable, g.reasons = False, ["model output last_hidden_state"]
    with pytest.raises(PipelineError, match="every hidden group is unprunable"):
        plan_counts(r.groups, {"hidden": 0.25}, 1, set())


def test_importance_is_norm_over_all_members(llama):
    model, r = llama
    g = next(g for g in r.groups if g.kind == "mlp" and g.layer == 0)
    mlp = model.model.layers[0].mlp
    expect = (mlp.gate_proj.weight.pow(2).sum(1) + mlp.up_proj.weight.pow(2).sum(1)
              + mlp.down_proj.weight.pow(2).sum(0)).sqrt().double()
    assert torch.allclose(group_importance(r.graph, g, "l2"), expect)
    expect1 = (mlp.gate_proj.weight.abs().sum(1) + mlp.up_proj.weight.abs().sum(1)
               + mlp.down_proj.weight.abs().sum(0)).double()
    assert torch.allclose(group_importance(r.graph, g, "l1"), expect1)


def test_choose_least_important():
    assert choose(torch.tensor([3.0, 1.0, 2.0, 0.5]), 2) == [1, 3]


def test_kv_group_importance_covers_its_query_heads(llama):
    model, r = llama
    g = next(g for g in r.groups if g.kind == "heads" and g.layer == 0)
    m = copy.deepcopy(model)
    attn = m.model.layers[0].self_attn
    with torch.no_grad():
        attn.q_proj.weight[2 * zoo.HEAD_DIM:] *= 100  # query heads 2, 3 = kv-group 1
    r2 = analyze(trace(m, *zoo.example("llama")))
    g2 = next(x for x in r2.groups if x.kind == "heads" and x.layer == 0)
    s1, s2 = group_importance(r.graph, g), group_importance(r2.graph, g2)
    assert s2[1] > 10 * s1[1] and torch.isclose(s2[0], s1[0])


def test_activation_importance_matches_hand_computation(llama):
    from slimgraph.ir.graph import OpKind
    from slimgraph.structured.importance import activation_importance, consumer_input_norms

    model, r = llama
    ids = torch.randint(0, zoo.VOCAB, (3, 9), generator=torch.Generator().manual_seed(0))
    norms = consumer_input_norms(model, r.graph, ids, batch=2)
    inputs = {n.inputs[1].name: n.attrs["w_in"] for n in r.graph.nodes if n.kind is OpKind.LINEAR}
    down = model.model.layers[1].mlp.down_proj
    seen = []
    h = down.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().double()))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    h.remove()
    x2 = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]).pow(2).sum(0)
    expect = x2 * down.weight.detach().double().pow(2).sum(0)
    g = next(g for g in r.groups if g.kind == "mlp" and g.layer == 1)
    assert torch.allclose(activation_importance(r.graph, g, norms, inputs), expect)
    heads = next(g for g in r.groups if g.kind == "heads" and g.layer == 0)
    s = activation_importance(r.graph, heads, norms, inputs)
    assert s.shape == (zoo.KV,) and bool((s > 0).all())
