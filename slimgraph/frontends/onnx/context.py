"""What a converter works with: the node in hand, what it returns, and what it may refuse.

A converter (an entry of :data:`slimgraph.frontends.onnx.converters.CONVERTERS`) takes
a :class:`ConversionContext` and returns ``Converted``: the ``OpKind`` of the node, its
IR inputs (``None``: all of them) and normalized attributes. It may emit extra IR nodes
before the node (``ConversionContext.emit``) and record output shapes the file leaves
unknown (:func:`record_output_shape`); it raises :class:`UnsupportedNode` when the node
does not fit its assumptions, and the node becomes a barrier. What the context reads of
the import in progress is :class:`ImporterState` (the importer is one), so this module
does not depend on the importer.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import onnx_ir as ir

from slimgraph.frontends.onnx.folding import is_unknown_dim
from slimgraph.frontends.onnx.nodes import attr_value, ir_op_name
from slimgraph.ir.graph import Graph, OpKind, Value

Converted = tuple[OpKind, list[Any] | None, dict[str, Any]]


class ImporterState(Protocol):
    """What converters read of the import in progress, and extend: the ONNX graph (``g``)
    and the IR graph being built (``graph``), the small constants and completed shapes
    (by ``id`` of the ONNX value), and the IR value or parameter behind an input.
    :class:`slimgraph.frontends.onnx.importer.OnnxImporter` is one."""

    opset: int
    g: ir.Graph
    graph: Graph
    consts: dict[int, np.ndarray]
    inferred: dict[int, tuple]

    def shape(self, v: ir.Value | None) -> tuple | None: ...

    def value_of(self, v: ir.Value | None, use: tuple[int, int] | None = None) -> Value | None: ...

    def param_at(self, node: ir.Node, i: int) -> tuple[Value, tuple[int, ...]] | None: ...

    def unique_name(self, base: str) -> str: ...

    def unique_node_name(self, base: str) -> str: ...


class UnsupportedNode(Exception):
    """A converter's assumptions do not hold: the node becomes UNKNOWN."""


class ConversionContext:
    """What a converter sees: the ONNX node and the IR values of its inputs."""

    def __init__(self, imp: ImporterState, node: ir.Node) -> None:
        self.imp = imp
        self.node = node

    @property
    def n_inputs(self) -> int:
        return len(self.node.inputs)

    def inp(self, i: int) -> Value | None:
        if i >= len(self.node.inputs):
            return None
        return self.imp.value_of(self.node.inputs[i], (id(self.node), i))

    def all_inputs(self) -> list[Value | None]:
        return [self.inp(i) for i in range(len(self.node.inputs))]

    def param_at(self, i: int):
        return self.imp.param_at(self.node, i)

    def const(self, i: int) -> np.ndarray | None:
        if i >= len(self.node.inputs) or self.node.inputs[i] is None:
            return None
        return self.imp.consts.get(id(self.node.inputs[i]))

    def attr(self, name: str, default=None):
        return attr_value(self.node, name, default)

    def rank(self, i: int) -> int | None:
        v = self.node.inputs[i] if i < len(self.node.inputs) else None
        s = self.imp.shape(v)
        return None if s is None else len(s)

    def in_shape(self, i: int):
        return self.imp.shape(self.node.inputs[i]) if i < len(self.node.inputs) else None

    def out_shape(self, i: int = 0):
        return self.imp.shape(self.node.outputs[i])

    def emit(self, kind: OpKind, inputs: list, shape, dtype, attrs=None) -> Value:
        """An extra IR node before this one (e.g. the LINEAR part of a Gemm with a 2-D C)."""
        base = self.node.name or self.node.op_type
        name = self.imp.unique_name(f"{base}.{kind.value}")
        n = self.imp.graph.add_node(self.imp.unique_node_name(f"{base}:{kind.value}"), kind,
                                    ir_op_name(self.node), inputs, [(name, shape, dtype)],
                                    attrs or {})
        return n.outputs[0]


def record_output_shape(ctx: ConversionContext, i: int, shape: tuple) -> None:
    """Record the shape of output ``i`` where the file leaves it (partly) unknown: ONNX
    shape inference does not know com.microsoft ops."""
    out = ctx.node.outputs[i]
    have = ctx.imp.shape(out)
    if have is None or len(have) != len(shape) or any(is_unknown_dim(d) for d in have):
        ctx.imp.inferred[id(out)] = tuple(shape)
