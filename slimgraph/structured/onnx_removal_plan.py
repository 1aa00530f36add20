"""Planning structured removal on an ONNX model: new shapes, and the rewrites they need.

What the weights do not carry is rewritten from the analysis: every tensor dim of the
graph has a layout of channel spaces, so removing unit ``u`` of a group's space removes
``Tree.positions(space, u)`` from every dim that space reaches -- parameters *and*
activations. From that, for each ONNX value its new shape follows (:meth:`RemovalPlan.shapes`),
and these are rewritten (planned by :meth:`RemovalPlan.nodes`, carried out by
:func:`slimgraph.structured.onnx_removal.remove_units_onnx`):

- constant target shapes that encode a removed size (``Reshape`` / ``Expand`` /
  ``ConstantOfShape`` shape inputs, from an initializer or a ``Constant`` node; the
  ``[1, 7, 4, 16]`` / ``[4, 7, 16]`` / ``[1, 2, 2, 7, 16]`` of a static-shape export's
  attention) are rewritten, per use (a constant shared with an untouched layer is left
  to it); ``-1`` / ``0`` (inferred / copied) entries and broadcast ``1`` s stay;
- target shapes computed at run time (dynamic-axis exports: ``Concat(Shape(x)[0:1], [3],
  [3], Shape(x)[1:2], [64])`` for GQA's repeat, one Concat read by every layer) are
  traced through Concat / Slice / Gather / (Un)Squeeze / Cast to constants and to dims
  read by ``Shape``: a constant entry that encodes a changed size is rewritten in a copy
  of the Concat made for that use (with a new constant piece); an entry read from a
  value's dim must change with it (it does when that value shrinks too, e.g. the opset-18
  keys reshaped by ``Shape(k)``); dynamic dims of products (``4*batch``) follow at run time;
- ``Split`` sizes are rewritten, and the constant ``starts`` / ``ends`` of a ``Slice`` of
  a tensor whose sliced axis shrinks (Phi-3 cuts q, k and v out of its fused qkv_proj
  output at fixed offsets): each bound moves down by the removed positions before it;
  ``Attention``'s ``q_num_heads`` / ``kv_num_heads`` (4-D:
  the head dim; 3-D ``[B, L, H*E]``: width / head size) and
  ``RotaryEmbedding``'s ``num_heads`` (4-D: the head dim; 3-D: hidden / head size; the
  com.microsoft one too), when present, follow the new head counts;
- ONNX Runtime's fused attention (com.microsoft ``Attention``, ``MultiHeadAttention``,
  ``GroupQueryAttention``): the packed QKV weight and bias are sliced per section (their
  positions come from the analysis like any parameter's), and ``num_heads``,
  ``kv_num_heads`` and ``qkv_hidden_sizes`` are rewritten per node from the new sizes of
  its output and key (each layer gets its own counts);
- the shapes recorded on values (``value_info``) are updated (symbolic dims stay).

A node that would need a rewrite this module does not know (a size computed by shape
arithmetic such as ``Mul(batch, 4)`` or ``Add``, a constant behind another op, a
``num_heads`` attribute of another contrib op) is refused while planning, before
anything is changed, naming the node and the group.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from slimgraph.errors import PipelineError
from slimgraph.ir.dependency import DependencyResult

SHAPE_INPUT = {"Reshape": 1, "Expand": 1, "ConstantOfShape": 0}
# com.microsoft attention ops whose head counts removal rewrites (the importer turns the
# forms it cannot describe -- KV caches, per-head biases -- into barriers)
CONTRIB_ATTENTION = {"com.microsoft.Attention", "com.microsoft.MultiHeadAttention",
                     "com.microsoft.GroupQueryAttention"}


def constant_value(v) -> np.ndarray | None:
    """The value of an initializer or a ``Constant`` node output, else None."""
    if v is None:
        return None
    if v.const_value is not None:
        return v.const_value.numpy()
    p = v.producer()
    if p is not None and p.op_type == "Constant" and p.domain in ("", "ai.onnx"):
        a = p.attributes.get("value")
        if a is not None:
            return a.value.numpy()
        a = p.attributes.get("value_ints")
        if a is not None:
            return np.asarray(list(a.value), dtype=np.int64)
    return None


def _entries(v, depth: int = 0) -> list[tuple] | None:
    """The entries of a 1-D shape tensor: ``("const", int)``, or ``("dim", value, k)``
    for dim ``k`` of ``value`` read by ``Shape`` at run time; None when other ops (shape
    arithmetic) compute it."""
    if v is None or depth > 16:
        return None
    arr = constant_value(v)
    if arr is not None:
        return [("const", int(x)) for x in arr.reshape(-1)]
    p = v.producer()
    if p is None or p.domain not in ("", "ai.onnx"):
        return None
    op = p.op_type
    if op == "Shape":
        x = p.inputs[0]
        if x is None or x.shape is None:
            return None
        rank = len(x.shape)
        start, end = int(_attr(p, "start", 0)), _attr(p, "end", None)
        return [("dim", x, k) for k in range(rank)[slice(start, None if end is None else int(end))]]
    if op == "Concat":
        out = []
        for piece in p.inputs:
            got = _entries(piece, depth + 1)
            if got is None:
                return None
            out.extend(got)
        return out
    if op in ("Identity", "Cast", "Squeeze", "Unsqueeze", "Reshape"):
        return _entries(p.inputs[0], depth + 1)  # 0-D <-> 1-D: the order is kept
    if op == "Gather":
        got, idx = _entries(p.inputs[0], depth + 1), constant_value(p.inputs[1])
        if got is None or idx is None or int(_attr(p, "axis", 0)) != 0:
            return None
        return [got[int(i)] for i in idx.reshape(-1)]
    if op == "Slice":
        got = _entries(p.inputs[0], depth + 1)
        bounds = [constant_value(b) if b is not None else None for b in p.inputs[1:5]]
        bounds += [None] * (4 - len(bounds))
        start, end, axes, steps = bounds
        if got is None or start is None or end is None or start.size != 1 or (
                axes is not None and axes.reshape(-1).tolist() not in ([0], [-1])):
            return None
        step = int(steps.reshape(-1)[0]) if steps is not None else 1
        return got[slice(int(start.reshape(-1)[0]), int(end.reshape(-1)[0]), step)]
    return None


def _attr(node, name, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


class RemovalPlan:
    """New shapes of the ONNX values, and the constant rewrites they need."""

    def __init__(self, result: DependencyResult, selection: dict[int, list[int]]) -> None:
        self.result = result
        self.graph = result.graph
        self.model = self.graph.onnx_model
        by_id = {g.id: g for g in result.groups}
        self.sel = [(by_id[gid], units) for gid, units in selection.items() if units]
        self.names: dict[str, str] = self.graph.meta.get("onnx_values", {})
        self.new_shape: dict[str, tuple] = {}  # onnx value name -> new dims (changed only)
        self.old_shape: dict[str, tuple] = {}
        self.group_of: dict[str, str] = {}  # onnx value name -> group label that shrinks it
        self.rewrites: list[tuple[Any, int, np.ndarray, np.ndarray]] = []  # node, input, old, new
        self.attr_rewrites: list[tuple[Any, str, int, int]] = []
        self.list_rewrites: list[tuple[Any, str, list[int], list[int]]] = []
        # a shape input built by Concat at run time: (consumer, input, Concat, {piece: new})
        self.concat_rewrites: list[tuple[Any, int, Any, dict[int, np.ndarray]]] = []
        self.split_rewrites: list[tuple[Any, list[int], list[int]]] = []
        self.removed_at: dict[tuple[str, int], set[int]] = {}  # (onnx value, dim) -> positions

    @staticmethod
    def label(g) -> str:
        return f"{g.kind} group {g.id}" + (f" (layer {g.layer})" if g.layer is not None else "")

    def shapes(self) -> None:
        ctx = self.result.context
        sp = ctx.spaces
        for onnx_name, ir_name in self.names.items():
            v = self.graph.values.get(ir_name)
            if v is None or not v.is_tensor or v.shape is None or not ctx.has(v):
                continue
            dims = list(v.shape)
            changed = False
            for d, lay in enumerate(ctx.layouts(v)):
                if not isinstance(dims[d], int):
                    # a dynamic dim (batch, or 4*batch where the keys are transposed): its
                    # size comes from Shape at run time, never from a constant (the
                    # importer folds only shape ops that copy dims, no arithmetic)
                    continue
                tree = sp.tree(lay)
                leaves = set(tree.leaves())
                removed: set[int] = set()
                for g, units in self.sel:
                    if g.space not in leaves:
                        continue
                    for u in units:
                        p = tree.positions(g.space, u)
                        if p:
                            removed.update(p)
                            self.group_of.setdefault(onnx_name, self.label(g))
                if removed:
                    dims[d] -= len(removed)
                    self.removed_at[(onnx_name, d)] = removed
                    changed = True
            if changed:
                self.new_shape[onnx_name] = tuple(dims)
                self.old_shape[onnx_name] = tuple(v.shape)

    def nodes(self) -> None:
        for node in self.model.graph:
            outs = [o for o in node.outputs if o.name in self.new_shape]
            ins = [v for v in node.inputs if v is not None and v.name in self.new_shape]
            if not outs and not ins:
                continue
            op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
            if op in SHAPE_INPUT and outs:
                self._shape_input(node, SHAPE_INPUT[op], outs[0])
            elif op == "Split" and outs:
                self._split(node)
            elif op == "Slice" and node.inputs[0] is not None and node.inputs[0].name in self.new_shape:
                self._slice(node)
            elif op == "Attention":
                self._attention(node)
            elif op in ("RotaryEmbedding", "com.microsoft.RotaryEmbedding"):
                self._rotary(node)
            elif op in CONTRIB_ATTENTION:
                self._contrib_attention(node)
            elif "num_heads" in node.attributes or any(
                    a.type.name.startswith("GRAPH") for a in node.attributes.values()):
                why = ("has a num_heads attribute" if "num_heads" in node.attributes
                       else "has subgraphs")
                v = (outs or ins)[0]
                raise PipelineError(
                    f"{self.group_of.get(v.name, 'a group')}: ONNX node {node.name!r} ({op}) "
                    f"{why} that removal does not rewrite")

    def _where(self, node, v) -> str:
        return (f"{self.group_of.get(v.name, 'a group')}: ONNX node {node.name!r} "
                f"({node.op_type})")

    def _shape_input(self, node, idx: int, out) -> None:
        new, old = self.new_shape[out.name], self.old_shape[out.name]
        shape_v = node.inputs[idx] if idx < len(node.inputs) else None
        arr = constant_value(shape_v)
        if arr is None:
            self._runtime_shape(node, idx, out)
            return
        flat = arr.reshape(-1).astype(np.int64)
        if flat.size != len(new):
            raise PipelineError(f"{self._where(node, out)}: target shape {flat.tolist()} does "
                                f"not have rank {len(new)}")
        allowzero = bool(_attr(node, "allowzero", 0))
        out_arr = flat.copy()
        for d, (o, n) in enumerate(zip(old, new)):
            if o == n:
                continue
            if flat[d] == o:
                out_arr[d] = n
            elif flat[d] == -1 and node.op_type == "Reshape":
                continue
            elif flat[d] == 0 and node.op_type == "Reshape" and not allowzero:
                continue
            elif flat[d] == 1 and node.op_type == "Expand":
                continue
            else:
                raise PipelineError(f"{self._where(node, out)}: entry {d} of the target shape "
                                    f"{flat.tolist()} does not encode the size {o} that changes "
                                    f"to {n}")
        if not np.array_equal(out_arr, flat):
            self.rewrites.append((node, idx, flat, out_arr.astype(arr.dtype)))

    def _dims_of(self, name: str) -> tuple | None:
        """New dims of an ONNX value (its old ones when removal does not change it)."""
        if name in self.new_shape:
            return self.new_shape[name]
        v = self.graph.values.get(self.names.get(name, ""))
        return tuple(v.shape) if v is not None and v.shape is not None else None

    def _runtime_shape(self, node, idx: int, out) -> None:
        """A target shape computed at run time (a dynamic-axis export): ``Concat`` of
        pieces that are constants or read from ``Shape`` of other values. Each entry
        for a dim that changes must be a constant (rewritten in a copy of the Concat
        made for this use), an entry that adapts (``-1``; ``0`` for Reshape; a
        broadcast ``1`` for Expand), or the same dim of a value that shrinks with it."""
        new, old = self.new_shape[out.name], self.old_shape[out.name]
        where = self._where(node, out)
        shape_v = node.inputs[idx] if idx < len(node.inputs) else None
        concat = shape_v.producer() if shape_v is not None else None
        got = _entries(shape_v)
        if got is None:
            producer = concat.name if concat is not None else "?"
            raise PipelineError(
                f"{where} computes its target shape at run time with ops removal does not "
                f"follow (from node {producer!r}); the sizes it encodes cannot be rewritten")
        # per entry: (Concat input, offset) for a constant that is a direct Concat input
        pieces: list[tuple[int, int]] = [(-1, -1)] * len(got)
        if concat.op_type == "Concat":
            pieces = []
            for k, piece in enumerate(concat.inputs):
                direct = constant_value(piece) is not None
                pieces.extend((k, off) if direct else (-1, -1)
                              for off in range(len(_entries(piece))))
        if len(got) != len(new):
            raise PipelineError(f"{where}: its target shape has {len(got)} entries, the output "
                                f"rank is {len(new)}")
        allowzero = bool(_attr(node, "allowzero", 0))
        changed: dict[int, np.ndarray] = {}
        for d, (o, n) in enumerate(zip(old, new)):
            if o == n:
                continue
            e = got[d]
            if e[0] == "dim":
                dims = self._dims_of(e[1].name)
                if dims is not None and e[2] < len(dims) and dims[e[2]] == n:
                    continue
                raise PipelineError(
                    f"{where}: entry {d} of its target shape is read at run time from dim "
                    f"{e[2]} of {e[1].name!r}, which does not change from {o} to {n} with it")
            if e[0] == "const" and e[1] == o:
                k, off = pieces[d]
                if k < 0:
                    raise PipelineError(
                        f"{where}: entry {d} of its target shape is the constant {o} behind "
                        "ops removal does not rewrite (only constants that are direct inputs "
                        "of the Concat building the shape are)")
                arr = changed.get(k)
                if arr is None:
                    arr = changed[k] = constant_value(concat.inputs[k]).reshape(-1).copy()
                arr[off] = n
                continue
            if e[0] == "const" and (
                    (e[1] == -1 and node.op_type == "Reshape")
                    or (e[1] == 0 and node.op_type == "Reshape" and not allowzero)
                    or (e[1] == 1 and node.op_type == "Expand")):
                continue
            raise PipelineError(f"{where}: entry {d} of its target shape (the constant "
                                f"{e[1]}) does not encode the size {o} that changes to {n}")
        if changed:
            self.concat_rewrites.append((node, idx, concat, changed))

    def _rotary(self, node) -> None:
        x = node.inputs[0]
        new = self.new_shape.get(x.name)
        if new is None or "num_heads" not in node.attributes:
            return
        old = self.old_shape[x.name]
        heads = int(_attr(node, "num_heads"))
        if len(new) == 4:
            value = int(new[1])
        elif len(new) == 3 and heads and old[2] % heads == 0 and new[2] % (old[2] // heads) == 0:
            value = int(new[2]) // (old[2] // heads)
        else:
            raise PipelineError(f"{self._where(node, x)}: num_heads={heads} cannot be derived "
                                f"for the new input shape {list(new)}")
        if value != heads:
            self.attr_rewrites.append((node, "num_heads", heads, value))

    def _contrib_attention(self, node) -> None:
        """``num_heads`` (and ``kv_num_heads``, ``qkv_hidden_sizes``) of a com.microsoft
        attention node, from the new sizes of its output (``[B, S, num_heads * Dv]``) and,
        for GQA, its key (``[B, L, kv_num_heads * D]``, or the packed QKV query)."""
        out = node.outputs[0]
        new = self.new_shape.get(out.name)
        if new is None:
            return  # its heads are kept (the weights of an MLP may still shrink around it)
        where = self._where(node, out)
        old = self.old_shape[out.name]
        heads = int(_attr(node, "num_heads", 0))
        if len(new) != 3 or not heads or old[2] % heads or new[2] % (old[2] // heads):
            raise PipelineError(f"{where}: num_heads={heads} cannot be derived for the new "
                                f"output shape {list(new)}")
        dv = old[2] // heads
        n = int(new[2]) // dv
        self.attr_rewrites.append((node, "num_heads", heads, n))
        if node.op_type == "Attention" and "qkv_hidden_sizes" in node.attributes:
            sizes = [int(x) for x in _attr(node, "qkv_hidden_sizes")]
            self.list_rewrites.append((node, "qkv_hidden_sizes", sizes,
                                       [x // heads * n for x in sizes]))
        if node.op_type == "GroupQueryAttention":
            kv = int(_attr(node, "kv_num_heads", 0))
            q = node.inputs[0]
            packed = len(node.inputs) < 2 or node.inputs[1] is None
            x = q if packed else node.inputs[1]
            old_x, new_x = self.old_shape.get(x.name), self.new_shape.get(x.name)
            if old_x is None or new_x is None:
                raise PipelineError(f"{where}: its query heads change but not its KV heads")
            d = int(old_x[2]) // (heads + 2 * kv) if packed else int(old_x[2]) // kv
            n_kv = (int(new_x[2]) // d - n) // 2 if packed else int(new_x[2]) // d
            self.attr_rewrites.append((node, "kv_num_heads", kv, n_kv))

    def _split(self, node) -> None:
        axis = int(_attr(node, "axis", 0))
        sizes = []
        for o in node.outputs:
            shape = self.new_shape.get(o.name)
            if shape is None and o.name in self.names:
                shape = self.graph.values[self.names[o.name]].shape
            if not shape or not isinstance(shape[axis], int):
                raise PipelineError(f"{self._where(node, o)}: split sizes are unknown")
            sizes.append(int(shape[axis]))
        old = []
        for o in node.outputs:
            v = self.graph.values.get(self.names.get(o.name, ""))
            old.append(int(v.shape[axis]) if v is not None and v.shape else -1)
        if sizes != old:
            self.split_rewrites.append((node, old, sizes))

    def _slice(self, node) -> None:
        """Move the constant bounds of a Slice along every axis of its input that shrinks."""
        x = node.inputs[0]
        rank = len(self.old_shape[x.name])
        bounds = [constant_value(b) if b is not None else None for b in list(node.inputs[1:5])]
        bounds += [None] * (4 - len(bounds))
        starts, ends, axes, steps = bounds
        no_axes = len(node.inputs) < 4 or node.inputs[3] is None  # then 0, 1, ... len(starts)-1
        if no_axes:
            axes_l = None if starts is None else list(range(starts.size))
        else:
            axes_l = None if axes is None else [int(a) % rank for a in axes.reshape(-1)]
        moved = [(k, a) for k, a in enumerate(axes_l or []) if (x.name, a) in self.removed_at]
        if axes_l is not None and not moved:
            return  # no sliced axis shrinks
        if starts is None or ends is None or axes_l is None:
            raise PipelineError(f"{self._where(node, x)}: Slice bounds computed at run time "
                                "along an axis that removal shrinks")
        if steps is not None and any(int(steps.reshape(-1)[k]) != 1 for k, _ in moved):
            raise PipelineError(f"{self._where(node, x)}: a strided Slice along an axis that "
                                "removal shrinks")
        new_s, new_e = starts.reshape(-1).copy(), ends.reshape(-1).copy()
        for k, a in moved:
            old = int(self.old_shape[x.name][a])
            removed = self.removed_at[(x.name, a)]
            for arr in (new_s, new_e):
                b = int(arr[k])
                if arr is new_e and b >= old:
                    continue  # "to the end" (often INT64_MAX) stays so
                b = min(max(b + old if b < 0 else b, 0), old)
                arr[k] = b - sum(1 for r in removed if r < b)
        out = node.outputs[0]
        want = self.new_shape.get(out.name)
        for k, a in moved:
            dim = self.new_shape[x.name][a]
            if want is not None and isinstance(want[a], int) and \
                    min(int(new_e[k]), dim) - int(new_s[k]) != want[a]:
                raise PipelineError(
                    f"{self._where(node, x)}: the slice [{int(starts.reshape(-1)[k])}:"
                    f"{int(ends.reshape(-1)[k])}] of axis {a} does not cut along the units removed")
        for i, old_arr, new_arr in ((1, starts, new_s), (2, ends, new_e)):
            flat = old_arr.reshape(-1)
            if not np.array_equal(flat, new_arr):
                self.rewrites.append((node, i, flat, new_arr.astype(old_arr.dtype).reshape(old_arr.shape)))

    def _attention(self, node) -> None:
        for attr, i in (("q_num_heads", 0), ("kv_num_heads", 1)):
            if attr not in node.attributes:
                continue
            v = node.inputs[i]
            new = self.new_shape.get(v.name)
            if new is None:
                continue
            heads = int(_attr(node, attr))
            if len(new) == 4:
                self.attr_rewrites.append((node, attr, heads, int(new[1])))
                continue
            old = self.old_shape[v.name]  # 3-D: [B, L, H*E], E unchanged
            size = old[2] // heads
            if new[2] % size:
                raise PipelineError(f"{self._where(node, v)}: {new[2]} channels are not whole "
                                    f"heads of {size}")
            self.attr_rewrites.append((node, attr, heads, int(new[2] // size)))
