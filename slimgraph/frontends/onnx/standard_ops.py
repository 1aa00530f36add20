"""Converters for standard (``ai.onnx``) ops.

Each turns a node into a normalized ``OpKind`` with normalized attributes: a ``MatMul``
or ``Gemm`` whose weight is a parameter is a LINEAR (``w_in`` / ``w_out`` name the dims
of the original weight, however it is stored), norms, reductions, ``Gather`` of a table
(an EMBEDDING), shape ops with their constant inputs kept as attributes, ``Slice`` with
constant bounds, opset-23 ``Attention``. ``RotaryEmbedding`` (opset 23) is emitted as what
it does to channels (the rotated halves swapped and combined elementwise), so heads pass
through it. An input that does not fit a converter's assumptions makes it raise
``UnsupportedNode``: the node becomes a barrier, never a guess.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from slimgraph.frontends.onnx.context import (
    ConversionContext, Converted, UnsupportedNode, record_output_shape,
)
from slimgraph.frontends.onnx.nodes import as_python, dtype_name
from slimgraph.ir.graph import OpKind, Value


def all_inputs_as(kind: OpKind) -> Callable[[ConversionContext], Converted]:
    def conv(ctx: ConversionContext) -> Converted:
        return kind, ctx.all_inputs(), {}

    return conv


def first_input_as(kind: OpKind) -> Callable[[ConversionContext], Converted]:
    def conv(ctx: ConversionContext) -> Converted:
        return kind, [ctx.inp(0)], {}

    return conv


def with_const_input_as(kind: OpKind, attr: str) -> Callable[[ConversionContext], Converted]:
    """``kind`` on input 0; the constant input 1 (a target shape, axes) kept as ``attr``."""

    def conv(ctx: ConversionContext) -> Converted:
        c = ctx.const(1) if ctx.n_inputs > 1 else None
        if c is None and ctx.attr(attr) is not None:  # older opsets: an attribute
            c = np.asarray(ctx.attr(attr))
        return kind, [ctx.inp(0)], ({attr: as_python(c)} if c is not None else {})

    return conv


def linear_attrs(w: Value, perm: tuple[int, ...], transposed: bool) -> dict[str, int]:
    """dims of the original ``w`` that hold input (K) and output (N) channels."""
    k, n = (1, 0) if transposed else (0, 1)
    return {"w_in": perm[k], "w_out": perm[n]}


def convert_matmul(ctx: ConversionContext) -> Converted:
    a = ctx.inp(0)
    p = ctx.param_at(1)
    if p is not None and p[0].rank == 2 and (ctx.rank(0) or 0) >= 1:
        w, perm = p
        return OpKind.LINEAR, [a, w], linear_attrs(w, perm, False)
    return OpKind.MATMUL, [a, ctx.inp(1)], {}


def convert_gemm(ctx: ConversionContext) -> Converted:
    if ctx.attr("transA", 0):
        raise UnsupportedNode("Gemm with transA")
    trans_b = bool(ctx.attr("transB", 0))
    a = ctx.inp(0)
    c = ctx.inp(2) if ctx.n_inputs > 2 else None
    p = ctx.param_at(1)
    if p is None or p[0].rank != 2:
        if trans_b or c is not None:
            raise UnsupportedNode("Gemm without a weight parameter")
        return OpKind.MATMUL, [a, ctx.inp(1)], {}
    w, perm = p
    attrs = linear_attrs(w, perm, trans_b)
    if c is None or c.rank == 1:
        return OpKind.LINEAR, [a, w, c], attrs
    out = ctx.node.outputs[0]
    y = ctx.emit(OpKind.LINEAR, [a, w], ctx.out_shape(0), dtype_name(out.dtype), attrs)
    return OpKind.ELEMENTWISE, [y, c], {}


def norm_converter(stat: str, n_params: int) -> Callable[[ConversionContext], Converted]:
    def conv(ctx: ConversionContext) -> Converted:
        rank = ctx.rank(0)
        if rank is None:
            raise UnsupportedNode("input rank unknown")
        axis = ctx.attr("axis", -1)
        axis = axis + rank if axis < 0 else axis
        axes = list(range(axis - rank, 0))
        ins = [ctx.inp(0)] + [ctx.inp(i) for i in range(1, 1 + n_params)]
        return OpKind.NORM, ins, {"axes": axes, "stat": stat}

    return conv


def reduction_converter(op: str) -> Callable[[ConversionContext], Converted]:
    def conv(ctx: ConversionContext) -> Converted:
        keep = bool(ctx.attr("keepdims", 1))
        axes = ctx.attr("axes")
        if axes is None and ctx.n_inputs > 1 and ctx.node.inputs[1] is not None:
            c = ctx.const(1)
            if c is None:
                raise UnsupportedNode("reduction axes are not constant")
            axes = c.reshape(-1).tolist()
        axes = list(axes) if axes is not None else []
        if not axes:
            if ctx.attr("noop_with_empty_axes", 0):
                return OpKind.IDENTITY, [ctx.inp(0)], {}
            axes = None
        return OpKind.REDUCTION, [ctx.inp(0)], {"axes": axes, "keepdim": keep, "op": op}

    return conv


def arg_reduction_converter(op: str) -> Callable[[ConversionContext], Converted]:
    def conv(ctx: ConversionContext) -> Converted:
        keep = bool(ctx.attr("keepdims", 1))
        return OpKind.REDUCTION, [ctx.inp(0)], {"axes": [ctx.attr("axis", 0)], "keepdim": keep,
                                                "op": op}

    return conv


def convert_softmax(ctx: ConversionContext) -> Converted:
    rank = ctx.rank(0)
    axis = ctx.attr("axis", -1 if ctx.imp.opset >= 13 else 1)
    if ctx.imp.opset < 13 and rank is not None and (axis % max(rank, 1)) != rank - 1:
        raise UnsupportedNode("opset < 13 softmax flattens to 2-D")
    return OpKind.SOFTMAX, [ctx.inp(0)], {"axis": axis}


def convert_gather(ctx: ConversionContext) -> Converted:
    axis = ctx.attr("axis", 0)
    p = ctx.param_at(0)
    rank_idx = ctx.rank(1)
    if p is not None and axis % 2 == 0 and p[0].rank == 2 and p[1] == (0, 1):
        return OpKind.EMBEDDING, [p[0], ctx.inp(1)], {}
    c = ctx.const(1)
    if rank_idx == 0 and c is not None:
        return OpKind.SELECT, [ctx.inp(0)], {"axis": axis}
    raise UnsupportedNode("gather with non-scalar indices")


def convert_transpose(ctx: ConversionContext) -> Converted:
    rank = ctx.rank(0)
    perm = ctx.attr("perm")
    if perm is None:
        if rank is None:
            raise UnsupportedNode("rank unknown")
        perm = list(range(rank))[::-1]
    return OpKind.TRANSPOSE, [ctx.inp(0)], {"perm": [int(p) for p in perm]}


def convert_concat(ctx: ConversionContext) -> Converted:
    return OpKind.CONCAT, ctx.all_inputs(), {"axis": ctx.attr("axis")}


def convert_split(ctx: ConversionContext) -> Converted:
    axis = ctx.attr("axis", 0)
    shape = ctx.in_shape(0)
    if shape is None:
        raise UnsupportedNode("shape unknown")
    sizes = None
    c = ctx.const(1) if ctx.n_inputs > 1 and ctx.node.inputs[1] is not None else None
    if c is not None:
        sizes = [int(x) for x in c.reshape(-1)]
    elif ctx.attr("split") is not None:
        sizes = [int(x) for x in ctx.attr("split")]
    else:
        outs = [ctx.out_shape(i) for i in range(len(ctx.node.outputs))]
        if all(o is not None and isinstance(o[axis], int) for o in outs):
            sizes = [o[axis] for o in outs]
    if sizes is None or len(sizes) != len(ctx.node.outputs):
        raise UnsupportedNode("split sizes unknown")
    return OpKind.SPLIT, [ctx.inp(0)], {"axis": axis, "sizes": sizes}


def convert_slice(ctx: ConversionContext) -> Converted:
    shape = ctx.in_shape(0)
    if shape is None:
        raise UnsupportedNode("shape unknown")
    if ctx.imp.opset < 10:
        starts, ends, axes = ctx.attr("starts"), ctx.attr("ends"), ctx.attr("axes")
        steps = None
    else:
        starts, ends = ctx.const(1), ctx.const(2)
        axes = ctx.const(3) if ctx.n_inputs > 3 and ctx.node.inputs[3] is not None else None
        steps = ctx.const(4) if ctx.n_inputs > 4 and ctx.node.inputs[4] is not None else None
        if starts is None or ends is None or (
                ctx.n_inputs > 3 and ctx.node.inputs[3] is not None and axes is None) or (
                ctx.n_inputs > 4 and ctx.node.inputs[4] is not None and steps is None):
            raise UnsupportedNode("slice bounds are not constant")
    starts = [int(x) for x in np.reshape(starts, -1)]
    ends = [int(x) for x in np.reshape(ends, -1)]
    axes = [int(x) for x in np.reshape(axes, -1)] if axes is not None else list(range(len(starts)))
    steps = [int(x) for x in np.reshape(steps, -1)] if steps is not None else [1] * len(starts)
    rank = len(shape)
    real = []
    for ax, st, en, sp in zip(axes, starts, ends, steps, strict=True):
        ax = ax + rank if ax < 0 else ax
        size = shape[ax]
        full = sp == 1 and (st == 0 or (isinstance(size, int) and st <= -size)) and (
            isinstance(size, int) and en >= size)
        if not full:
            real.append((ax, st, en, sp))
    if not real:
        return OpKind.IDENTITY, [ctx.inp(0)], {}
    if len(real) > 1:
        raise UnsupportedNode("slice along several axes")
    ax, st, en, sp = real[0]
    if sp < 1:
        raise UnsupportedNode("slice with a negative step")
    size = shape[ax]
    if isinstance(size, int):
        en = min(en, size)
        st = max(st, -size)
    return OpKind.SLICE, [ctx.inp(0)], {"axis": ax, "start": st, "end": en, "step": sp}


def convert_attention(ctx: ConversionContext) -> Converted:
    """``Attention`` (opset 23) on ``[B, H, L, E]`` inputs, or on 3-D ``[B, L, H*E]`` ones
    (``q_num_heads`` / ``kv_num_heads``): those are viewed as ``[B, L, H, E]``, transposed
    to ``[B, H, L, E]`` for the attention, and the result is transposed back and
    flattened to ``[B, L, H*E_v]`` -- what the op computes, so the analysis sees the heads
    (and GQA KV-groups) as on the 4-D form."""
    ranks = [ctx.rank(i) for i in range(3)]
    if any(i < ctx.n_inputs and ctx.node.inputs[i] is not None for i in (4, 5, 6)):
        raise UnsupportedNode("attention with a KV cache or padding lengths")
    if any(o is not None and (o.uses() or o in ctx.imp.g.outputs)
           for o in ctx.node.outputs[1:]):
        raise UnsupportedNode("attention whose present key/value or qk output is read")
    mask = ctx.inp(3) if ctx.n_inputs > 3 else None
    if ranks == [4, 4, 4]:
        q, k = ctx.in_shape(0), ctx.in_shape(1)
        return OpKind.ATTENTION, [ctx.inp(0), ctx.inp(1), ctx.inp(2), mask], {"gqa": q[1] != k[1]}
    if ranks != [3, 3, 3]:
        raise UnsupportedNode("attention inputs are not [B, H, L, E] or [B, L, H*E]")
    heads = {0: ctx.attr("q_num_heads", 0), 1: ctx.attr("kv_num_heads", 0)}
    heads[2] = heads[1]
    if not heads[0] or not heads[1]:
        raise UnsupportedNode("3-D attention inputs without q_num_heads / kv_num_heads")
    dtype = dtype_name(ctx.node.inputs[0].dtype)
    views, sizes = [], []
    for i in range(3):
        b, length, width = ctx.in_shape(i)
        if not isinstance(width, int) or width % heads[i]:
            raise UnsupportedNode(f"3-D attention input {i} of width {width} with {heads[i]} heads")
        e = width // heads[i]
        x = ctx.emit(OpKind.RESHAPE, [ctx.inp(i)], (b, length, heads[i], e), dtype)
        views.append(ctx.emit(OpKind.TRANSPOSE, [x], (b, heads[i], length, e), dtype,
                              {"perm": [0, 2, 1, 3]}))
        sizes.append((b, length, e))
    b, length, _ = sizes[0]
    ev = sizes[2][2]
    y = ctx.emit(OpKind.ATTENTION, [*views, mask], (b, heads[0], length, ev), dtype,
                 {"gqa": heads[0] != heads[1]})
    yt = ctx.emit(OpKind.TRANSPOSE, [y], (b, length, heads[0], ev), dtype, {"perm": [0, 2, 1, 3]})
    return OpKind.RESHAPE, [yt], {}


def convert_rotary(ctx: ConversionContext) -> Converted:
    """``RotaryEmbedding`` (opset 23): elementwise over its input, but rotating pairs of
    channels within each head (``i`` with ``i + r/2``, or ``2i`` with ``2i + 1`` when
    interleaved). Emitted as what it computes on channels -- slices, the swapped halves
    concatenated, an elementwise op -- so the analysis couples the rotated channels as it
    does on the opset-18 decomposition. A 3-D input ``[B, S, H*D]`` is viewed as
    ``[B, S, H, D]`` (``num_heads``). The cos/sin caches and position ids index
    positions, not channels, and are left out."""
    shape = ctx.in_shape(0)
    if shape is None or len(shape) not in (3, 4):
        raise UnsupportedNode("rotary input is not [B, H, S, D] or [B, S, H*D]")
    dtype = dtype_name(ctx.node.inputs[0].dtype)
    x = ctx.inp(0)
    if len(shape) == 3:
        heads, hidden = ctx.attr("num_heads", 0), shape[2]
        if not heads or not isinstance(hidden, int) or hidden % heads:
            raise UnsupportedNode(f"3-D rotary input of size {hidden} with num_heads={heads}")
        lead = (shape[0], shape[1], heads)
        d = hidden // heads
        x = ctx.emit(OpKind.RESHAPE, [x], (*lead, d), dtype)
    else:
        lead, d = tuple(shape[:3]), shape[3]
    if not isinstance(d, int):
        raise UnsupportedNode("head size unknown")
    r = ctx.attr("rotary_embedding_dim", 0) or d
    record_output_shape(ctx, 0, shape)
    y = emit_rotation(ctx, x, lead, d, r, bool(ctx.attr("interleaved", 0)), dtype)
    return (OpKind.RESHAPE if len(shape) == 3 else OpKind.IDENTITY), [y], {}


def emit_rotation(ctx: ConversionContext, x: Value, lead: tuple, d: int, r: int, interleaved: bool,
            dtype) -> Value:
    """What a rotary embedding does to the channels of ``x`` (``[*lead, d]``, the last
    dim one head): the first ``r`` channels are rotated in pairs (``i`` with ``i + r/2``,
    or ``2i`` with ``2i + 1`` when interleaved), the rest pass through."""
    if r % 2 or r > d:
        raise UnsupportedNode(f"rotary dim {r} with head size {d}")
    k = len(lead)

    def part(v, axis, lo, hi, shp):
        return ctx.emit(OpKind.SLICE, [v], shp, dtype,
                        {"axis": axis, "start": lo, "end": hi, "step": 1})

    xr = x if r == d else part(x, k, 0, r, (*lead, r))
    if interleaved:
        pairs = ctx.emit(OpKind.RESHAPE, [xr], (*lead, r // 2, 2), dtype)
        a = part(pairs, k + 1, 0, 1, (*lead, r // 2, 1))
        b = part(pairs, k + 1, 1, 2, (*lead, r // 2, 1))
        swapped = ctx.emit(OpKind.CONCAT, [b, a], (*lead, r // 2, 2), dtype, {"axis": k + 1})
        rot = ctx.emit(OpKind.RESHAPE, [swapped], (*lead, r), dtype)
    else:
        a = part(xr, k, 0, r // 2, (*lead, r // 2))
        b = part(xr, k, r // 2, r, (*lead, r // 2))
        rot = ctx.emit(OpKind.CONCAT, [b, a], (*lead, r), dtype, {"axis": k})
    y = ctx.emit(OpKind.ELEMENTWISE, [xr, rot], (*lead, r), dtype)
    if r < d:
        y = ctx.emit(OpKind.CONCAT, [y, part(x, k, r, d, (*lead, d - r))], (*lead, d), dtype,
                     {"axis": k})
    return y


def convert_dropout(ctx: ConversionContext) -> Converted:
    return OpKind.IDENTITY, [ctx.inp(0)], {}
