"""Converters for the com.microsoft ops written by ONNX Runtime's transformer optimizer.

ONNX Runtime's fused ops (``onnxruntime.transformers.optimizer``, com.microsoft domain)
are emitted as what they compute on channels: ``Attention`` as a LINEAR with the packed
QKV weight ``[D, Hq + Hk + Hv]`` and bias, a SPLIT into the q / k / v sections
(``qkv_hidden_sizes``, else equal thirds), each viewed as ``[B, num_heads, S, d]``, and an
ATTENTION; ``MultiHeadAttention`` (3-D query / key / value, optional packed bias) and
``GroupQueryAttention`` (separate or packed QKV; ``kv_num_heads``; ``do_rotary`` rotates
q and k per head) likewise; ``SkipLayerNormalization`` / ``SkipSimplifiedLayerNormalization``
as the residual add (output 3, when used) and a norm; ``EmbedLayerNormalization`` as
embedding lookups, a sum and a layer norm; ``BiasGelu`` / ``FastGelu`` as an add and an
activation; com.microsoft ``RotaryEmbedding`` as the opset-23 one. Forms whose channels
are not described -- a past / present KV cache, a per-head ``attention_bias``, ``head_sink``,
4-D or packed key / value of ``MultiHeadAttention``, ``Attention`` with ``do_rotary`` --
are barriers; their output shapes are still recorded (:func:`contrib_output_shape`), so the
rest of the graph is analyzed.
"""

from __future__ import annotations

from typing import Callable

from slimgraph.frontends.onnx.context import (
    ConversionContext, Converted, UnsupportedNode, record_output_shape,
)
from slimgraph.frontends.onnx.folding import broadcast_dims
from slimgraph.frontends.onnx.nodes import dtype_name, ir_op_name
from slimgraph.frontends.onnx.standard_ops import emit_rotation, linear_attrs
from slimgraph.ir.graph import OpKind, Value


def _present(ctx: ConversionContext, i: int) -> bool:
    return i < ctx.n_inputs and ctx.node.inputs[i] is not None


def _output_used(ctx: ConversionContext, i: int) -> bool:
    if i >= len(ctx.node.outputs):
        return False
    o = ctx.node.outputs[i]
    return bool(o.name) and (bool(o.uses()) or o in ctx.imp.g.outputs)


