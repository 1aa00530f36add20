"""Statistics over removed channels on an ONNX model: means and norms that must be corrected.

Removing hidden (residual) channels shrinks the dim that normalizations average over.
The masked model (the units zeroed) averages over all ``D`` channels, zeros included; the
slim model over the ``D' < D`` that are left. For every node that reduces over a dim
that shrinks (:func:`plan_statistics`, before anything is changed; :func:`apply_statistics`
after the weights are sliced):

- ``ReduceMean`` (a decomposed RMSNorm: ``Pow -> ReduceMean -> Add(eps) -> Sqrt``, as in
  torch's opset-18 exports): a ``Mul`` by ``D'/D`` after it, so it computes ``sum / D``
  as the masked model does -- exact whatever follows (epsilon, gains untouched); but a
  decomposed LayerNorm's variance (``ReduceMean((x - ReduceMean(x))^2)``) is not: the
  removed channels were ``-mean`` there, not zero; noted as approximate;
- fused RMS norms (``RMSNormalization``, ``SimplifiedLayerNormalization``, com.microsoft
  ``SkipSimplifiedLayerNormalization``): ALGORITHMS.md's correction, the gains times
  ``sqrt(D/D')`` and ``epsilon`` times ``D/D'`` -- exact;
- ``LayerNormalization`` / com.microsoft ``SkipLayerNormalization``: their mean moves
  too, so the slim model only approximates the masked one; recorded in the report's
  notes (as the PyTorch path does);
- ``ReduceSum`` / ``ReduceSumSquare`` / ``ReduceL1`` / ``ReduceL2`` are exact as they are
  (zeros add nothing); any other reduction over a shrinking dim (``ReduceMax``,
  ``ReduceLogSumExp``, ...) is refused, naming the node.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from slimgraph.errors import PipelineError
from slimgraph.structured.onnx_removal_plan import constant_value

EXACT_REDUCTIONS = {"ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2"}
OTHER_REDUCTIONS = {"ReduceMax", "ReduceMin", "ReduceProd", "ReduceLogSum", "ReduceLogSumExp"}
# op -> index of the gain input
RMS_NORMS = {"RMSNormalization": 1, "SimplifiedLayerNormalization": 1,
             "com.microsoft.SimplifiedLayerNormalization": 1,
             "com.microsoft.SkipSimplifiedLayerNormalization": 2}
LAYER_NORMS = {"LayerNormalization", "com.microsoft.SkipLayerNormalization"}


@dataclass
class Corrections:
    means: list[tuple[Any, float]] = field(default_factory=list)  # ReduceMean node, D'/D
    norms: list[tuple[Any, int, float, float]] = field(default_factory=list)  # node, gain
    # input, D/D', epsilon before
    notes: list[str] = field(default_factory=list)


def _op(node) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"


def _reduce_axes(node, rank: int) -> list[int] | None:
    """The axes a Reduce* node reduces (None: a non-constant axes input)."""
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        arr = constant_value(node.inputs[1])
        if arr is None:
            return None
        axes = [int(a) for a in arr.reshape(-1)]
    elif "axes" in node.attributes:
        axes = [int(a) for a in node.attributes["axes"].value]
    else:
        axes = []
    if not axes:
        noop = node.attributes.get("noop_with_empty_axes")
        return [] if noop is not None and noop.value else list(range(rank))
    return [a % rank for a in axes]


def _norm_axes(node, rank: int) -> list[int]:
    attr = node.attributes.get("axis")
    axis = -1 if attr is None or _op(node).startswith("com.microsoft.Skip") else int(attr.value)
    return list(range(axis % rank, rank))


def _epsilon(node) -> float:
    attr = node.attributes.get("epsilon")
    if attr is not None:
        return float(attr.value)
    if node.domain in ("", "ai.onnx"):
        import onnx

        schema = onnx.defs.get_schema(node.op_type, domain="")
        return float(onnx.helper.get_attribute_value(schema.attributes["epsilon"].default_value))
    raise PipelineError(f"ONNX node {node.name!r} ({_op(node)}) has no epsilon attribute; its "
                        "default is unknown, so the norm correction cannot be written")


def _mean_centered(v, depth: int = 3) -> bool:
    """Is ``v`` (through Pow / Mul / Cast) ``x - ReduceMean(x)``: a decomposed LayerNorm's
    variance input? Its removed channels were ``-mean`` in the masked model, not zero."""
    while depth and v is not None and v.producer() is not None:
        p = v.producer()
        if p.op_type == "Sub":
            return any(i is not None and i.producer() is not None
                       and i.producer().op_type == "ReduceMean" for i in p.inputs[1:2])
        if p.op_type not in ("Pow", "Mul", "Cast"):
            return False
        v, depth = p.inputs[0], depth - 1
    return False


def plan_statistics(plan) -> Corrections:
    """Every node of ``plan.model`` that reduces over a dim that ``plan`` shrinks, and
    what it needs (see the module docstring); refusals name the node."""
    out = Corrections()
    for node in plan.model.graph:
        op = _op(node)
        if not node.inputs or node.inputs[0] is None:
            continue
        x = node.inputs[0]
        new, old = plan.new_shape.get(x.name), plan.old_shape.get(x.name)
        if new is None:
            continue
        if op in RMS_NORMS or op in LAYER_NORMS:
            axes = _norm_axes(node, len(old))
        elif op == "ReduceMean" or op in EXACT_REDUCTIONS or op in OTHER_REDUCTIONS:
            axes = _reduce_axes(node, len(old))
            if axes is None:
                raise PipelineError(f"{plan.group_of.get(x.name, 'a group')}: ONNX node "
                                    f"{node.name!r} ({op}) reduces over axes that are not "
                                    "constant")
        else:
            continue
        shrunk = [a for a in axes if new[a] != old[a]]
        if not shrunk or op in EXACT_REDUCTIONS:
            continue
        where = f"{plan.group_of.get(x.name, 'a group')}: ONNX node {node.name!r} ({op})"
        if any(not isinstance(old[a], int) for a in axes):
            raise PipelineError(f"{where} reduces over a dynamic dim and a removed one")
        d = math.prod(old[a] for a in axes)
        d_kept = math.prod(new[a] for a in axes)
        if op == "ReduceMean":
            if node.outputs[0] in plan.model.graph.outputs:
                raise PipelineError(f"{where}: its mean is a model output")
            out.means.append((node, d_kept / d))
            if _mean_centered(x):
                out.notes.append(
                    f"{node.name}: the variance of a decomposed LayerNorm (the mean is "
                    f"subtracted first) now spans {d_kept} instead of {d} channels; the slim "
                    "model approximates the masked model")
        elif op in RMS_NORMS:
            out.norms.append((node, RMS_NORMS[op], d / d_kept, _epsilon(node)))
        elif op in LAYER_NORMS:
            out.notes.append(f"{node.name}: LayerNorm statistics now span {d_kept} instead of "
                             f"{d} channels; the slim model approximates the masked model "
                             "(its mean changes)")
        else:
            raise PipelineError(f"{where} reduces over removed channels; the slim model would "
                                "differ from the masked one (only means, sums and norms are "
                                "corrected)")
    return out


def apply_statistics(corr: Corrections, graph, model, taken: set[str], fresh) -> list[dict]:
    """Write the corrections into ``model`` (after the weights were sliced); ``graph``
    is the IR (its parameter handles scale the gains). Returns report entries."""
    import onnx_ir as ir

    g = model.graph
    done: list[dict] = []
    for node, ratio in corr.means:
        out = node.outputs[0]
        dtype = out.dtype or ir.DataType.FLOAT
        name = fresh(f"{node.name or 'ReduceMean'}_kept_ratio", taken)
        factor = ir.Value(name=name, shape=ir.Shape([]), type=ir.TensorType(dtype),
                          const_value=ir.Tensor(np.asarray(ratio, dtype=dtype.numpy()),
                                                name=name))
        g.register_initializer(factor)
        scaled = ir.Value(name=fresh(f"{out.name}_scaled", taken), shape=out.shape,
                          type=out.type)
        for user, i in list(out.uses()):
            user.replace_input_with(i, scaled)
        mul = ir.Node("", "Mul", [out, factor], outputs=[scaled],
                      name=fresh(f"{node.name or 'ReduceMean'}_kept_ratio_mul", taken))
        g.insert_after(node, mul)
        done.append({"node": node.name, "op": "ReduceMean", "scaled_by": ratio})
    by_storage = {}
    for p in graph.params.values():
        for storage_name in getattr(p.param, "onnx_names", []):
            by_storage[storage_name] = p.param
    scaled_handles: set[int] = set()
    for node, gain_input, ratio, eps in corr.norms:
        gain = node.inputs[gain_input]
        handle = by_storage.get(gain.name) if gain is not None else None
        if handle is None:
            raise PipelineError(f"ONNX node {node.name!r} ({_op(node)}): its gain is not a stored "
                                "weight; the norm correction cannot be written")
        if id(handle) not in scaled_handles:
            handle.write(handle.read() * math.sqrt(ratio))
            scaled_handles.add(id(handle))
        node.attributes["epsilon"] = ir.AttrFloat32("epsilon", eps * ratio)
        done.append({"node": node.name, "op": _op(node), "gain_scaled_by": math.sqrt(ratio),
                     "epsilon": [eps, eps * ratio]})
    return done
