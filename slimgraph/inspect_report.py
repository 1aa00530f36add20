"""What `slimgraph inspect` shows: a graph summary, the channel groups, ops, DOT."""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import networkx as nx

from slimgraph.io import atomic_write_text
from slimgraph.ir.dependency import DependencyResult
from slimgraph.ir.graph import Graph, OpKind

KIND_COLORS = {"heads": "#f4a261", "qheads": "#e76f51", "mlp": "#2a9d8f", "hidden": "#8ecae6", "channels": "#dddddd"}


def summary(graph: Graph, result: DependencyResult) -> dict[str, Any]:
    groups = result.groups
    by_kind = Counter(g.kind for g in groups)
    prunable = Counter(g.kind for g in groups if g.prunable)
    return {
        "model": graph.name,
        "source": graph.source,
        "nodes": len(graph.nodes),
        "parameters": graph.num_parameters(),
        "param_tensors": sum(1 for v in graph.params.values() if v.param.kind != "buffer"),
        "groups": len(groups),
        "groups_by_kind": dict(by_kind),
        "prunable_by_kind": dict(prunable),
        "barriers": len(result.barriers),
    }


def to_json(graph: Graph, result: DependencyResult) -> dict[str, Any]:
    return {
        "summary": summary(graph, result),
        "groups": [g.to_json(result.space_name) for g in result.groups],
        "ops": ops_report(graph),
    }


def ops_report(graph: Graph) -> dict[str, Any]:
    unhandled: dict[str, list[str]] = {}
    for n in graph.unknown_nodes():
        unhandled.setdefault(n.op, []).append(n.name)
    return {
        "histogram": graph.op_histogram(),
        "original_ops": dict(Counter(n.op for n in graph.nodes).most_common()),
        "unhandled": unhandled,
    }


def render_tables(graph: Graph, result: DependencyResult, console, *, show_ops: bool,
                  all_groups: bool) -> None:
    from rich.table import Table

    s = summary(graph, result)
    console.print(
        f"[bold]{s['model']}[/bold] ({s['source']}): {s['nodes']} nodes, "
        f"{s['parameters']:,} parameters in {s['param_tensors']} tensors; "
        f"{s['groups']} channel groups, {sum(s['prunable_by_kind'].values())} prunable "
        f"({', '.join(f'{k}: {v}' for k, v in sorted(s['prunable_by_kind'].items()))})"
    )
    table = Table(title="channel groups", show_lines=False)
    for col in ("id", "kind", "layer", "units", "params/unit", "members", "prunable / why not"):
        table.add_column(col, overflow="fold")
    shown = result.groups if all_groups else [g for g in result.groups if g.prunable]
    for g in shown:
        unit = g.unit if g.unit != "kv-group" else f"kv-group ({g.queries_per_unit} q heads)"
        members = ", ".join(sorted({f"{_short(m.param)}[{m.dim}]" for m in g.members}))
        if len(members) > 160:
            members = f"{len(g.members)} members: " + members[:140] + "..."
        why = "no: " + "; ".join(g.reasons) if not g.prunable else (
            "yes, approximately (LayerNorm statistics span these channels)" if g.approximate
            else "yes")
        table.add_row(str(g.id), g.kind, "-" if g.layer is None else str(g.layer),
                      f"{g.units} x {unit}", f"{g.params_per_unit:,}", members, why)
    console.print(table)
    hidden = len(result.groups) - len(shown)
    if hidden:
        console.print(f"({hidden} unprunable groups not shown; --all lists them with reasons)")
    if show_ops:
        ops = ops_report(graph)
        t = Table(title="op kinds")
        t.add_column("kind")
        t.add_column("count", justify="right")
        for k, v in ops["histogram"].items():
            t.add_row(k, str(v))
        console.print(t)
        if ops["unhandled"]:
            u = Table(title="ops without a channel rule (barriers)")
            u.add_column("op")
            u.add_column("nodes", overflow="fold")
            for op, names in ops["unhandled"].items():
                u.add_row(op, ", ".join(names[:12]) + (" ..." if len(names) > 12 else ""))
            console.print(u)
        else:
            console.print("every op has a channel rule")


def _short(name: str) -> str:
    return name.replace("model.layers.", "L").replace("model.", "")


def to_networkx(graph: Graph) -> nx.DiGraph:
    g = nx.DiGraph()
    for n in graph.nodes:
        g.add_node(n.name, kind=n.kind.value, op=n.op)
        for v in n.inputs:
            if v is not None and v.producer is not None:
                g.add_edge(v.producer.name, n.name)
    return g