def contrib_output_shape(ctx: ConversionContext) -> tuple | None:
    """Output 0's shape of a com.microsoft attention / fused-norm op, from its inputs and
    attributes (ONNX shape inference does not know these ops). Recorded even when the
    converter refuses the node, so the graph after a barrier keeps its shapes (its MLPs
    stay prunable)."""
    op, x = ctx.node.op_type, ctx.in_shape(0)
    if x is None:
        return None
    if op in ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "BiasGelu",
              "FastGelu"):
        return x
    if len(x) != 3:
        return None
    if op == "Attention":
        w = ctx.in_shape(1)
        sizes = ctx.attr("qkv_hidden_sizes")
        v = int(sizes[2]) if sizes else (w[1] // 3 if w and isinstance(w[1], int) else None)
        return None if v is None else (x[0], x[1], v)
    if op == "MultiHeadAttention":
        v = ctx.in_shape(2) if _present(ctx, 2) else None
        if v is not None and len(v) == 3:
            return (x[0], x[1], v[2])
        if v is not None and len(v) == 4 and isinstance(v[1], int) and isinstance(v[3], int):
            return (x[0], x[1], v[1] * v[3])
        return None
    if op == "GroupQueryAttention":
        n, kv = ctx.attr("num_heads", 0), ctx.attr("kv_num_heads", 0)
        k = ctx.in_shape(1) if _present(ctx, 1) else None
        if k is not None and len(k) == 3 and isinstance(k[2], int) and kv:
            return (x[0], x[1], n * (k[2] // kv))
        if k is None and isinstance(x[2], int) and n + 2 * kv:
            return (x[0], x[1], n * (x[2] // (n + 2 * kv)))
    return None


def skip_norm_converter(stat: str) -> Callable[[ConversionContext], Converted]:
    """``SkipLayerNormalization`` (inputs ``x, skip, gamma, beta?, bias?``) and
    ``SkipSimplifiedLayerNormalization`` (``x, skip, gamma, bias?``): the residual add
    ``x + skip + bias`` (an ELEMENTWISE, which output 3 returns when it is used), then
    the norm over the last dim (outputs 1 and 2, mean and inverse std, are statistics)."""

    def conv(ctx: ConversionContext) -> Converted:
        shapes = [ctx.in_shape(0), ctx.in_shape(1)]
        if any(s is None for s in shapes):
            raise UnsupportedNode("input shapes unknown")
        bias_at = 4 if stat == "layer" else 3
        adds = [ctx.inp(0), ctx.inp(1)] + ([ctx.inp(bias_at)] if _present(ctx, bias_at) else [])
        shape = broadcast_dims(shapes)
        if shape is None:
            raise UnsupportedNode(
                f"input and skip shapes {shapes[0]} / {shapes[1]} do not broadcast")
        dtype = dtype_name(ctx.node.inputs[0].dtype)
        total = ctx.emit(OpKind.ELEMENTWISE, adds, shape, dtype)
        record_output_shape(ctx, 0, shape)
        params = [ctx.inp(2)] + ([ctx.inp(3)] if stat == "layer" and _present(ctx, 3) else [])
        aliases = {}
        if _output_used(ctx, 3):
            aliases[3] = total
            record_output_shape(ctx, 3, shape)
        if _output_used(ctx, 1) or _output_used(ctx, 2):
            raise UnsupportedNode("the mean / inverse std outputs are used")
        return OpKind.NORM, [total, *params], {"axes": [-1], "stat": stat, "_aliases": aliases}

    return conv


def convert_embed_layer_norm(ctx: ConversionContext) -> Converted:
    """com.microsoft ``EmbedLayerNormalization``: word + position (+ segment) embedding
    lookups summed (output 2, when used) and layer-normed (output 0). The lookups are
    EMBEDDINGs (positions index their table as ids do); output 1, the mask index, is
    positions only."""
    ids = ctx.in_shape(0)
    word, pos = ctx.param_at(2), ctx.param_at(3)
    if ids is None or len(ids) != 2 or word is None or pos is None:
        raise UnsupportedNode("input_ids are not [B, S] or the tables are not initializers")
    if word[1] != (0, 1) or pos[1] != (0, 1):
        raise UnsupportedNode("embedding tables stored transposed")
    hidden = word[0].shape[1]
    shape = (ids[0], ids[1], hidden)
    dtype = word[0].dtype
    looked = [ctx.emit(OpKind.EMBEDDING, [word[0], ctx.inp(0)], shape, dtype),
              ctx.emit(OpKind.EMBEDDING, [pos[0], ctx.inp(8) if _present(ctx, 8) else ctx.inp(0)],
                       shape, dtype)]
    if _present(ctx, 1) and _present(ctx, 4):
        seg = ctx.param_at(4)
        if seg is None or seg[1] != (0, 1):
            raise UnsupportedNode("the segment table is not an initializer")
        looked.append(ctx.emit(OpKind.EMBEDDING, [seg[0], ctx.inp(1)], shape, dtype))
    total = ctx.emit(OpKind.ELEMENTWISE, looked, shape, dtype)
    record_output_shape(ctx, 0, shape)
    aliases = {}
    if _output_used(ctx, 2):
        aliases[2] = total
        record_output_shape(ctx, 2, shape)
    if _output_used(ctx, 1):
        record_output_shape(ctx, 1, (ids[0],))
    return OpKind.NORM, [total, ctx.inp(5), ctx.inp(6)], {"axes": [-1], "stat": "layer",
                                                          "_aliases": aliases}


def convert_bias_gelu(ctx: ConversionContext) -> Converted:
    """``BiasGelu`` / ``FastGelu`` with a bias: ``gelu(x + bias)``."""
    if not _present(ctx, 1):
        return OpKind.ACTIVATION, [ctx.inp(0)], {}
    shape = ctx.in_shape(0)
    if shape is None:
        raise UnsupportedNode("input shape unknown")
    record_output_shape(ctx, 0, shape)
    dtype = dtype_name(ctx.node.inputs[0].dtype)
    x = ctx.emit(OpKind.ELEMENTWISE, [ctx.inp(0), ctx.inp(1)], shape, dtype)
    return OpKind.ACTIVATION, [x], {}


def _head_size(size, heads: int, what: str) -> int:
    if not heads or not isinstance(size, int) or size % heads:
        raise UnsupportedNode(f"{what} size {size} is not a multiple of {heads} heads")
    return size // heads


def _multi_head(ctx: ConversionContext, q: Value, k: Value, v: Value, n_q: int, n_kv: int,
                rotary: tuple[int, bool] | None = None) -> Converted:
    """Attention over 3-D ``q`` ``[B, S, n_q*d]`` and ``k`` / ``v`` ``[B, L, n_kv*d]``:
    each viewed as ``[B, heads, S, d]`` (reshape, transpose), ATTENTION (``gqa`` when
    ``n_kv < n_q``), back to ``[B, S, n_q*dv]`` -- the node's output. ``rotary`` =
    ``(rotary dim, interleaved)`` rotates the heads of ``q`` and ``k`` first."""
    b, s = q.shape[0], q.shape[1]
    length = k.shape[1]
    dq = _head_size(q.shape[2], n_q, "query")
    dk = _head_size(k.shape[2], n_kv, "key")
    dv = _head_size(v.shape[2], n_kv, "value")
    if dq != dk:
        raise UnsupportedNode(f"query head size {dq} != key head size {dk}")
    if n_q % n_kv:
        raise UnsupportedNode(f"{n_q} query heads are not a multiple of {n_kv} KV heads")
    dtype = q.dtype
    perm = [0, 2, 1, 3]

    def heads(x, n, d, seq, rotate):
        x = ctx.emit(OpKind.RESHAPE, [x], (b, seq, n, d), dtype)
        if rotate and rotary is not None:
            x = emit_rotation(ctx, x, (b, seq, n), d, rotary[0] or d, rotary[1], dtype)
        return ctx.emit(OpKind.TRANSPOSE, [x], (b, n, seq, d), dtype, {"perm": perm})

    qh, kh, vh = heads(q, n_q, dq, s, True), heads(k, n_kv, dk, length, True), \
        heads(v, n_kv, dv, length, False)
    att = ctx.emit(OpKind.ATTENTION, [qh, kh, vh, None], (b, n_q, s, dv), dtype,
                   {"gqa": n_q != n_kv})
    back = ctx.emit(OpKind.TRANSPOSE, [att], (b, s, n_q, dv), dtype, {"perm": perm})
    record_output_shape(ctx, 0, (b, s, n_q * dv))
    return OpKind.RESHAPE, [back], {}


def _split_last(ctx: ConversionContext, x: Value, sizes: list[int]) -> list[Value]:
    """``x`` ``[B, S, sum(sizes)]`` split along its last dim (a packed QKV projection)."""
    outs = [(ctx.imp.unique_name(f"{ctx.node.name or ctx.node.op_type}.qkv{i}"),
             (*x.shape[:-1], n), x.dtype) for i, n in enumerate(sizes)]
    node = ctx.imp.graph.add_node(ctx.imp.unique_node_name(f"{ctx.node.name}:split"),
                                  OpKind.SPLIT, ir_op_name(ctx.node), [x], outs,
                                  {"axis": x.rank - 1, "sizes": list(sizes)})
    return list(node.outputs)


def _no_head_bias(ctx: ConversionContext, i: int, what: str) -> None:
    """An additive attention bias ``[B or 1, N or 1, S, L]``: per head unless dim 1 is 1."""
    if not _present(ctx, i):
        return
    shape = ctx.in_shape(i)
    if shape is None or len(shape) != 4 or shape[1] != 1:
        raise UnsupportedNode(f"{what} {list(shape) if shape else '?'} is per head")


def convert_ms_attention(ctx: ConversionContext) -> Converted:
    """com.microsoft ``Attention``: ``x`` ``[B, S, D]`` times the packed QKV weight
    ``[D, Hq + Hk + Hv]`` (``qkv_hidden_sizes``, else three equal sections) plus the bias,
    split into the q / k / v sections of ``num_heads`` heads each: a LINEAR, a SPLIT and
    :func:`_multi_head`. The mask (``mask_index``, positions only) is left out. Refused
    (a barrier): a past / present KV cache, ``attention_bias`` per head, ``do_rotary``,
    a weight that is not an initializer, input that is not 3-D."""
    n = ctx.attr("num_heads", 0)
    if _present(ctx, 4) or _present(ctx, 6) or _output_used(ctx, 1):
        raise UnsupportedNode("Attention with a past / present KV cache")
    _no_head_bias(ctx, 5, "attention_bias")
    if ctx.attr("do_rotary", 0):
        raise UnsupportedNode("Attention with do_rotary")
    shape = ctx.in_shape(0)
    p = ctx.param_at(1)
    if shape is None or len(shape) != 3:
        raise UnsupportedNode("input is not [B, S, D]")
    if p is None or p[0].rank != 2:
        raise UnsupportedNode("the QKV weight is not an initializer")
    w, perm = p
    total = int(w.shape[perm[1]])
    sizes = [int(x) for x in (ctx.attr("qkv_hidden_sizes") or [])] or [total // 3] * 3
    if len(sizes) != 3 or sum(sizes) != total or sizes[0] != sizes[1]:
        raise UnsupportedNode(f"qkv sections {sizes} of a {total}-wide weight")
    bias = ctx.inp(2) if _present(ctx, 2) else None
    qkv = ctx.emit(OpKind.LINEAR, [ctx.inp(0), w, bias], (shape[0], shape[1], total),
                   dtype_name(ctx.node.inputs[0].dtype), linear_attrs(w, perm, False))
    q, k, v = _split_last(ctx, qkv, sizes)
    return _multi_head(ctx, q, k, v, n, n)


def convert_multi_head_attention(ctx: ConversionContext) -> Converted:
    """com.microsoft ``MultiHeadAttention`` with 3-D ``query`` / ``key`` / ``value``
    ``[B, S, N*H]`` and an optional packed bias ``[Hq + Hk + Hv]`` (added to each before
    the heads are formed). The padding mask is left out. Refused (a barrier): packed or
    4-D key / value, a per-head ``attention_bias``, past / present KV."""
    n = ctx.attr("num_heads", 0)
    if not all(_present(ctx, i) and ctx.rank(i) == 3 for i in range(3)):
        raise UnsupportedNode("query, key and value are not all [B, S, N*H]")
    if _present(ctx, 6) or _present(ctx, 7) or _output_used(ctx, 1) or _output_used(ctx, 2) \
            or _output_used(ctx, 3):
        raise UnsupportedNode("MultiHeadAttention with a past / present KV cache or qk output")
    if any(_present(ctx, i) for i in range(8, ctx.n_inputs)):
        raise UnsupportedNode("MultiHeadAttention with cache indirection / past sequence length")
    _no_head_bias(ctx, 5, "attention_bias")
    q, k, v = ctx.inp(0), ctx.inp(1), ctx.inp(2)
    if _present(ctx, 3):
        sizes = [int(q.shape[2]), int(k.shape[2]), int(v.shape[2])]
        b = ctx.inp(3)
        if b.rank != 1 or b.shape[0] != sum(sizes):
            raise UnsupportedNode(f"bias {list(b.shape)} for q / k / v of {sizes}")
        parts = _split_last(ctx, b, sizes)
        q, k, v = (ctx.emit(OpKind.ELEMENTWISE, [x, part], x.shape, x.dtype)
                   for x, part in zip((q, k, v), parts))
    return _multi_head(ctx, q, k, v, n, n)


def convert_group_query_attention(ctx: ConversionContext) -> Converted:
    """com.microsoft ``GroupQueryAttention``: ``query`` ``[B, S, num_heads*H]`` with
    ``key`` / ``value`` ``[B, S, kv_num_heads*H]``, or packed QKV in ``query`` (no key
    and value): a SPLIT, then :func:`_multi_head` with GQA. ``do_rotary`` rotates q and
    k per head (rotary dim from the cos cache). ``seqlens_k`` / ``total_sequence_length``
    are positions. Refused (a barrier): a past KV cache given, present outputs used,
    ``attention_bias`` per head, ``head_sink``, ``position_ids`` of packed batching."""
    n, n_kv = ctx.attr("num_heads", 0), ctx.attr("kv_num_heads", 0)
    if _present(ctx, 3) or _present(ctx, 4) or _output_used(ctx, 1) or _output_used(ctx, 2) \
            or _output_used(ctx, 3):
        raise UnsupportedNode("GroupQueryAttention with a past / present KV cache")
    _no_head_bias(ctx, 10, "attention_bias")
    if _present(ctx, 11):
        raise UnsupportedNode("GroupQueryAttention with head_sink (one value per head)")
    shape = ctx.in_shape(0)
    if shape is None or len(shape) != 3 or not isinstance(shape[2], int):
        raise UnsupportedNode("query is not [B, S, N*H]")
    if _present(ctx, 1) != _present(ctx, 2):
        raise UnsupportedNode("only one of key / value given")
    if _present(ctx, 1):
        if ctx.rank(1) != 3 or ctx.rank(2) != 3:
            raise UnsupportedNode("key / value are not [B, S, N*H]")
        q, k, v = ctx.inp(0), ctx.inp(1), ctx.inp(2)
    else:
        if not n or not n_kv or shape[2] % (n + 2 * n_kv):
            raise UnsupportedNode(f"packed QKV of size {shape[2]} for {n} + 2 x {n_kv} heads")
        d = shape[2] // (n + 2 * n_kv)
        q, k, v = _split_last(ctx, ctx.inp(0), [n * d, n_kv * d, n_kv * d])
    rotary = None
    if ctx.attr("do_rotary", 0):
        cos = ctx.in_shape(7)
        if cos is None or len(cos) != 2 or not isinstance(cos[1], int):
            raise UnsupportedNode("do_rotary without a [max_seq, rotary_dim / 2] cos cache")
        rotary = (2 * int(cos[1]), bool(ctx.attr("rotary_interleaved", 0)))
    return _multi_head(ctx, q, k, v, n, n_kv, rotary)
