"""Shared, fast input gathers of permuted linears in ONNX (sparsity/onnx_gathers.py)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from slimgraph.sparsity.onnx_gathers import gather_input, last_axis_gathers, rewrite_input_gathers

D = 8


def _model() -> onnx.ModelProto:
    """x [b, s, 8] read by three permuted linears (two with the same permutation, stored
    twice), an embedding lookup (Gather on axis 0) and a Gather that picks a subset."""
    rng = np.random.default_rng(0)
    p1, p2 = rng.permutation(D), rng.permutation(D)
    inits = [numpy_helper.from_array(rng.standard_normal((D, 4)).astype(np.float32), f"w{i}")
             for i in range(3)]
    inits += [numpy_helper.from_array(p1.astype(np.int64), "p1a"),
              numpy_helper.from_array(p1.astype(np.int64), "p1b"),
              numpy_helper.from_array(p2.astype(np.int64), "p2"),
              numpy_helper.from_array(np.array([0, 2, 4, 6], dtype=np.int64), "half"),
              numpy_helper.from_array(rng.standard_normal((10, D)).astype(np.float32), "table")]
    nodes = [helper.make_node("Gather", ["x", "p1a"], ["xa"], axis=-1, name="ga"),
             helper.make_node("MatMul", ["xa", "w0"], ["y0"], name="m0"),
             helper.make_node("Gather", ["x", "p1b"], ["xb"], axis=2, name="gb"),
             helper.make_node("MatMul", ["xb", "w1"], ["y1"], name="m1"),
             helper.make_node("Gather", ["x", "p2"], ["xc"], axis=-1, name="gc"),
             helper.make_node("MatMul", ["xc", "w2"], ["y2"], name="m2"),
             helper.make_node("Gather", ["x", "half"], ["y3"], axis=-1, name="gd"),
             helper.make_node("Gather", ["table", "ids"], ["y4"], axis=0, name="emb")]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", D]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["b", "s", k])
         for i, k in enumerate((4, 4, 4, 4, D))],
        inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def test_rewrite_shares_and_keeps_outputs():
    proto = _model()
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 5, D)).astype(np.float32),
             "ids": np.array([[1, 2, 3, 4, 5], [0, 9, 8, 7, 6]], dtype=np.int64)}
    want = _run(proto, feeds)
    model = ir.serde.deserialize_model(proto)
    assert len(last_axis_gathers(model.graph)) == 3  # not the subset, not the embedding
    assert rewrite_input_gathers(model) == {"gathers": 3, "shared": 2}
    out = ir.serde.serialize_model(model)
    onnx.checker.check_model(out, full_check=True)
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("GatherElements") == 2 and ops.count("Gather") == 2  # subset, embedding
    kept = {i.name for i in out.graph.initializer}
    assert not kept & {"p1a", "p1b", "p2"}  # the int64 index tensors went with their nodes
    got = _run(out, feeds)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    assert rewrite_input_gathers(model) == {"gathers": 0, "shared": 0}  # idempotent


def test_gather_input_reuses_and_keeps_topological_order():
    """A gather made for a later reader is moved before an earlier one that reuses it."""
    proto = _model()
    model = ir.serde.deserialize_model(proto)
    graph = model.graph
    x = graph.inputs[0]
    perm = np.arange(D)[::-1].copy()
    m0, m2 = graph.node("m0"), graph.node("m2")
    late = gather_input(graph, x, perm, m2, "late")
    early = gather_input(graph, x, perm, m0, "early")
    assert early is late
    order = {n.name: k for k, n in enumerate(graph)}
    assert order[late.producer().name] < order["m0"]
    assert sum(n.op_type == "GatherElements" for n in graph) == 1
    m0.replace_input_with(0, early)
    m2.replace_input_with(0, late)
    out = ir.serde.serialize_model(model)
    onnx.checker.check_model(out, full_check=True)
    feeds = {"x": np.random.default_rng(2).standard_normal((1, 3, D)).astype(np.float32),
             "ids": np.zeros((1, 3), dtype=np.int64)}
    y0, y2 = _run(out, feeds)[0], _run(out, feeds)[2]
    w = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    np.testing.assert_allclose(y0, feeds["x"][..., perm] @ w["w0"], rtol=1e-6)
    np.testing.assert_allclose(y2, feeds["x"][..., perm] @ w["w2"], rtol=1e-6)
