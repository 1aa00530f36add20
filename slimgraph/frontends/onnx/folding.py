"""What the importer computes itself: small constants, symbolic shape tensors, shapes.

Small constants (shape tensors, axes, scalars) are kept as python values; a small numpy
evaluator (:func:`fold_constant_node`) folds shape arithmetic over them so that
converters can read Slice bounds and the like.

Dynamic axes. Shape tensors computed at run time from symbolic dims (``Shape`` of a
``[batch, seq, 576]`` value, sliced and concatenated with constants) are folded into
entries that are ints or dim names (``Shape``, ``Slice``, ``Gather``, ``Concat``,
(un)squeeze, cast: ops that move dims; arithmetic on dims is not followed;
:func:`fold_symbolic_shape`). Where the file leaves a dim unknown (no shape recorded, or
ONNX shape inference's ``unk__N``), ``Reshape`` / ``Expand`` / ``Transpose`` / ``MatMul`` /
elementwise outputs are completed from their inputs (:func:`infer_output_shape`), with
products of symbols (``4*batch``, ``slimgraph.ir.symdims``): the opset-18 attention's
keys, reshaped to ``[-1, seq, 64]`` and back, keep their heads.
"""

from __future__ import annotations

import re
from typing import Protocol

import numpy as np
import onnx_ir as ir

from slimgraph.frontends.onnx.nodes import (
    ACTIVATION_OPS, CONST_MAX_ELEMENTS, ELEMENTWISE_OPS, attr_value, normalized_domain,
)
from slimgraph.ir import symdims


class ShapeSource(Protocol):
    """What shape completion reads of the import in progress: the shape of an ONNX value,
    the entries of a shape tensor known at import time, the small constants (by ``id`` of
    the ONNX value). :class:`slimgraph.frontends.onnx.importer.OnnxImporter` is one."""

    consts: dict[int, np.ndarray]

    def shape(self, v: ir.Value | None) -> tuple | None: ...

    def shape_tensor(self, v: ir.Value | None) -> list | None: ...


# -- folding small constants -------------------------------------------------------------


def _np_slice(x, starts, ends, axes=None, steps=None):
    axes = list(range(len(starts))) if axes is None else [int(a) for a in axes]
    steps = [1] * len(starts) if steps is None else [int(s) for s in steps]
    index = [slice(None)] * x.ndim
    for a, s, e, st in zip(axes, starts, ends, steps, strict=True):
        index[a] = slice(int(s), int(e), st)
    return x[tuple(index)]


def _np_squeeze(x, axes=None):
    return np.squeeze(x, axis=tuple(int(a) for a in axes)) if axes is not None else np.squeeze(x)


def _np_unsqueeze(x, axes):
    out = x
    rank = x.ndim + len(axes)
    for a in sorted(int(a) % rank for a in axes):
        out = np.expand_dims(out, a)
    return out


def _np_reshape(x, shape, allowzero=0):
    shape = [int(s) for s in shape]
    if not allowzero:
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


_NP_BINARY = {
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Equal": np.equal,
    "Less": np.less, "Greater": np.greater, "LessOrEqual": np.less_equal,
    "GreaterOrEqual": np.greater_equal, "And": np.logical_and, "Or": np.logical_or,
    "Max": np.maximum, "Min": np.minimum, "Mod": np.mod,
}