def write_dot(graph: Graph, result: DependencyResult, path: Path) -> list[Path]:
    """Write the graph as DOT (linear nodes coloured by the group of their outputs)."""
    color: dict[str, str] = {}
    group_of: dict[tuple[str, int], Any] = {}
    for grp in result.groups:
        for m in grp.members:
            group_of.setdefault((m.param, m.dim), grp)
    for n in graph.nodes:
        if n.kind is OpKind.LINEAR:
            w = n.inputs[1]
            grp = group_of.get((w.name, n.attrs["w_out"])) or group_of.get((w.name, n.attrs["w_in"]))
            if grp is not None:
                color[n.name] = KIND_COLORS[grp.kind]
    nxg = to_networkx(graph)
    lines = [f'digraph "{graph.name}" {{', "  rankdir=TB; node [shape=box, style=filled, "
             'fillcolor="#ffffff", fontname="Helvetica", fontsize=10];']
    for name, data in nxg.nodes(data=True):
        label = f"{name}\\n{data['kind']}"
        fill = color.get(name, "#f8f8f8" if data["kind"] != "unknown" else "#e76f51")
        lines.append(f'  "{name}" [label="{label}", fillcolor="{fill}"];')
    for a, b in nxg.edges():
        lines.append(f'  "{a}" -> "{b}";')
    lines.append("}")
    path = Path(path)
    atomic_write_text(path, "\n".join(lines) + "\n")
    written = [path]
    dot = shutil.which("dot")
    if dot is not None:
        svg = path.with_suffix(".svg")
        tmp = svg.with_name(svg.name + ".tmp")
        proc = subprocess.run([dot, "-Tsvg", str(path), "-o", str(tmp)], capture_output=True)
        if proc.returncode == 0:
            tmp.replace(svg)
            written.append(svg)
        else:
            tmp.unlink(missing_ok=True)
    return written


def diff(a: DependencyResult, b: DependencyResult) -> dict[str, Any]:
    """What changed between two analysed models: parameters, shapes, groups."""
    pa = {n: tuple(v.shape) for n, v in a.graph.params.items()}
    pb = {n: tuple(v.shape) for n, v in b.graph.params.items()}
    shapes = [{"param": n, "a": list(pa[n]) if n in pa else None,
               "b": list(pb[n]) if n in pb else None}
              for n in sorted(set(pa) | set(pb)) if pa.get(n) != pb.get(n)]

    def key(g):
        return (g.kind, g.layer, min(m.param for m in g.members))

    ga = {key(g): g for g in a.groups}
    gb = {key(g): g for g in b.groups}
    groups = []
    for k in sorted(set(ga) | set(gb), key=lambda k: (k[1] is None, k[1] or 0, k[0], k[2])):
        x, y = ga.get(k), gb.get(k)
        if x is not None and y is not None and x.units == y.units and x.prunable == y.prunable:
            continue
        groups.append({"kind": k[0], "layer": k[1], "first_member": k[2],
                       "units_a": x.units if x else None, "units_b": y.units if y else None,
                       "prunable_a": x.prunable if x else None,
                       "prunable_b": y.prunable if y else None})
    return {"parameters": {"a": a.graph.num_parameters(), "b": b.graph.num_parameters()},
            "changed_shapes": shapes, "changed_groups": groups,
            "nodes": {"a": len(a.graph.nodes), "b": len(b.graph.nodes)}}


def render_diff(d: dict[str, Any], console, name_a: str, name_b: str) -> None:
    from rich.table import Table

    pa, pb = d["parameters"]["a"], d["parameters"]["b"]
    console.print(f"A = {name_a}: {pa:,} parameters, {d['nodes']['a']} nodes\n"
                  f"B = {name_b}: {pb:,} parameters ({100 * pb / max(pa, 1):.1f}% of A), "
                  f"{d['nodes']['b']} nodes")
    t = Table(title=f"groups that changed ({len(d['changed_groups'])})")
    for col in ("kind", "layer", "units A", "units B", "prunable A/B", "first member"):
        t.add_column(col)
    for g in d["changed_groups"]:
        t.add_row(g["kind"], "-" if g["layer"] is None else str(g["layer"]),
                  str(g["units_a"] if g["units_a"] is not None else "-"),
                  str(g["units_b"] if g["units_b"] is not None else "-"),
                  f"{g['prunable_a']}/{g['prunable_b']}", g["first_member"])
    console.print(t)
    s = Table(title=f"parameters whose shape changed ({len(d['changed_shapes'])})")
    for col in ("parameter", "A", "B"):
        s.add_column(col)
    for row in d["changed_shapes"][:200]:
        s.add_row(row["param"], str(row["a"]), str(row["b"]))
    console.print(s)
