"""The torch.export frontend keeps no second reference to the model's weights."""

from __future__ import annotations

import gc
import weakref

import torch

from slimgraph.frontends.torch_export import trace
from slimgraph.ir.dependency import analyze
from slimgraph.sparsity.deploy import permute_group
from tests import zoo


def test_weights_replaced_by_a_pass_are_freed():
    """A pass that writes new weights (a permutation here, slicing in `remove`) must not
    leave the originals alive through the traced graph: they would double the memory."""
    model = zoo.build("llama")
    result = analyze(trace(model, *zoo.example("llama")))
    mlp = result.by_kind("mlp")[0]
    members = [m.param for m in mlp.members]
    old = {name: weakref.ref(model.get_parameter(name)) for name in members}
    permute_group(result, mlp, torch.randperm(mlp.units, generator=torch.Generator().manual_seed(0)))
    gc.collect()
    for name in members:
        assert model.get_parameter(name) is not old[name]()  # a new tensor was written
        assert old[name]() is None, f"{name}: the original weight is still referenced"
    assert result.graph.params[members[0]].param.read().shape  # the graph still reads weights


def test_tensors_made_in_forward_and_numpy_T_trace():
    """Falcon builds an index tensor inside forward (torch.export lifts it as a constant
    no module attribute holds) and multiplies by ``W.T``: both trace; the constant is an
    input of the graph, not a parameter, and ``x @ W.T`` counts as a linear."""
    import transformers as tf

    from slimgraph.frontends.torch_export import trace as trace_model
    from slimgraph.ir.dependency import analyze as analyze_graph

    torch.manual_seed(0)
    model = tf.FalconForCausalLM(tf.FalconConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        new_decoder_architecture=True, num_kv_heads=2, pad_token_id=0, bos_token_id=1,
        eos_token_id=2)).eval()
    ids = torch.randint(0, 64, (1, 5))
    graph = trace_model(model, (ids,), {"use_cache": False})
    # whether Falcon builds a tensor in forward depends on the transformers release
    # (5.25 no longer does); a module of our own that does keeps the case covered
    assert all("lifted_tensor" not in name for name in graph.params)

    class IndexInForward(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, x):
            idx = torch.tensor([1, 0, 3, 2, 5, 4, 7, 6])  # lifted as a constant by torch.export
            return self.lin(x.index_select(-1, idx))

    lifted = trace_model(IndexInForward().eval(), (torch.randn(2, 8),), {})
    assert any("lifted_tensor" in v.name for v in lifted.inputs)
    assert all("lifted_tensor" not in name for name in lifted.params)
    assert any(n.op == "aten.numpy_T.default" and n.kind.value == "transpose" for n in graph.nodes)
    # x @ W.T is a linear layer, not attention: the MLP between two of them is an MLP group
    mlp = [g for g in analyze_graph(graph).groups if g.kind == "mlp"]
    assert len(mlp) == 1 and mlp[0].prunable and mlp[0].units == 4 * 32
    assert {m.param for m in mlp[0].members} == {
        "transformer.h.0.mlp.dense_h_to_4h.weight", "transformer.h.0.mlp.dense_4h_to_h.weight"}