def fold_constant_node(node: ir.Node, consts: dict[int, np.ndarray], shape_of) -> list | None:
    """Outputs of ``node`` when it only computes on small constants (shape arithmetic)."""
    if normalized_domain(node.domain) != "" or len(node.outputs) != 1:
        return None
    op = node.op_type
    ins = node.inputs
    if op == "Shape":
        s = shape_of(ins[0]) if ins else None
        if s is None or not all(isinstance(d, int) for d in s):
            return None
        start, end = attr_value(node, "start", 0), attr_value(node, "end", None)
        return [np.asarray(s[start:end], dtype=np.int64)]
    if op == "Size":
        s = shape_of(ins[0]) if ins else None
        if s is None or not all(isinstance(d, int) for d in s):
            return None
        return [np.asarray(int(np.prod(s)), dtype=np.int64)]
    vals = []
    for v in ins:
        if v is None:
            vals.append(None)
        elif id(v) in consts:
            vals.append(consts[id(v)])
        else:
            return None
    if not vals or vals[0] is None:
        return None
    try:
        x = vals[0]
        if op in ("Identity",):
            out = x
        elif op == "Cast":
            out = x.astype(ir.DataType(attr_value(node, "to")).numpy())
        elif op == "CastLike":
            out = x.astype(vals[1].dtype)
        elif op == "Reshape":
            out = _np_reshape(x, vals[1], attr_value(node, "allowzero", 0))
        elif op == "Unsqueeze":
            out = _np_unsqueeze(x, vals[1] if len(vals) > 1 else attr_value(node, "axes"))
        elif op == "Squeeze":
            axes = vals[1] if len(vals) > 1 else attr_value(node, "axes")
            out = _np_squeeze(x, axes)
        elif op == "Concat":
            out = np.concatenate([np.asarray(v) for v in vals], axis=attr_value(node, "axis"))
        elif op == "Gather":
            out = np.take(x, vals[1], axis=attr_value(node, "axis", 0))
        elif op == "Slice":
            out = _np_slice(x, *vals[1:])
        elif op in _NP_BINARY:
            out = _NP_BINARY[op](x, vals[1])
            if op in ("Max", "Min") and len(vals) > 2:
                for v in vals[2:]:
                    out = _NP_BINARY[op](out, v)
        elif op == "Div":
            out = x // vals[1] if np.issubdtype(x.dtype, np.integer) else x / vals[1]
        elif op == "Neg":
            out = -x
        elif op == "Not":
            out = np.logical_not(x)
        elif op == "Where":
            out = np.where(x, vals[1], vals[2])
        elif op == "Range":
            out = np.arange(x, vals[1], vals[2]).astype(x.dtype)
        elif op == "Expand":
            out = x * np.ones([int(d) for d in vals[1]], dtype=x.dtype)
        elif op == "ConstantOfShape":
            a = node.attributes.get("value")
            fill = a.value.numpy().reshape(-1)[0] if a is not None else np.float32(0)
            out = np.full([int(d) for d in x], fill, dtype=np.asarray(fill).dtype)
        else:
            return None
    except Exception:
        return None
    out = np.asarray(out)
    if out.size > CONST_MAX_ELEMENTS:
        return None
    return [out]


# -- shape tensors with symbolic entries, and shapes the file leaves unknown -------------

_SYMBOLIC_OPS = {"Shape", "Identity", "Cast", "Reshape", "Unsqueeze", "Squeeze", "Concat",
                 "Gather", "Slice"}


_FRESH_DIM_RE = re.compile(r"unk__\d+")  # the names ONNX shape inference invents


def is_unknown_dim(d) -> bool:
    """A dim whose size nothing tells: none in the file (``?value:i``), or a fresh name
    from ONNX shape inference, which names every dim it cannot compute."""
    return isinstance(d, str) and (d.startswith("?") or bool(_FRESH_DIM_RE.fullmatch(d)))


def fold_symbolic_shape(node: ir.Node, consts: dict[int, np.ndarray],
                       symbolic: dict[int, np.ndarray], shape_of) -> np.ndarray | None:
    """A shape tensor computed from dynamic dims: ``Shape`` of a value with symbolic
    dims, and the ops that only move its entries (slice, gather, concat, (un)squeeze,
    reshape, cast). Entries are ints and dim names (an object array). Arithmetic on
    dims (``Mul(batch, 4)``) is not followed: such a value stays unknown."""
    if (normalized_domain(node.domain) != "" or len(node.outputs) != 1
            or node.op_type not in _SYMBOLIC_OPS):
        return None
    op, ins = node.op_type, node.inputs
    if op == "Shape":
        s = shape_of(ins[0]) if ins else None
        if s is None:
            return None
        start, end = attr_value(node, "start", 0), attr_value(node, "end", None)
        return np.asarray(list(s)[start:end], dtype=object)
    vals, any_symbolic = [], False
    for k, v in enumerate(ins):
        if v is None:
            vals.append(None)
        elif id(v) in symbolic and (k == 0 or op == "Concat"):  # data, not indices / axes
            vals.append(symbolic[id(v)])
            any_symbolic = True
        elif id(v) in consts:
            vals.append(consts[id(v)].astype(object) if op == "Concat" else consts[id(v)])
        else:
            return None
    if not any_symbolic:
        return None
    x = vals[0]
    try:
        if op == "Identity":
            out = x
        elif op == "Cast":
            if not np.issubdtype(ir.DataType(attr_value(node, "to")).numpy(), np.integer):
                return None
            out = x
        elif op == "Reshape":
            out = x.reshape([int(s) for s in vals[1]])  # 0-D <-> 1-D; no 0 entries here
        elif op == "Unsqueeze":
            out = _np_unsqueeze(x, vals[1] if len(vals) > 1 else attr_value(node, "axes"))
        elif op == "Squeeze":
            out = _np_squeeze(x, vals[1] if len(vals) > 1 else attr_value(node, "axes"))
        elif op == "Concat":
            out = np.concatenate([np.asarray(v, dtype=object) for v in vals],
                                 axis=attr_value(node, "axis"))
        elif op == "Gather":
            out = np.take(x, vals[1], axis=attr_value(node, "axis", 0))
        else:  # Slice
            out = _np_slice(x, *vals[1:])
    except Exception:
        return None
    out = np.asarray(out, dtype=object)
    return out if out.ndim <= 1 else None


