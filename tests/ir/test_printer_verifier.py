from __future__ import annotations

import pytest
import torch

from slimgraph.errors import VerificationError
from slimgraph.frontends.torch_export import trace
from slimgraph.ir.graph import Graph, OpKind
from slimgraph.ir.params import TorchParamHandle
from slimgraph.ir.printer import print_graph
from slimgraph.ir.verifier import problems, verify
from tests import zoo


def test_printer_shows_kinds_ops_params_and_shapes():
    args, kwargs = zoo.example("llama")
    g = trace(zoo.build("llama"), args, kwargs)
    text = print_graph(g)
    assert text.startswith("graph LlamaForCausalLM (torch) {")
    assert "parameter @model.layers.0.self_attn.q_proj.weight: f32[64,64]" in text
    assert "= linear(%" in text and "{w_in=1, w_out=0}  # aten.linear.default" in text
    assert "= attention(%" in text
    assert text.rstrip().endswith("}")
    verify(g)  # a traced graph is well formed


def test_verifier_names_the_node_at_fault():
    lin = torch.nn.Linear(4, 3)
    g = Graph("t")
    x = g.add_input("x", (2, 4), "float32")
    w = g.add_param("weight", TorchParamHandle(lin, ["weight"]))
    g.add_node("mm", OpKind.LINEAR, "aten.linear.default", [x, w], [("y", (2, 3), "float32")],
               {"w_in": 1, "w_out": 0})
    g.set_outputs([g.values["y"]])
    assert problems(g) == []
    del g.nodes[0].attrs["w_out"]
    assert any("node mm (linear): missing attribute 'w_out'" in p for p in problems(g))
    g.nodes[0].attrs["w_out"] = 0
    g.add_node("bad", OpKind.TRANSPOSE, "aten.t.default", [g.values["y"]],
               [("z", (3, 2), "float32")])
    with pytest.raises(VerificationError, match="node bad .*missing attribute 'perm'"):
        verify(g)


def test_param_handle_slice_permute_and_ties():
    m = zoo.build("llama")
    names = ["model.embed_tokens.weight", "lm_head.weight"]
    h = TorchParamHandle(m, names)
    before = h.read().clone()
    h.permute(1, list(range(63, -1, -1)))
    assert torch.equal(h.read(), before.flip(1))
    h.slice(1, [0, 5, 7])
    assert m.lm_head.weight is m.model.embed_tokens.weight  # still tied
    assert tuple(m.lm_head.weight.shape) == (128, 3)
    assert torch.equal(m.lm_head.weight, before.flip(1)[:, [0, 5, 7]])
