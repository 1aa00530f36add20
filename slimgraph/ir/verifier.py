"""Structural checks of a graph; run between passes (``--no-verify`` turns it off).

Each problem is reported with the node or value at fault; ``verify`` raises one
:class:`VerificationError` listing all of them.
"""

from __future__ import annotations

from slimgraph.errors import VerificationError
from slimgraph.ir.graph import Graph, OpKind, Use

_REQUIRED_ATTRS = {
    OpKind.LINEAR: ("w_in", "w_out"),
    OpKind.TRANSPOSE: ("perm",),
    OpKind.CONCAT: ("axis",),
    OpKind.STACK: ("axis",),
    OpKind.SPLIT: ("axis",),
    OpKind.SLICE: ("axis",),
    OpKind.SELECT: ("axis",),
    OpKind.NORM: ("axes",),
    OpKind.SOFTMAX: ("axis",),
}


def problems(graph: Graph) -> list[str]:
    out: list[str] = []
    defined = {id(v) for v in graph.inputs} | {id(v) for v in graph.params.values()}
    for name, v in graph.params.items():
        if v.param is None:
            out.append(f"param {name}: no parameter handle")
        elif v.shape is not None and tuple(v.shape) != tuple(v.param.shape):
            out.append(f"param {name}: IR shape {list(v.shape)} != weight shape {list(v.param.shape)}")
    for node in graph.nodes:
        for i, v in enumerate(node.inputs):
            if v is None:
                continue
            if id(v) not in defined and v.producer is None and v.param is None:
                out.append(f"node {node.name}: input {i} (%{v.name}) has no producer")
            elif id(v) not in defined:
                out.append(f"node {node.name}: input {i} (%{v.name}) is used before it is defined")
            if Use(node, i) not in v.uses:
                out.append(f"node {node.name}: input {i} (%{v.name}) is missing from its use-list")
        for k in _REQUIRED_ATTRS.get(node.kind, ()):
            if k not in node.attrs:
                out.append(f"node {node.name} ({node.kind.value}): missing attribute {k!r}")
        if node.kind is OpKind.LINEAR:
            w = node.inputs[1] if len(node.inputs) > 1 else None
            if w is None or w.param is None:
                out.append(f"node {node.name}: linear weight is not a parameter")
        for j, o in enumerate(node.outputs):
            if o.producer is not node or o.output_index != j:
                out.append(f"node {node.name}: output {j} (%{o.name}) does not point back to it")
            defined.add(id(o))
        for v in node.inputs:
            if v is not None:
                for u in v.uses:
                    if u.node.inputs[u.index] is not v:
                        out.append(f"value %{v.name}: stale use by {u.node.name}")
    for v in graph.outputs:
        if id(v) not in defined:
            out.append(f"graph output %{v.name} is not defined")
    return out


def verify(graph: Graph) -> None:
    found = problems(graph)
    if found:
        head = "; ".join(found[:10])
        more = f" (and {len(found) - 10} more)" if len(found) > 10 else ""
        raise VerificationError(f"graph {graph.name!r} failed verification: {head}{more}")
