"""Hand-built token-in, logits-out ONNX models for the ONNX tests: the common wrapping."""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper


def save_lm(nodes, inits, path, *, vocab: int, name: str, opsets: dict[str, int],
            ir_version: int | None = None, infer: bool = False):
    """Wrap ``nodes`` / ``inits`` as a model with ``input_ids [batch, seq]`` in and
    ``logits [batch, seq, vocab]`` out (opsets by domain), check it and save it."""
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", vocab])],
        inits)
    kwargs = {"ir_version": ir_version} if ir_version is not None else {}
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v)
                                                    for d, v in opsets.items()], **kwargs)
    if infer:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
