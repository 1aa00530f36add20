"""Heads / GQA KV-groups through opset-23 ``Attention`` on 3-D inputs ``[B, L, H*E]``
(``q_num_heads`` / ``kv_num_heads``), the form other exporters write: a tiny two-layer
decoder built by hand (embedding, q/k/v/o projections, causal GQA attention, a SiLU MLP,
residual adds, lm_head). Removal rewrites both head counts per node; the slimmed model
equals the masked one in ONNX Runtime (batch 2, two lengths)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from slimgraph.frontends.onnx_import import import_onnx
from slimgraph.ir.dependency import analyze
from tests.structured.onnx_builders import save_lm
from tests.structured.random_selection import slim_and_masked

ort = pytest.importorskip("onnxruntime")

VOCAB, D, HQ, HKV, E, FF, LAYERS = 40, 24, 6, 3, 4, 32, 2


def _model(path):
    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def w(name, *shape):
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * 0.2).astype(np.float32),
                                             name))
        return name

    nodes.append(helper.make_node("Gather", [w("model.embed_tokens.weight", VOCAB, D),
                                             "input_ids"], ["h0"], name="embed"))
    h = "h0"
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for proj, width in (("q", HQ * E), ("k", HKV * E), ("v", HKV * E)):
            nodes.append(helper.make_node("MatMul", [h, w(f"{p}self_attn.{proj}_proj.weight.T",
                                                          D, width)], [f"{p}{proj}"]))
        nodes.append(helper.make_node("Attention", [f"{p}q", f"{p}k", f"{p}v"], [f"{p}attn"],
                                      q_num_heads=HQ, kv_num_heads=HKV, is_causal=1,
                                      name=f"{p}attention"))
        nodes.append(helper.make_node("MatMul", [f"{p}attn", w(f"{p}self_attn.o_proj.weight.T",
                                                               HQ * E, D)], [f"{p}o"]))
        nodes.append(helper.make_node("Add", [h, f"{p}o"], [f"{p}mid"]))
        nodes.append(helper.make_node("MatMul", [f"{p}mid", w(f"{p}mlp.up_proj.weight.T", D, FF)],
                                      [f"{p}up"]))
        nodes.append(helper.make_node("Sigmoid", [f"{p}up"], [f"{p}sig"]))
        nodes.append(helper.make_node("Mul", [f"{p}up", f"{p}sig"], [f"{p}act"]))
        nodes.append(helper.make_node("MatMul", [f"{p}act", w(f"{p}mlp.down_proj.weight.T", FF,
                                                              D)], [f"{p}down"]))
        nodes.append(helper.make_node("Add", [f"{p}mid", f"{p}down"], [f"{p}out"]))
        h = f"{p}out"
    nodes.append(helper.make_node("MatMul", [h, w("lm_head.weight.T", D, VOCAB)], ["logits"]))
    return save_lm(nodes, inits, path, vocab=VOCAB, name="attention3d", opsets={"": 23},
                   ir_version=10, infer=True)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return _model(tmp_path_factory.mktemp("attn3d") / "model.onnx")


def _run(path, ids):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input_ids": ids})[0]


def test_heads_are_kv_groups_of_the_3d_attention(src):
    result = analyze(import_onnx(src))
    heads = [g for g in result.prunable() if g.kind == "heads"]
    assert [(g.layer, g.units, g.queries_per_unit) for g in heads] == [
        (i, HKV, HQ // HKV) for i in range(LAYERS)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_slim_equals_masked(src, tmp_path, seed):
    result, sel, report, masked_path, slim_path = slim_and_masked(src, seed, tmp_path)
    onnx.checker.check_model(str(slim_path), full_check=True)
    assert report["shape_check"]["checked"]
    by_id = {g.id: g for g in result.groups}
    pruned = {by_id[gid].layer: len(u) for gid, u in sel.items() if by_id[gid].kind == "heads"}
    model = onnx.load(str(slim_path))
    for node in model.graph.node:
        if node.op_type != "Attention":
            continue
        layer = int(node.name.split(".")[2])
        attrs = {a.name: a.i for a in node.attribute}
        kept = HKV - pruned.get(layer, 0)
        assert attrs["kv_num_heads"] == kept and attrs["q_num_heads"] == kept * (HQ // HKV)
    assert any(pruned.values())
    for seq in (5, 9):
        ids = np.random.default_rng(seed + seq).integers(0, VOCAB, (2, seq))
        got, want = _run(slim_path, ids), _run(masked_path, ids)
        assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 1e-5
