"""Channel rules: one function per normalized op kind, kept as data in ``RULES``.

A rule reads the layouts of a node's inputs (see ``spaces.py``), records which
channels are the same (``ctx.unify``), and sets the layouts of its outputs. A rule
that meets something it cannot express raises ``LayoutConflict``; the driver then
turns the node into a barrier. Kinds without a rule (``OpKind.UNKNOWN``) are
barriers too: every channel through them becomes unprunable, with a reason naming
the node and its op.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

from slimgraph.ir import symdims
from slimgraph.ir.blocks import weight_param
from slimgraph.ir.context import AnalysisContext
from slimgraph.ir.graph import Node, OpKind, Value
from slimgraph.ir.spaces import Layout, LayoutConflict

Rule = Callable[[Node, AnalysisContext], None]


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _broadcast(ctx: AnalysisContext, node: Node, operands: list[Value]) -> list[Layout]:
    """Layouts of a broadcast result; dims of equal (non-1) size are unified."""
    out = node.outputs[0]
    rank = out.rank
    layouts: list[Layout] = []
    for d in range(rank):
        size = out.shape[d]
        same: list[Layout] = []
        for v in operands:
            k = d - (rank - v.rank)
            if k >= 0 and v.shape[k] == size and size != 1:
                same.append(ctx.layouts(v)[k])
        if not same:
            layouts.append(ctx.spaces.fresh_layout(size))
            continue
        for other in same[1:]:
            ctx.unify(same[0], other)
        layouts.append(same[0])
    return layouts


def _tensors(node: Node) -> list[Value]:
    return [v for v in node.inputs if v is not None and v.is_tensor]


def rule_elementwise(node: Node, ctx) -> None:
    ctx.set(node.outputs[0], _broadcast(ctx, node, _tensors(node)))


def rule_activation(node: Node, ctx) -> None:
    rule_elementwise(node, ctx)
    for lay in ctx.layouts(node.outputs[0]):
        ctx.spaces.tag(lay, "act")


def rule_identity(node: Node, ctx) -> None:
    x = node.inputs[0]
    out = node.outputs[0]
    if x is None or x.rank != out.rank:
        raise LayoutConflict("identity op changes rank")
    ctx.set(out, list(ctx.layouts(x)))


def rule_linear(node: Node, ctx) -> None:
    x, w = node.inputs[0], node.inputs[1]
    b = node.inputs[2] if len(node.inputs) > 2 else None
    lw = ctx.layouts(w)
    lx = ctx.layouts(x)
    w_in, w_out = node.attrs["w_in"], node.attrs["w_out"]
    ctx.unify(lx[-1], lw[w_in])
    if b is not None and b.rank == 1:
        ctx.unify(ctx.layouts(b)[0], lw[w_out])
    ctx.set(node.outputs[0], list(lx[:-1]) + [lw[w_out]])


def _weight_like(v: Value, depth: int = 4) -> bool:
    """A parameter, or one seen through transposes / reshapes / casts (Falcon's
    ``x @ W.T``): such a matmul is a linear layer, not attention."""
    return weight_param(v, (OpKind.TRANSPOSE, OpKind.RESHAPE, OpKind.IDENTITY), depth) is not None


def rule_matmul(node: Node, ctx) -> None:
    a, b = node.inputs[0], node.inputs[1]
    la, lb = list(ctx.layouts(a)), list(ctx.layouts(b))
    if a.rank == 1:
        la = [ctx.spaces.fresh_layout(1)] + la
    if b.rank == 1:
        lb = lb + [ctx.spaces.fresh_layout(1)]
    ctx.unify(la[-1], lb[-2])
    sa = ([1] if a.rank == 1 else []) + list(a.shape)
    sb = list(b.shape) + ([1] if b.rank == 1 else [])
    ba, bb = sa[:-2], sb[:-2]
    nb = max(len(ba), len(bb))
    batch: list[Layout] = []
    for d in range(nb):
        ka, kb = d - (nb - len(ba)), d - (nb - len(bb))
        da = ba[ka] if ka >= 0 else 1
        db = bb[kb] if kb >= 0 else 1
        if da != 1 and db != 1:
            ctx.unify(la[ka], lb[kb])
            batch.append(la[ka])
        elif da != 1:
            batch.append(la[ka])
        elif db != 1:
            batch.append(lb[kb])
        else:
            batch.append(ctx.spaces.fresh_layout(1))
    out = batch + ([la[-2]] if a.rank != 1 else []) + ([lb[-1]] if b.rank != 1 else [])
    if not _weight_like(a) and not _weight_like(b) and nb >= 1:
        # activation x activation with batch dims: attention scores or context
        for lay in batch:
            ctx.spaces.tag(lay, "heads")
        ctx.spaces.tag(la[-1], "head_dim")
        ctx.spaces.tag(lb[-1], "head_dim")
    ctx.set(node.outputs[0], out)


def rule_norm(node: Node, ctx) -> None:
    x = node.inputs[0]
    lx = ctx.layouts(x)
    axes = [_axis(a, x.rank) for a in node.attrs["axes"]]
    for p in node.inputs[1:]:
        if p is None or not p.is_tensor:
            continue
        lp = ctx.layouts(p)
        for k, ax in enumerate(axes[-p.rank :] if p.rank else []):
            ctx.unify(lp[k], lx[ax])
    stat = node.attrs.get("stat", "layer")
    for ax in axes:
        ctx.spaces.tag(lx[ax], "normed")
        # a LayerNorm's mean moves when channels go (RMS norms are corrected exactly)
        ctx.spaces.note(lx[ax], f"{stat} norm statistics over these channels at {node.name}",
                        approximate=stat == "layer")
    ctx.set(node.outputs[0], list(lx))
    for extra in node.outputs[1:]:  # mean / rstd outputs of native_layer_norm
        ctx.set_fresh(extra)


def rule_reduction(node: Node, ctx) -> None:
    x = node.inputs[0]
    lx = ctx.layouts(x)
    axes = {_axis(a, x.rank) for a in node.attrs["axes"]} if node.attrs.get("axes") is not None \
        else set(range(x.rank))
    keep = node.attrs.get("keepdim", False)
    out: list[Layout] = []
    op = node.attrs.get("op", "reduce")
    for d in range(x.rank):
        if d in axes:
            ctx.spaces.tag(lx[d], "stat")
            ctx.spaces.note(lx[d], f"{op} over these channels at {node.name}")
            if keep:
                out.append(ctx.spaces.fresh_layout(1))
        else:
            out.append(lx[d])
    ctx.set(node.outputs[0], out)


def rule_softmax(node: Node, ctx) -> None:
    rule_identity(node, ctx)


def rule_embedding(node: Node, ctx) -> None:
    table, ids = node.inputs[0], node.inputs[1]
    lt = ctx.layouts(table)
    ctx.spaces.mark(lt[0], f"embedding rows are indexed by token ids at {node.name}")
    ctx.spaces.tag(lt[1], "embedding")
    ctx.set(node.outputs[0], list(ctx.layouts(ids)) + [lt[1]])


def rule_reshape(node: Node, ctx) -> None:
    x, out = node.inputs[0], node.outputs[0]
    ctx.set(out, reshape_layouts(ctx, ctx.layouts(x), list(x.shape), list(out.shape)))


def reshape_layouts(ctx, lin: list[Layout], ins: list, outs: list) -> list[Layout]:
    """Align input and output dims by products; split or merge layouts accordingly.

    Symbolic dims (dynamic axes) are products of symbols (``symdims``): ``[batch, 4, seq,
    16] -> [4*batch, seq, 16]`` merges the batch and head layouts into one dim, and the
    reshape back to ``[batch, 4, 16, seq]`` splits them again (a dynamic-axis export's
    transposed keys)."""
    sp = ctx.spaces
    res: list[Layout] = []
    i = j = 0
    while j < len(outs):
        if outs[j] == 1:
            res.append(sp.fresh_layout(1))
            j += 1
            continue
        while i < len(ins) and ins[i] == 1:
            i += 1
        if i >= len(ins):
            raise LayoutConflict(f"reshape {ins} -> {outs} does not align")
        if symdims.is_symbolic(ins[i]) and ins[i] == outs[j]:
            res.append(lin[i])
            i += 1
            j += 1
            continue
        gi, gj = [i], [j]
        pin, pout = ins[i], outs[j]
        while pin != pout:
            grow = _smaller(pin, pout)
            if grow == "in" and gi[-1] + 1 < len(ins):
                gi.append(gi[-1] + 1)
                pin = symdims.product([pin, ins[gi[-1]]])
            elif grow == "out" and gj[-1] + 1 < len(outs):
                gj.append(gj[-1] + 1)
                pout = symdims.product([pout, outs[gj[-1]]])
            else:
                raise LayoutConflict(f"reshape {ins} -> {outs} does not align")
        merged: Layout = [s for k in gi for s in lin[k]]
        sizes = [outs[k] for k in gj]
        if all(isinstance(x, int) for x in sizes) and isinstance(pin, int):
            res.extend(sp.split_layout(merged, sizes))
        else:
            res.extend(_split_symbolic(sp, merged, sizes))
        i, j = gi[-1] + 1, gj[-1] + 1
    while i < len(ins):
        if ins[i] != 1:
            raise LayoutConflict(f"reshape {ins} -> {outs} does not align")
        i += 1
    return res


def _smaller(a, b) -> str | None:
    """Which side of a reshape group to extend: the smaller product (for symbolic
    products, the one that divides the other)."""
    if isinstance(a, int) and isinstance(b, int):
        return "in" if a < b else "out"
    if symdims.divide(b, a) is not None:
        return "in"
    if symdims.divide(a, b) is not None:
        return "out"
    return None


def _split_symbolic(sp, layout: Layout, sizes: list) -> list[Layout]:
    """Cut a layout with symbolic spaces into consecutive dims of the given sizes; each
    symbolic space goes to a dim whose size has its symbols, in order."""
    flat = sp.flatten(layout)
    out: list[Layout] = []
    k = 0
    for size in sizes:
        coef, syms = symdims.factors(size)
        need = Counter(syms)
        got: Layout = []
        while coef > 1 or +need:
            if k >= len(flat):
                raise LayoutConflict(f"reshape to {sizes}: sizes do not match")
            f = sp.find(flat[k])
            fs = sp.size[f]
            if fs == 0:
                name = sp.symbol.get(f)
                fc, fsyms = symdims.factors(name) if name else (0, ())
                want = Counter(fsyms)
                if not name or any(need[x] < n for x, n in want.items()) or coef % fc:
                    raise LayoutConflict(f"reshape to {sizes} cuts through a dynamic dim "
                                         f"({name or 'unknown'})")
                need -= want
                coef //= fc
                got.append(f)
                k += 1
            elif coef % fs == 0:
                got.append(f)
                coef //= fs
                k += 1
            elif coef > 1 and fs % coef == 0:
                flat[k : k + 1] = sp._split_product(f, coef)
            else:
                raise LayoutConflict(f"reshape to {sizes} cuts through a factor of size {fs}")
        out.append(got or [sp.new(1)])
    if k != len(flat):
        raise LayoutConflict(f"reshape to {sizes}: sizes do not match")
    return out


def rule_transpose(node: Node, ctx) -> None:
    lx = ctx.layouts(node.inputs[0])
    ctx.set(node.outputs[0], [lx[p] for p in node.attrs["perm"]])


def rule_expand(node: Node, ctx) -> None:
    x, out = node.inputs[0], node.outputs[0]
    lx = ctx.layouts(x)
    off = out.rank - x.rank
    res: list[Layout] = []
    for d in range(out.rank):
        k = d - off
        if k >= 0 and x.shape[k] == out.shape[d]:
            res.append(lx[k])
        else:  # a broadcast copy: channels here are replicas, not channels of their own
            size = out.shape[d]
            res.append([ctx.spaces.new(size if isinstance(size, int) else 0, replica=True)])
    ctx.set(out, res)


def rule_concat(node: Node, ctx) -> None:
    parts = _tensors(node)
    out = node.outputs[0]
    ax = _axis(node.attrs["axis"], out.rank)
    parts = [p for p in parts if p.rank == out.rank and p.shape[ax] != 0]
    res: list[Layout] = []
    for d in range(out.rank):
        if d == ax:
            res.append(ctx.spaces.concat([ctx.layouts(p)[d] for p in parts]))
        else:
            res.append(_broadcast_dim(ctx, [ctx.layouts(p)[d] for p in parts], out.shape[d]))
    ctx.set(out, res)


def rule_stack(node: Node, ctx) -> None:
    """Inputs of one shape, dim by dim unified; the new dim is a fresh space."""
    parts = _tensors(node)
    out = node.outputs[0]
    ax = _axis(node.attrs["axis"], out.rank)
    res: list[Layout] = []
    for d in range(out.rank):
        if d == ax:
            res.append(ctx.spaces.fresh_layout(out.shape[d]))
        else:
            k = d if d < ax else d - 1
            res.append(_broadcast_dim(ctx, [ctx.layouts(p)[k] for p in parts], out.shape[d]))
    ctx.set(out, res)


def _broadcast_dim(ctx, layouts: list[Layout], size) -> Layout:
    for other in layouts[1:]:
        ctx.unify(layouts[0], other)
    return layouts[0] if layouts else ctx.spaces.fresh_layout(size)


def _slice_out(ctx, x: Value, ax: int, lo: int, hi: int) -> list[Layout]:
    lx = ctx.layouts(x)
    res = list(lx)
    res[ax] = ctx.spaces.slice(lx[ax], lo, hi)
    return res


def rule_slice(node: Node, ctx) -> None:
    x, out = node.inputs[0], node.outputs[0]
    ax = _axis(node.attrs["axis"], x.rank)
    size = x.shape[ax]
    step = node.attrs.get("step", 1) or 1
    if not isinstance(size, int):
        raise LayoutConflict("slice along a symbolic dim")
    lo, hi = node.attrs.get("start") or 0, node.attrs.get("end")
    hi = size if hi is None else hi
    lo = max(0, lo + size if lo < 0 else min(lo, size))
    hi = max(0, hi + size if hi < 0 else min(hi, size))
    if step != 1:
        if lo == 0 and hi == size and out.shape[ax] == size:
            step = 1
        else:
            # channels of this dim are not tracked (interleaved rotary's x[..., ::2] on
            # head_dim); every other dim passes through, so heads stay prunable
            reason = f"channels cannot be tracked (strided slice (step {step})) at node {node.name}"
            ctx.spaces.mark(ctx.layouts(x)[ax], reason)
            res = list(ctx.layouts(x))
            res[ax] = ctx.spaces.fresh_layout(out.shape[ax])
            ctx.spaces.mark(res[ax], reason)
            ctx.set(out, res)
            return
    ctx.set(out, _slice_out(ctx, x, ax, lo, hi))


def rule_split(node: Node, ctx) -> None:
    x = node.inputs[0]
    ax = _axis(node.attrs["axis"], x.rank)
    lo = 0
    for out in node.outputs:
        if not out.is_tensor:
            continue
        hi = lo + int(out.shape[ax])
        ctx.set(out, _slice_out(ctx, x, ax, lo, hi))
        lo = hi


def rule_select(node: Node, ctx) -> None:
    x = node.inputs[0]
    ax = _axis(node.attrs["axis"], x.rank)
    lx = ctx.layouts(x)
    ctx.spaces.mark(lx[ax], f"a single index is selected at {node.name}")
    ctx.set(node.outputs[0], [lay for d, lay in enumerate(lx) if d != ax])


def rule_attention(node: Node, ctx) -> None:
    q, k, v = node.inputs[0], node.inputs[1], node.inputs[2]
    mask = node.inputs[3] if len(node.inputs) > 3 else None
    sp = ctx.spaces
    lq, lk, lv = ctx.layouts(q), ctx.layouts(k), ctx.layouts(v)
    if q.rank != 4 or k.rank != 4 or v.rank != 4:
        raise LayoutConflict("attention expects [batch, heads, seq, head_dim] inputs")
    ctx.unify(lq[3], lk[3])
    ctx.unify(lk[2], lv[2])
    ctx.unify(lk[1], lv[1])
    hq, hk = q.shape[1], k.shape[1]
    if hq != hk:
        if not node.attrs.get("gqa") or hq % hk:
            raise LayoutConflict(f"{hq} query heads and {hk} key heads without GQA")
        ctx.unify(lq[1], list(lk[1]) + [sp.new(hq // hk, replica=True)])
    else:
        ctx.unify(lq[1], lk[1])
    for lay in (lq[1], lk[1]):
        sp.tag(lay, "heads")
    for lay in (lq[3], lv[3]):
        sp.tag(lay, "head_dim")
    if mask is not None and mask.is_tensor:
        scores = [lq[0], lq[1], lq[2], lk[2]]
        shape = [q.shape[0], hq, q.shape[2], k.shape[2]]
        off = 4 - mask.rank
        lm = ctx.layouts(mask)
        for d in range(mask.rank):
            if mask.shape[d] == shape[d + off] and mask.shape[d] != 1:
                ctx.unify(lm[d], scores[d + off])
    ctx.set(node.outputs[0], [lq[0], lq[1], lq[2], lv[3]])


def rule_source(node: Node, ctx) -> None:
    for out in node.outputs:
        ctx.set_fresh(out)


RULES: dict[OpKind, Rule] = {
    OpKind.LINEAR: rule_linear,
    OpKind.MATMUL: rule_matmul,
    OpKind.ELEMENTWISE: rule_elementwise,
    OpKind.ACTIVATION: rule_activation,
    OpKind.IDENTITY: rule_identity,
    OpKind.NORM: rule_norm,
    OpKind.REDUCTION: rule_reduction,
    OpKind.SOFTMAX: rule_softmax,
    OpKind.EMBEDDING: rule_embedding,
    OpKind.RESHAPE: rule_reshape,
    OpKind.TRANSPOSE: rule_transpose,
    OpKind.EXPAND: rule_expand,
    OpKind.CONCAT: rule_concat,
    OpKind.STACK: rule_stack,
    OpKind.SPLIT: rule_split,
    OpKind.SLICE: rule_slice,
    OpKind.SELECT: rule_select,
    OpKind.ATTENTION: rule_attention,
    OpKind.SOURCE: rule_source,
    OpKind.NOOP: rule_source,
}
