"""What a converter works with: the node in hand (:class:`_Ctx`) and what it returns.

A converter (an entry of :data:`slimgraph.frontends.onnx.converters.CONVERTERS`) takes
a :class:`_Ctx` and returns ``Converted``: the ``OpKind`` of the node, its IR inputs
(``None``: all of them) and normalized attributes. It may emit extra IR nodes before
the node (``_Ctx.emit``) and record output shapes the file leaves unknown
(:func:`_set_shape`); it raises :class:`_Unsupported` when the node does not fit its
assumptions, and the node becomes a barrier.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from slimgraph.frontends.onnx.folding import _unknown
from slimgraph.frontends.onnx.nodes import _attr, _op_name
from slimgraph.ir.graph import OpKind, Value

if TYPE_CHECKING:
    from slimgraph.frontends.onnx.importer import _Importer

Converted = tuple[OpKind, list[Any] | None, dict[str, Any]]


class _Unsupported(Exception):
    """A converter's assumptions do not hold: the node becomes UNKNOWN."""


class _Ctx:
    """What a converter sees: the ONNX node and the IR values of its inputs."""

    def __init__(self, imp: _Importer, node: ir.Node) -> None:
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
        return _attr(self.node, name, default)

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
        name = self.imp._unique(f"{base}.{kind.value}")
        n = self.imp.graph.add_node(self.imp._node_name_str(f"{base}:{kind.value}"), kind,
                                    _op_name(self.node), inputs, [(name, shape, dtype)],
                                    attrs or {})
        return n.outputs[0]


def _set_shape(ctx: _Ctx, i: int, shape: tuple) -> None:
    """Record the shape of output ``i`` where the file leaves it (partly) unknown: ONNX
    shape inference does not know com.microsoft ops."""
    out = ctx.node.outputs[i]
    have = ctx.imp.shape(out)
    if have is None or len(have) != len(shape) or any(_unknown(d) for d in have):
        ctx.imp.inferred[id(out)] = tuple(shape)