def broadcast_dims(shapes: list) -> tuple | None:
    rank = max(len(s) for s in shapes)
    out = []
    for d in range(rank):
        sizes = {s[d - rank + len(s)] for s in shapes if d - rank + len(s) >= 0}
        sizes.discard(1)
        known = {x for x in sizes if not is_unknown_dim(x)}
        if len(known) > 1:
            return None  # e.g. two different symbols: the broadcast size is not known
        out.append(known.pop() if known else (sizes.pop() if sizes else 1))
    return tuple(out)


def infer_output_shape(node: ir.Node, imp: ShapeSource) -> tuple | None:
    """The output shape of a shape-preserving, broadcasting, transposing, reshaping or
    matmul node from its inputs (``None`` where it cannot be told)."""
    op = node.op_type
    shapes = [imp.shape(v) if v is not None else None for v in node.inputs]
    if op == "Reshape":
        x, target = shapes[0], imp.shape_tensor(node.inputs[1])
        if x is None or target is None:
            return None
        allowzero = bool(attr_value(node, "allowzero", 0))
        dims = [x[k] if t == 0 and not allowzero else t for k, t in enumerate(target)]
        if dims.count(-1) > 1:
            return None
        if -1 in dims:
            k = dims.index(-1)
            dims[k] = symdims.divide(symdims.product(x),
                                     symdims.product(d for d in dims if d != -1))
            if dims[k] is None:
                return None
        return tuple(dims)
    if op == "Expand":
        target = imp.shape_tensor(node.inputs[1])
        if shapes[0] is None or target is None:
            return None
        return broadcast_dims([shapes[0], tuple(target)])
    if op in ("Unsqueeze", "Squeeze") and shapes[0] is not None:
        axes = (imp.consts.get(id(node.inputs[1])) if len(node.inputs) > 1
                else attr_value(node, "axes"))
        if axes is None:
            return None
        rank = len(shapes[0])
        axes = [int(a) for a in np.reshape(axes, -1)]
        if op == "Squeeze":
            axes = [a + rank if a < 0 else a for a in axes]
            if any(shapes[0][a] != 1 for a in axes):
                return None
            return tuple(d for k, d in enumerate(shapes[0]) if k not in axes)
        out = list(shapes[0])
        for a in sorted(a + rank + len(axes) if a < 0 else a for a in axes):
            out.insert(a, 1)
        return tuple(out)
    if op == "Transpose":
        x = shapes[0]
        if x is None:
            return None
        perm = attr_value(node, "perm") or list(range(len(x)))[::-1]
        return tuple(x[p] for p in perm)
    if op == "MatMul":
        a, b = shapes[0], shapes[1]
        if a is None or b is None or len(a) < 2 or len(b) < 2:
            return None
        batch = broadcast_dims([a[:-2], b[:-2]]) if len(a) > 2 or len(b) > 2 else ()
        return None if batch is None else (*batch, a[-2], b[-1])
    if op in _SAME_SHAPE:
        return shapes[0]
    if op in ELEMENTWISE_OPS or op in ACTIVATION_OPS:
        known = [s for s in shapes if s is not None]
        if len(known) != len([v for v in node.inputs if v is not None]) or not known:
            return None
        return broadcast_dims(known)
    return None


_SAME_SHAPE = {"Softmax", "LogSoftmax", "Cast", "CastLike", "Identity", "Dropout"}
