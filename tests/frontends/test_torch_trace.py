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
