"""A framework-neutral graph IR.

Values carry shapes, dtypes, their producer and a use-list; nodes carry a normalized
op kind (``OpKind``) plus the original op name and normalized attributes; parameters
are values bound to a :class:`~slimgraph.ir.params.ParamHandle` that reads and writes
the weight in its source (an ``nn.Module`` or an ONNX initializer).

Frontends build graphs with :meth:`Graph.add_input`, :meth:`Graph.add_param` and
:meth:`Graph.add_node`; they are responsible for translating their ops into the
normalized kinds and attributes documented on :class:`OpKind`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from slimgraph.ir.params import ParamHandle

if TYPE_CHECKING:
    import onnx_ir

Dim = int | str  # a concrete size, or the name of a symbolic size


class OpKind(str, enum.Enum):
    """Normalized op kinds; one channel rule exists per kind (see ``rules.py``).

    Attributes each kind expects in ``Node.attrs`` (all axes may be negative):

    - LINEAR: inputs ``[x, W, b?]`` with ``W`` a parameter; ``w_in``/``w_out`` = the
      dims of ``W`` that hold input and output channels.
    - MATMUL: inputs ``[a, b]``, numpy ``matmul`` semantics (both activations).
    - ELEMENTWISE / ACTIVATION: n-ary broadcasting ops (non-tensor inputs are None).
    - IDENTITY: output has the input's layout (casts, copies, dropout).
    - NORM: inputs ``[x, weight?, bias?]``; ``axes``; ``stat`` in {"rms", "layer"}.
    - REDUCTION: ``axes``, ``keepdim``, ``op`` (mean, sum, max, ...).
    - SOFTMAX: ``axis``.
    - EMBEDDING: inputs ``[table, ids]``; table is ``[num, dim]``.
    - RESHAPE: data order kept, shape changed (view, reshape, (un)squeeze, flatten).
    - TRANSPOSE: ``perm``.
    - EXPAND: broadcast size-1 dims to the output shape.
    - CONCAT: ``axis``.  SPLIT: ``axis``, ``sizes`` (one output per size).
    - STACK: ``axis`` (a new dim at ``axis`` of the output, one entry per input).
    - SLICE: ``axis``, ``start``, ``end``, ``step``.  SELECT: ``axis`` (dim removed).
    - ATTENTION: inputs ``[q, k, v, mask?]`` shaped ``[B, H, L, E]``; ``gqa`` flag.
    - SOURCE: creates a tensor from nothing channel-related (arange, full, zeros).
    - NOOP: no tensor output that carries channels (asserts, shape queries).
    - UNKNOWN: no rule; the analysis turns it into a barrier.
    """

    LINEAR = "linear"
    MATMUL = "matmul"
    ELEMENTWISE = "elementwise"
    ACTIVATION = "activation"
    IDENTITY = "identity"
    NORM = "norm"
    REDUCTION = "reduction"
    SOFTMAX = "softmax"
    EMBEDDING = "embedding"
    RESHAPE = "reshape"
    TRANSPOSE = "transpose"
    EXPAND = "expand"
    CONCAT = "concat"
    STACK = "stack"
    SPLIT = "split"
    SLICE = "slice"
    SELECT = "select"
    ATTENTION = "attention"
    SOURCE = "source"
    NOOP = "noop"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Use:
    node: "Node"
    index: int


@dataclass(eq=False)
class Value:
    """A tensor (or scalar) flowing through the graph; compared by identity."""

    name: str
    shape: tuple[Dim, ...] | None = None
    dtype: str | None = None
    producer: "Node | None" = None
    output_index: int = 0
    uses: list[Use] = field(default_factory=list)
    param: ParamHandle | None = None
    const: Any = None  # small python constants (scalars, shape lists) when known

    @property
    def rank(self) -> int:
        return len(self.shape) if self.shape is not None else 0

    @property
    def is_tensor(self) -> bool:
        return self.shape is not None

    def __repr__(self) -> str:
        return f"%{self.name}"


@dataclass(eq=False)
class Node:
    name: str
    kind: OpKind
    op: str  # original op name, e.g. "aten.linear.default" or "MatMul"
    inputs: list[Value | None]
    outputs: list[Value]
    attrs: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. source module path

    def __repr__(self) -> str:
        return f"Node({self.name}: {self.kind.value} {self.op})"


class Graph:
    """Nodes in topological order, values by name, parameters by canonical name."""

    def __init__(self, name: str = "graph", source: str = "") -> None:
        self.name = name
        self.source = source  # "torch" or "onnx"
        self.nodes: list[Node] = []
        self.inputs: list[Value] = []
        self.outputs: list[Value] = []
        self.params: dict[str, Value] = {}
        self.values: dict[str, Value] = {}
        self.meta: dict[str, Any] = {}

    # -- construction -------------------------------------------------------------
    def _new_value(self, name: str, shape, dtype, **kw) -> Value:
        if name in self.values:
            raise ValueError(f"duplicate value name {name!r}")
        v = Value(name=name, shape=None if shape is None else tuple(shape), dtype=dtype, **kw)
        self.values[name] = v
        return v

    def add_input(self, name: str, shape, dtype: str | None) -> Value:
        v = self._new_value(name, shape, dtype)
        self.inputs.append(v)
        return v

    def add_param(self, name: str, handle: ParamHandle) -> Value:
        v = self._new_value(name, handle.shape, handle.dtype, param=handle)
        self.params[name] = v
        return v

    def add_node(
        self,
        name: str,
        kind: OpKind,
        op: str,
        inputs: list[Value | None],
        outputs: list[tuple[str, Any, str | None]],
        attrs: dict[str, Any] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> Node:
        """Append a node; ``outputs`` are ``(name, shape or None, dtype)`` triples."""
        node = Node(name, kind, op, list(inputs), [], dict(attrs or {}), dict(meta or {}))
        for i, (oname, shape, dtype) in enumerate(outputs):
            node.outputs.append(self._new_value(oname, shape, dtype, producer=node, output_index=i))
        for i, v in enumerate(node.inputs):
            if v is not None:
                v.uses.append(Use(node, i))
        self.nodes.append(node)
        return node

    def set_outputs(self, values: list[Value]) -> None:
        self.outputs = list(values)

    # -- the ONNX model behind an imported graph --------------------------------------
    @property
    def onnx_model(self) -> onnx_ir.Model | None:
        """The ``onnx_ir`` model an ONNX import built this graph from (its parameters
        read and write that model's initializers); None for a PyTorch graph. Kept in
        ``meta["onnx_model"]``; this is the one place that key is spelled."""
        return self.meta.get("onnx_model")

    @onnx_model.setter
    def onnx_model(self, model: onnx_ir.Model | None) -> None:
        self.meta["onnx_model"] = model

    @property
    def onnx_modified(self) -> bool:
        """True once a pass changed :attr:`onnx_model` in memory (weights or shapes), so
        the input file no longer is the model. Kept in ``meta["onnx_modified"]``."""
        return bool(self.meta.get("onnx_modified"))

    @onnx_modified.setter
    def onnx_modified(self, modified: bool) -> None:
        self.meta["onnx_modified"] = modified

    # -- queries ------------------------------------------------------------------
    def num_parameters(self) -> int:
        total = 0
        for v in self.params.values():
            if v.param is not None and v.param.kind != "buffer":
                n = 1
                for d in v.param.shape:
                    n *= int(d)
                total += n
        return total

    def op_histogram(self) -> dict[str, int]:
        hist: dict[str, int] = {}
        for n in self.nodes:
            hist[n.kind.value] = hist.get(n.kind.value, 0) + 1
        return dict(sorted(hist.items(), key=lambda kv: -kv[1]))

    def unknown_nodes(self) -> list[Node]:
        return [n for n in self.nodes if n.kind is OpKind.UNKNOWN]

    def __repr__(self) -> str:
        return (
            f"Graph({self.name!r}, source={self.source!r}, nodes={len(self.nodes)}, "
            f"params={len(self.params)})"
        )
