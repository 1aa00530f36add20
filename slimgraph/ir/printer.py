"""A readable text form of the IR, one line per node.

    %linear: f32[1,7,64] = linear(%mul_4, @model.layers.0.self_attn.q_proj.weight)
        {w_in=1, w_out=0}  # aten.linear.default      (on one line)
"""

from __future__ import annotations

from slimgraph.ir.graph import Graph, Node, Value

_SHORT = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "int64": "i64",
          "int32": "i32", "bool": "bool", "float64": "f64"}


def type_str(v: Value) -> str:
    if v.shape is None:
        return "scalar" if v.const is None else repr(v.const)
    dt = _SHORT.get(v.dtype or "", v.dtype or "?")
    return f"{dt}[{','.join(str(d) for d in v.shape)}]"


def ref(v: Value | None) -> str:
    if v is None:
        return "_"
    return f"@{v.name}" if v.param is not None else f"%{v.name}"


def node_str(n: Node) -> str:
    outs = ", ".join(f"%{o.name}: {type_str(o)}" for o in n.outputs) or "_"
    args = ", ".join(ref(v) for v in n.inputs)
    attrs = ""
    if n.attrs:
        attrs = " {" + ", ".join(f"{k}={v}" for k, v in n.attrs.items()) + "}"
    return f"  {outs} = {n.kind.value}({args}){attrs}  # {n.op}"


def print_graph(graph: Graph, *, params: bool = True) -> str:
    lines = [f"graph {graph.name} ({graph.source}) {{"]
    if params:
        for name, v in graph.params.items():
            kind = v.param.kind if v.param is not None else "param"
            lines.append(f"  {kind} @{name}: {type_str(v)}")
    for v in graph.inputs:
        lines.append(f"  input %{v.name}: {type_str(v)}")
    lines.extend(node_str(n) for n in graph.nodes)
    lines.append("  return " + ", ".join(ref(v) for v in graph.outputs))
    lines.append("}")
    return "\n".join(lines)
