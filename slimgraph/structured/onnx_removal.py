"""Physically remove selected units from a model that exists only as an ONNX file.

    slimgraph compile model.onnx -p "prune-structured{mlp=0.5},export-onnx" -o OUT

The imported IR (``slimgraph.frontends.onnx_import``) holds every weight as an
:class:`~slimgraph.frontends.onnx_import.OnnxParamHandle`; slicing a member through its
handle slices the ``onnx_ir`` initializer it is stored in (transposed storage, e.g. a
MatMul ``B`` of ``[K, N]`` or a ``Gemm`` with ``transB``, included): the slicing is
:func:`~slimgraph.structured.unit_slicing.slice_units`, the same code that slices a
PyTorch model's module parameters.

What the weights do not carry is rewritten from the analysis: the new shape of every
ONNX value, and with it the rewrites removal needs (planned in
:mod:`slimgraph.structured.onnx_removal_plan`): constant target shapes of ``Reshape`` /
``Expand`` / ``ConstantOfShape`` (also those computed at run time by a ``Concat`` of
constants and dims read by ``Shape``), ``Split`` sizes, head counts of ``Attention`` /
``RotaryEmbedding`` and of ONNX Runtime's fused attention (whose packed QKV weight and
bias are sliced per section like any parameter), and the shapes recorded on values
(``value_info``).

A node that would need a rewrite removal does not know (a size computed by shape
arithmetic such as ``Mul(batch, 4)`` or ``Add``, a constant behind another op, a
``num_heads`` attribute of another contrib op) is refused before anything is changed,
naming the node and the group. ``prune-structured{heads=...}`` also refuses, naming the
node, a com.microsoft attention node the importer left a barrier (KV cache, per-head
attention bias, ops such as ``PackedAttention`` or ``DecoderMaskedMultiHeadAttention``):
see :func:`check_contrib_attention`. Afterwards the modified model is checked with
ONNX shape inference on a copy whose recorded shapes are cleared: every re-inferred
static dim must equal the new shape predicted by the analysis, else the pass fails
(no file is written; the input file is never touched -- the model is in memory).

Hidden (residual) channels: the means and norms over the shrinking dim are corrected
(:mod:`slimgraph.structured.onnx_norms`: a ``Mul`` by ``D'/D`` after a decomposed norm's
``ReduceMean``, ALGORITHMS.md's gain and epsilon correction on a fused RMS norm), so the
slim model equals the masked one; a LayerNorm's changed mean is recorded as an
approximation in the notes. Not supported on ONNX input: importance=act.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from slimgraph.errors import PipelineError
from slimgraph.ir.dependency import DependencyResult
from slimgraph.structured.onnx_norms import apply_statistics, plan_statistics
from slimgraph.structured.onnx_removal_plan import RemovalPlan, constant_value
from slimgraph.structured.unit_slicing import slice_units

# the other names this module had before the plan moved to onnx_removal_plan
from slimgraph.structured.onnx_removal_plan import CONTRIB_ATTENTION, SHAPE_INPUT  # noqa: F401

# every com.microsoft attention op: those not in CONTRIB_ATTENTION are never described
_ANY_CONTRIB_ATTENTION = {
    "Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention",
    "PackedMultiHeadAttention", "DecoderMaskedMultiHeadAttention",
    "DecoderMaskedSelfAttention", "SparseAttention", "LongformerAttention", "QAttention",
    "PagedAttention", "DecoderAttention", "QOrderedAttention", "RelativePositionBias",
    "GatedRelativePositionBias",
}


def check_contrib_attention(graph) -> None:
    """Heads removal on an ONNX model: refuse (naming the node) every com.microsoft
    attention node the importer could not describe (a KV cache, a per-head bias, an op
    without a converter), rather than prune only the layers it could."""
    for node in graph.nodes:
        domain = node.meta.get("domain", "")
        op = node.op.rsplit(".", 1)[-1]
        if domain != "com.microsoft" or op not in _ANY_CONTRIB_ATTENTION:
            continue
        if node.kind.value == "unknown":
            why = node.attrs.get("why") or "no converter for this op"
            raise PipelineError(
                f"option 'heads': ONNX node {node.name!r} ({node.op}) "
                f"is not supported for head removal: {why} (supported: com.microsoft "
                "Attention / MultiHeadAttention / GroupQueryAttention without a KV cache or "
                "a per-head attention bias)")


def check_selection(result: DependencyResult, selection: dict[int, list[int]]) -> None:
    """Refuse what ONNX removal does not support, before anything is changed."""
    by_id = {g.id: g for g in result.groups}
    for gid, units in selection.items():
        g = by_id[gid]
        if units and g.kind not in ("mlp", "heads", "qheads", "hidden"):
            raise PipelineError(
                f"removing {g.kind} units ({RemovalPlan.label(g)}) is not "
                "supported for ONNX input (only mlp channels, attention heads / KV-groups and "
                "hidden channels)")


def remove_units_onnx(result: DependencyResult, selection: dict[int, list[int]]) -> dict[str, Any]:
    """Slice the selected units out of the ``onnx_ir`` model behind ``result.graph``;
    rewrite the shape constants and recorded shapes; verify with shape inference."""
    import onnx_ir as ir

    check_selection(result, selection)
    graph = result.graph
    plan = RemovalPlan(result, selection)
    plan.shapes()
    plan.nodes()  # every refusal happens here, before anything is written
    try:
        stats = plan_statistics(plan)
    except PipelineError as e:
        raise PipelineError(f"{e}") from None
    before = graph.num_parameters()
    report: dict[str, Any] = {"removed_units": slice_units(result, selection),
                              "module_attrs": {}, "notes": [], "input": "onnx",
                              "onnx_rewrites": []}
    model = plan.model
    g = model.graph
    taken = set(g.initializers) | {o.name for n in g for o in n.outputs} | \
        {v.name for v in g.inputs}
    stale = []
    for node, i, old, new in plan.rewrites:
        old_v = node.inputs[i]
        name = _fresh(f"{node.name or node.op_type}_shape", taken)
        value = ir.Value(name=name, shape=ir.Shape(new.shape), type=ir.TensorType(
            ir.DataType.from_numpy(new.dtype)), const_value=ir.Tensor(new, name=name))
        g.register_initializer(value)
        node.replace_input_with(i, value)
        stale.append(old_v)
        report["onnx_rewrites"].append({"node": node.name, "op": node.op_type, "input": i,
                                        "old": old.tolist(), "new": new.tolist()})
    clones: dict[tuple, Any] = {}  # (Concat, new pieces) -> the output of its rewritten copy
    for node, i, concat, changed in plan.concat_rewrites:
        key = (id(concat), tuple((k, tuple(a.tolist())) for k, a in sorted(changed.items())))
        if key not in clones:
            inputs = list(concat.inputs)
            for k, arr in changed.items():
                name = _fresh(f"{concat.name or 'Concat'}_part{k}", taken)
                inputs[k] = ir.Value(name=name, shape=ir.Shape(arr.shape),
                                     type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)),
                                     const_value=ir.Tensor(arr, name=name))
                g.register_initializer(inputs[k])
            out_v = concat.outputs[0]
            name = _fresh(f"{out_v.name}_slim", taken)
            clone = ir.Node("", "Concat", inputs, attributes=[ir.AttrInt64("axis", 0)],
                            outputs=[ir.Value(name=name, shape=out_v.shape, type=out_v.type)],
                            name=_fresh(f"{concat.name or 'Concat'}_slim", taken))
            g.insert_before(node, clone)
            clones[key] = clone.outputs[0]
        stale.append(node.inputs[i])
        old_arr = {k: constant_value(concat.inputs[k]).reshape(-1).tolist() for k in changed}
        node.replace_input_with(i, clones[key])
        report["onnx_rewrites"].append({
            "node": node.name, "op": node.op_type, "input": i, "concat": concat.name,
            "old": old_arr, "new": {k: a.tolist() for k, a in changed.items()}})
    for node, old, sizes in plan.split_rewrites:
        arr = np.asarray(sizes, dtype=np.int64)
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            name = _fresh(f"{node.name or 'Split'}_sizes", taken)
            value = ir.Value(name=name, shape=ir.Shape(arr.shape),
                             type=ir.TensorType(ir.DataType.INT64),
                             const_value=ir.Tensor(arr, name=name))
            g.register_initializer(value)
            stale.append(node.inputs[1])
            node.replace_input_with(1, value)
        elif "split" in node.attributes or plan.model.opset_imports.get("", 13) < 13:
            node.attributes["split"] = ir.AttrInt64s("split", sizes)
        else:
            name = _fresh(f"{node.name or 'Split'}_sizes", taken)
            value = ir.Value(name=name, shape=ir.Shape(arr.shape),
                             type=ir.TensorType(ir.DataType.INT64),
                             const_value=ir.Tensor(arr, name=name))
            g.register_initializer(value)
            node.resize_inputs(2)
            node.replace_input_with(1, value)
            node.attributes.pop("num_outputs", None)
        report["onnx_rewrites"].append({"node": node.name, "op": "Split", "old": old,
                                        "new": sizes})
    for node, attr, old, new in plan.attr_rewrites:
        node.attributes[attr] = ir.AttrInt64(attr, new)
        report["onnx_rewrites"].append({"node": node.name, "op": node.op_type, "attribute": attr,
                                        "old": old, "new": new})
    for node, attr, old, new in plan.list_rewrites:
        node.attributes[attr] = ir.AttrInt64s(attr, new)
        report["onnx_rewrites"].append({"node": node.name, "op": node.op_type, "attribute": attr,
                                        "old": old, "new": new})
    report["onnx_rewrites"].extend(apply_statistics(stats, graph, model, taken, _fresh))
    report["notes"].extend(stats.notes)
    for v in {id(v): v for v in stale}.values():  # shape constants no longer used by anything
        if v.uses() or v in g.outputs:
            continue
        if v.name in g.initializers and v not in g.inputs:
            g.initializers.pop(v.name)
        elif v.producer() is not None and v.producer().op_type == "Constant":
            g.remove(v.producer(), safe=True)
        elif v.producer() is not None and v.producer().op_type == "Concat":
            concat = v.producer()
            parts = list(concat.inputs)
            g.remove(concat, safe=True)
            for p in parts:  # its constant pieces, when nothing else reads them
                if p is not None and not p.uses() and p.name in g.initializers \
                        and p not in g.inputs and p not in g.outputs:
                    g.initializers.pop(p.name)
    # recorded shapes: only the changed static dims
    values = {v.name: v for v in g.inputs}
    values.update((o.name, o) for n in g for o in n.outputs if o.name)
    for name, new in plan.new_shape.items():
        v = values.get(name)
        if v is None or v.shape is None:
            continue
        if v in g.outputs or v in g.inputs:
            raise PipelineError(f"removal would change the shape of the "
                                f"model {'output' if v in g.outputs else 'input'} {name!r}")
        dims = [new[d] if isinstance(new[d], int) and isinstance(v.shape[d], int) else v.shape[d]
                for d in range(len(new))]
        v.shape = ir.Shape(dims)
    report["shape_check"] = verify_shapes(model, plan.new_shape)
    graph.onnx_modified = True
    report["params_before"] = before
    report["params_after"] = graph.num_parameters()
    return report


def _fresh(base: str, taken: set[str]) -> str:
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


def _shape_only_proto(model, inline: int = 1024):
    """``model`` serialized without the data of its large initializers (over ``inline``
    elements; written as references to external data that does not exist): shape
    inference needs their types and shapes only, and the small ones (shape tensors) stay
    for data propagation. No weight is copied, so any model size can be checked."""
    import onnx_ir as ir

    swapped = []
    try:
        for v in model.graph.initializers.values():
            t = v.const_value
            if t is None or t.size <= inline:
                continue
            swapped.append((v, t))
            v.const_value = ir.ExternalTensor("slimgraph-shape-check.none", 0, t.nbytes, t.dtype,
                                              shape=t.shape, name=t.name or v.name)
        return ir.serde.serialize_model(model)
    finally:
        for v, t in swapped:
            v.const_value = t


def verify_shapes(model, expected: dict[str, tuple]) -> dict[str, Any]:
    """Re-infer every intermediate shape of ``model`` (a serialized copy with the
    recorded shapes dropped) and compare with the shapes the analysis predicts."""
    import onnx

    proto = _shape_only_proto(model)
    del proto.graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True,
                                                     data_prop=True)
        strict = True
    except Exception as e:  # strict mode also trips on ops without schemas (contrib)
        try:
            inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
        except Exception:
            raise PipelineError(f"ONNX shape inference fails on the slimmed "
                                f"model: {str(e).strip().splitlines()[0]}") from e
        strict = False
    seen = {vi.name: vi for vi in inferred.graph.value_info}
    seen.update((vi.name, vi) for vi in inferred.graph.output)
    producer = {o: n for n in inferred.graph.node for o in n.output}
    checked = 0
    for name, want in expected.items():
        vi = seen.get(name)
        if vi is None or not vi.type.HasField("tensor_type") or \
                not vi.type.tensor_type.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None
                for d in vi.type.tensor_type.shape.dim]
        if len(dims) != len(want):
            continue
        for d, w in zip(dims, want):
            if d is not None and isinstance(w, int) and d != w:
                n = producer.get(name)
                raise PipelineError(
                    f"after removal ONNX shape inference gives {dims} for "
                    f"{name!r} (node {n.name if n else '?'!r}, {n.op_type if n else '?'}), the "
                    f"analysis expects {list(want)}: the node encodes a size that removal "
                    "does not rewrite")
        checked += 1
    return {"checked": True, "strict": strict, "values_compared": checked}
