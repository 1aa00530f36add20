"""The importer: one pass over the ONNX graph, each node lowered to IR nodes.

Weights become parameters first (:mod:`slimgraph.frontends.onnx.provenance`). Then each
node is lowered in graph order: a ``Constant`` to a ``SOURCE`` whose output carries the
value in ``Value.const`` (small constants: shape tensors, axes, scalars); a node that
only computes on such constants to a folded ``SOURCE``
(:mod:`slimgraph.frontends.onnx.folding`, which also keeps shape tensors with symbolic
entries and completes shapes the file leaves unknown); ``SplitToSequence`` read back
only by ``SequenceAt`` at constant positions to a ``SPLIT``; a node with subgraphs to a
barrier over its inputs and every outer value its bodies read; any other node to what
its entry of :data:`~slimgraph.frontends.onnx.converters.CONVERTERS` makes of it, or
``OpKind.UNKNOWN`` (a barrier) when it has none or its assumptions do not hold (the
reason, where there is one, in ``attrs["why"]``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir

from slimgraph.frontends.onnx.context import (
    ConversionContext, UnsupportedNode, record_output_shape,
)
from slimgraph.frontends.onnx.contrib_ops import contrib_output_shape
from slimgraph.frontends.onnx.converters import CONVERTERS
from slimgraph.frontends.onnx.folding import (
    fold_constant_node, fold_symbolic_shape, infer_output_shape, is_unknown_dim,
)
from slimgraph.frontends.onnx.nodes import (
    CONST_MAX_ELEMENTS, as_python, dtype_name, ir_op_name, metadata_of, normalized_domain,
    parse_list_literal,
)
from slimgraph.frontends.onnx.provenance import (
    SCOPES_KEY, WeightProvenance, parse_graph_signature,
)
from slimgraph.frontends.onnx.weights import StoredTensor, identity_perm
from slimgraph.ir.graph import Graph, OpKind, Value


class OnnxImporter(WeightProvenance):
    """One import: walks the ONNX graph in order and builds the IR graph."""

    def __init__(self, model: ir.Model, path: Path) -> None:
        self.model = model
        self.g = model.graph
        self.path = path
        self.opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
        self.graph = Graph(self.g.name or path.stem, source="onnx")
        self.env: dict[int, Value] = {}  # id(ir.Value) -> IR value
        self.consts: dict[int, np.ndarray] = {}  # id(ir.Value) -> small constant
        self.storages: dict[int, StoredTensor] = {}  # id(ir.Value) -> stored tensor
        self.use_map: dict[tuple[int, int], tuple[Value, tuple[int, ...]]] = {}
        self.views: dict[int, tuple[Value, tuple[int, ...]]] = {}  # id(IR value) -> param, perm
        self.view_cache: dict[tuple[int, tuple[int, ...]], Value] = {}
        self.param_of_storage: dict[int, Value] = {}  # default param for a storage
        self.provenance: dict[str, str] = {}
        self.seq_parts: dict[int, list[Value]] = {}  # id(sequence value) -> SPLIT outputs
        # id(ir.Value) -> a shape tensor computed at run time from symbolic dims: an object
        # array of ints and dim names (``Shape`` of a dynamic-axis value, sliced, concatenated)
        self.symbolic: dict[int, np.ndarray] = {}
        # id(ir.Value) -> shape completed by the importer where the file's is unknown
        self.inferred: dict[int, tuple] = {}
        self.sig = parse_graph_signature(model)
        self._names: set[str] = set()
        self._node_names: set[str] = set()

    # naming -----------------------------------------------------------------------
    def unique_name(self, base: str) -> str:
        name, k = base or "v", 1
        while name in self._names or name in self.graph.values:
            k += 1
            name = f"{base}.{k}"
        self._names.add(name)
        return name

    def _node_name(self, node: ir.Node, index: int) -> str:
        return self.unique_node_name(node.name or f"{node.op_type}_{index}")

    # shapes -------------------------------------------------------------------------
    def shape(self, v: ir.Value | None):
        if v is not None and id(v) in self.inferred:
            return self.inferred[id(v)]
        if v is None or v.shape is None:
            return None
        dims = []
        for i, d in enumerate(v.shape):
            if isinstance(d, int):
                dims.append(int(d))
            elif getattr(d, "value", None) is not None:
                dims.append(str(d.value))
            else:
                dims.append(f"?{v.name}:{i}")
        return tuple(dims)

    # -- run -----------------------------------------------------------------------
    def run(self) -> Graph:
        try:
            self.g.sort()
        except Exception:
            pass
        self.collect_storages()
        self.make_params()
        init_names = set(self.g.initializers)
        for v in self.g.inputs:
            if v.name in init_names:
                continue  # keep_initializers_as_inputs: the initializer stands in
            self.env[id(v)] = self.graph.add_input(self.unique_name(v.name), self.shape(v),
                                                   dtype_name(v.dtype))
        for index, node in enumerate(self.g):
            self._lower(node, index)
        outs = [self.value_of(v) for v in self.g.outputs]
        self.graph.set_outputs([v for v in outs if v is not None and v.is_tensor])
        self.graph.onnx_model = self.model
        self.graph.meta.update({
            "onnx_path": str(self.path),
            "opset": self.opset,
            "producer": " ".join(x for x in (self.model.producer_name,
                                             self.model.producer_version) if x),
            "onnx_provenance": self.provenance,
            # ONNX value name -> IR value name (node outputs and graph inputs)
            "onnx_values": {v.name: self.env[id(v)].name
                            for v in [*self.g.inputs, *(o for n in self.g for o in n.outputs)]
                            if v.name and id(v) in self.env},
        })
        return self.graph

    # -- values ----------------------------------------------------------------------------
    def view(self, param: Value, perm: tuple[int, ...]) -> Value:
        """``param`` as stored (transposed by ``perm``), via a TRANSPOSE node."""
        if perm == identity_perm(len(perm)):
            return param
        key = (id(param), perm)
        if key not in self.view_cache:
            shape = tuple(param.shape[p] for p in perm)
            name = self.unique_name(f"{param.name}.T")
            node = self.graph.add_node(self.unique_node_name(f"transpose:{param.name}"),
                                       OpKind.TRANSPOSE, "Transpose(stored)", [param],
                                       [(name, shape, param.dtype)], {"perm": list(perm)})
            self.views[id(node.outputs[0])] = (param, perm)
            self.view_cache[key] = node.outputs[0]
        return self.view_cache[key]

    def unique_node_name(self, base: str) -> str:
        name, k = base, 1
        while name in self._node_names:
            k += 1
            name = f"{base}.{k}"
        self._node_names.add(name)
        return name

    def value_of(self, v: ir.Value | None, use: tuple[int, int] | None = None) -> Value | None:
        if v is None or (not v.name and id(v) not in self.env):
            return None
        if use is not None and use in self.use_map:
            param, perm = self.use_map[use]
            return self.view(param, perm)
        if id(v) in self.env:
            return self.env[id(v)]
        if id(v) in self.param_of_storage:
            param = self.param_of_storage[id(v)]
            s = self.storages[id(v)]
            for t in param.param.targets:
                if t.storage is s:
                    return self.view(param, t.perm)
            return param
        if id(v) in self.consts or id(v) in self.storages:  # a stored non-weight constant
            arr = self.consts.get(id(v))
            if arr is None:
                arr = self.storages[id(v)].array()
            name = self.unique_name(v.name)
            node = self.graph.add_node(self.unique_node_name(f"const:{v.name}"), OpKind.SOURCE,
                                       "Constant", [], [(name, tuple(arr.shape), str(arr.dtype))])
            out = node.outputs[0]
            if arr.size <= CONST_MAX_ELEMENTS:
                out.const = as_python(arr)
            self.env[id(v)] = out
            return out
        return None

    def param_at(self, node: ir.Node, i: int) -> tuple[Value, tuple[int, ...]] | None:
        """The parameter behind input ``i`` and the perm it is seen through, if any."""
        if i >= len(node.inputs) or node.inputs[i] is None:
            return None
        key = (id(node), i)
        if key in self.use_map:
            return self.use_map[key]
        v = self.env.get(id(node.inputs[i]))
        if v is None:
            return None
        if v.param is not None:
            return v, identity_perm(v.rank)
        return self.views.get(id(v))

    def shape_tensor(self, v: ir.Value | None) -> list | None:
        """The entries of a 1-D shape tensor known at import time: ints, and dim names
        where they are only known at run time (a dynamic axis), else None."""
        if v is None:
            return None
        arr = self.consts.get(id(v))
        if arr is None:
            arr = self.symbolic.get(id(v))
        if arr is None or arr.ndim != 1:
            return None
        return [x if isinstance(x, str) else int(x) for x in arr.tolist()]

    def _complete_shapes(self, node: ir.Node) -> None:
        """Fill the unknown dims (``?``) of ``node``'s output from its inputs' shapes.

        The dynamo exporter records most shapes, but not those of values reshaped to
        targets computed at run time (``Reshape(k, Concat([-1], Shape(k)[2:]))`` of an
        opset-18 attention): ONNX shape inference cannot resolve a ``-1`` next to a
        symbolic dim. Here dims are products of symbols (``4*batch``), so it can."""
        if (len(node.outputs) != 1 or normalized_domain(node.domain) != ""
                or not node.outputs[0].name):
            return
        out = node.outputs[0]
        have = self.shape(out)
        if have is not None and not any(is_unknown_dim(d) for d in have):
            return
        try:
            got = infer_output_shape(node, self)
        except (TypeError, ValueError, IndexError, KeyError):
            got = None
        if got is None or (have is not None and len(have) != len(got)):
            return
        if have is not None:
            got = tuple(g if is_unknown_dim(h) else h for h, g in zip(have, got))
        self.inferred[id(out)] = tuple(got)

    # -- nodes -----------------------------------------------------------------------------
    def _lower_sequence(self, node: ir.Node, index: int) -> bool:
        """SplitToSequence read back only by SequenceAt at constant positions: a SPLIT."""
        ctx = ConversionContext(self, node)
        if node.op_type == "SequenceAt":
            parts = self.seq_parts.get(id(node.inputs[0]))
            pos = ctx.const(1)
            if parts is None or pos is None or pos.size != 1:
                return False
            part = parts[int(pos.reshape(-1)[0])]
            out = node.outputs[0]
            ir_node = self.graph.add_node(self._node_name(node, index), OpKind.IDENTITY,
                                          ir_op_name(node), [part],
                                          [(self.unique_name(out.name), part.shape, part.dtype)])
            self.env[id(out)] = ir_node.outputs[0]
            return True
        seq, shape = node.outputs[0], ctx.in_shape(0)
        if shape is None or any(u.node.op_type != "SequenceAt" or u.idx != 0 or
                                id(u.node.inputs[1]) not in self.consts for u in seq.uses()):
            return False
        axis = ctx.attr("axis", 0)
        axis = axis + len(shape) if axis < 0 else axis
        size = shape[axis]
        split = ctx.const(1) if len(node.inputs) > 1 and node.inputs[1] is not None else None
        if not isinstance(size, int) or (split is None and len(node.inputs) > 1
                                         and node.inputs[1] is not None):
            return False
        if split is None:
            if not ctx.attr("keepdims", 1):
                return False
            sizes = [1] * size
        elif split.ndim == 0:
            step = int(split)
            sizes = [min(step, size - lo) for lo in range(0, size, step)]
        else:
            sizes = [int(x) for x in split.reshape(-1)]
        if sum(sizes) != size:
            return False
        dtype = dtype_name(node.inputs[0].dtype)
        outs = [(self.unique_name(f"{seq.name}.{i}"),
                 tuple(n if d == axis else shape[d] for d in range(len(shape))), dtype)
                for i, n in enumerate(sizes)]
        ir_node = self.graph.add_node(self._node_name(node, index), OpKind.SPLIT, ir_op_name(node),
                                      [ctx.inp(0)], outs, {"axis": axis, "sizes": sizes})
        self.seq_parts[id(seq)] = ir_node.outputs
        return True

    def _captured(self, node: ir.Node) -> list[Value]:
        seen: dict[int, Value] = {}
        bodies = []
        for a in node.attributes.values():
            if a.type == ir.AttributeType.GRAPH:
                bodies.append(a.value)
            elif a.type == ir.AttributeType.GRAPHS:
                bodies.extend(a.value)
        inner_nodes = [n for body in bodies for n in ir.traversal.RecursiveGraphIterator(body)]
        for inner in inner_nodes:
            for v in inner.inputs:
                if v is not None and id(v) not in seen and (
                        id(v) in self.env or id(v) in self.storages):
                    ir_value = self.value_of(v)
                    if ir_value is not None:
                        seen[id(v)] = ir_value
        return list(seen.values())

    def _lower(self, node: ir.Node, index: int) -> None:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            out = node.outputs[0]
            if id(out) in self.param_of_storage:
                return  # a weight: the parameter stands in for it
            if id(out) in self.consts or id(out) in self.storages:
                arr = self.consts.get(id(out))
                if arr is None:
                    arr = self.storages[id(out)].array()
                ir_node = self.graph.add_node(
                    self._node_name(node, index), OpKind.SOURCE, "Constant", [],
                    [(self.unique_name(out.name), tuple(arr.shape), str(arr.dtype))])
                if arr.size <= CONST_MAX_ELEMENTS:
                    ir_node.outputs[0].const = as_python(arr)
                self.env[id(out)] = ir_node.outputs[0]
                return
        if (node.op_type in ("SplitToSequence", "SequenceAt")
                and normalized_domain(node.domain) == ""):
            if self._lower_sequence(node, index):
                return
        folded = fold_constant_node(node, self.consts, self.shape)
        if folded is None:
            sym = fold_symbolic_shape(node, self.consts, self.symbolic, self.shape)
            if sym is not None:
                self.symbolic[id(node.outputs[0])] = sym
        self._complete_shapes(node)
        ctx = ConversionContext(self, node)
        if folded is not None:
            kind, inputs, attrs = OpKind.SOURCE, [], {"folded": True}
        elif any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
                 for a in node.attributes.values()):
            # control flow: a barrier over its inputs and every outer value its bodies read
            kind, attrs = OpKind.UNKNOWN, {"why": "subgraphs are not imported"}
            inputs = ctx.all_inputs() + self._captured(node)
        else:
            if (normalized_domain(node.domain) == "com.microsoft" and node.outputs
                    and node.outputs[0].name):
                shape = contrib_output_shape(ctx)
                if shape is not None:
                    record_output_shape(ctx, 0, shape)
            conv = CONVERTERS.get((normalized_domain(node.domain), node.op_type))
            kind, inputs, attrs = OpKind.UNKNOWN, None, {}
            if conv is not None:
                try:
                    kind, inputs, attrs = conv(ctx)
                except (UnsupportedNode, TypeError, ValueError, IndexError, KeyError,
                        AttributeError) as e:
                    kind, inputs, attrs = OpKind.UNKNOWN, None, {"why": str(e)}
            if inputs is None:
                inputs = ctx.all_inputs()
        # an output that is one of the values the converter emitted (e.g. the residual sum
        # a SkipLayerNormalization also returns): its readers read that value
        aliases = attrs.pop("_aliases", {}) if isinstance(attrs, dict) else {}
        outs = [(self.unique_name(o.name or f"{node.name}.out{i}"),
                 self.shape(o) if o.name else None, dtype_name(o.dtype) if o.name else None)
                for i, o in enumerate(node.outputs)]
        if kind not in (OpKind.SOURCE, OpKind.NOOP, OpKind.UNKNOWN) and (
                any(v is not None and v.shape is None for v in inputs)
                or (outs and outs[0][1] is None)):
            kind, attrs, aliases = OpKind.UNKNOWN, {"why": "shapes unknown"}, {}
        md = metadata_of(node)
        scopes = parse_list_literal(md.get(SCOPES_KEY))
        meta = {"module": str(scopes[-2]) if len(scopes) >= 2 else "", "domain": node.domain}
        ir_node = self.graph.add_node(self._node_name(node, index), kind,
                                      ir_op_name(node), inputs, outs, attrs, meta)
        for i, o in enumerate(node.outputs):
            self.env[id(o)] = aliases.get(i, ir_node.outputs[i])
            if folded is not None and i < len(folded) and folded[i] is not None:
                self.consts[id(o)] = folded[i]
                if folded[i].size <= CONST_MAX_ELEMENTS:
                    ir_node.outputs[i].const = as_python(folded[i])
        if kind is OpKind.TRANSPOSE or kind is OpKind.IDENTITY:
            src = ctx.param_at(0)
            if src is not None and inputs and inputs[0] is not None:
                param, perm = src
                tperm = tuple(attrs.get("perm", identity_perm(len(perm))))
                self.views[id(ir_node.outputs[0])] = (param, tuple(perm[p] for p in tperm))
