"""Channel dependency analysis: propagate channel rules over the graph, build groups.

Like a liveness analysis with one rule per op kind (``rules.RULES``), but instead of
"used" booleans every tensor dim carries a layout of channel spaces (kept in an
:class:`~slimgraph.ir.context.AnalysisContext`, re-exported here). After one pass in
topological order, every parameter dim is expressed in terms of root spaces; each
root space that reaches a parameter is a **channel group**: removing unit ``u`` of the
space removes, in every member ``(parameter, dim)``, the indices ``Tree.positions``.

Heads and head counts come from the graph (the attention rules tag the spaces that
index heads; GQA shows up as replica spaces from ``expand`` or an attention op's
grouped heads), never from user input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from slimgraph.ir.blocks import layer_number
from slimgraph.ir.context import AnalysisContext
from slimgraph.ir.graph import Graph, Node
from slimgraph.ir.rules import RULES
from slimgraph.ir.spaces import ChannelSpaces, LayoutConflict, Tree

KIND_ORDER = {"heads": 0, "qheads": 1, "mlp": 2, "channels": 3, "hidden": 4}
HEAD_DIM_REASON = (
    "attention head_dim (channels within a head) is not pruned by default; prune whole heads"
)


@dataclass
class Member:
    """One parameter dim touched by a group: removing unit u drops ``indices(u)``."""

    param: str
    dim: int
    size: int
    tree: Tree
    space: int

    def indices(self, unit: int) -> list[int]:
        return self.tree.positions(self.space, unit) or []

    def layout(self, name_of) -> str:
        return self.tree.describe(name_of)


@dataclass
class ChannelGroup:
    id: int
    kind: str  # heads | qheads | mlp | hidden | channels
    layer: int | None
    units: int
    unit: str  # "channel", "head", "kv-group"
    members: list[Member]
    params_per_unit: int
    prunable: bool
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # removal only approximates the masked model: a LayerNorm's statistics span these
    # channels (its mean moves when some go; RMS norms are corrected exactly); set by
    # the norm rule with its note (ChannelSpaces.note)
    approximate: bool = False
    queries_per_unit: int = 1  # query heads carried by one kv-group unit
    space: int = -1

    def to_json(self, name_of=None) -> dict[str, Any]:
        name_of = name_of or (lambda s: f"s{s}")
        return {
            "id": self.id,
            "kind": self.kind,
            "layer": self.layer,
            "units": self.units,
            "unit": self.unit,
            "queries_per_unit": self.queries_per_unit,
            "params_per_unit": self.params_per_unit,
            "prunable": self.prunable,
            "reason": "; ".join(self.reasons) if self.reasons else None,
            "notes": self.notes,
            "approximate": self.approximate,
            "members": [
                {"param": m.param, "dim": m.dim, "size": m.size, "layout": m.layout(name_of),
                 "per_unit": len(m.indices(0))}
                for m in self.members
            ],
        }


@dataclass
class DependencyResult:
    graph: Graph
    groups: list[ChannelGroup]
    context: AnalysisContext
    barriers: list[tuple[str, str, str]]  # (node, op, why)

    def space_name(self, s: int) -> str:
        return f"s{self.context.spaces.find(s)}"

    def prunable(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    def by_kind(self, kind: str) -> list[ChannelGroup]:
        return [g for g in self.groups if g.kind == kind]


def _barrier(ctx: AnalysisContext, node: Node, why: str) -> None:
    reason = f"{why} at node {node.name} ({node.op})"
    for v in node.inputs:
        if v is not None and v.is_tensor:
            for lay in ctx.layouts(v):
                ctx.spaces.mark(lay, reason)
    for out in node.outputs:
        if out.is_tensor:
            for lay in ctx.set_fresh(out):
                ctx.spaces.mark(lay, reason)


def propagate(graph: Graph) -> tuple[AnalysisContext, list[tuple[str, str, str]]]:
    ctx = AnalysisContext(graph)
    barriers: list[tuple[str, str, str]] = []
    for v in graph.inputs:
        for lay in ctx.layouts(v):
            ctx.spaces.mark(lay, f"model input {v.name}")
    for node in graph.nodes:
        rule = RULES.get(node.kind)
        if rule is None:
            why = "no channel rule for this op"
            _barrier(ctx, node, why)
            barriers.append((node.name, node.op, why))
            continue
        try:
            rule(node, ctx)
        except LayoutConflict as e:
            _barrier(ctx, node, f"channels cannot be tracked ({e})")
            barriers.append((node.name, node.op, str(e)))
        for out in node.outputs:  # outputs a rule did not describe get fresh spaces
            if out.is_tensor and not ctx.has(out):
                ctx.set_fresh(out)
    for v in graph.outputs:
        for lay in ctx.layouts(v):
            ctx.spaces.mark(lay, f"model output {v.name}")
    return ctx, barriers


def layer_of(param_names: list[str]) -> int | None:
    """The one block number of all ``param_names`` (:func:`slimgraph.ir.blocks.layer_number`),
    else None."""
    layers = {layer_number(name) for name in param_names}
    return layers.pop() if len(layers) == 1 else None


def analyze(graph: Graph) -> DependencyResult:
    """Run the rules over ``graph`` and return its channel groups."""
    ctx, barriers = propagate(graph)
    sp = ctx.spaces
    members: dict[int, list[Member]] = {}
    for name, v in graph.params.items():
        if not ctx.has(v):
            continue  # unused parameter
        for dim, lay in enumerate(ctx.layouts(v)):
            tree = sp.tree(lay)
            for s in dict.fromkeys(tree.leaves()):
                if sp.size[s] > 1:
                    members.setdefault(s, []).append(Member(name, dim, v.shape[dim], tree, s))
    owners = sp.owners()
    groups: list[ChannelGroup] = []
    for s, mems in members.items():
        if all(graph.params[m.param].param.kind == "buffer" for m in mems):
            continue  # only buffers (position ids, rotary tables): nothing to prune
        reasons, tags, notes, approximate = sp.inherited(s, owners)
        reasons, notes = list(reasons), list(notes)
        # a replica space with weights: the query heads of every KV-group (GQA's repeated
        # kv heads themselves have no weights); unit j = the j-th query head of each group
        kind = "qheads" if s in sp.replica else _kind(tags)
        if "head_dim" in tags and "heads" not in tags:
            reasons.append(HEAD_DIM_REASON)
        for m in mems:
            if m.tree.leaves().count(s) > 1:
                notes.append(
                    f"one unit spans {len(m.indices(0))} positions of {m.param} dim {m.dim} "
                    f"(layout {m.tree.describe(lambda x: f's{x}')})"
                )
                break
        per_unit = 0
        for m in mems:
            if graph.params[m.param].param.kind == "buffer":
                continue
            numel = 1
            for d in graph.params[m.param].shape:
                numel *= int(d)
            per_unit += numel // m.size * len(m.indices(0))
        unit, q_per = _unit(kind, mems, sp)
        groups.append(
            ChannelGroup(
                id=-1, kind=kind, layer=layer_of([m.param for m in mems]), units=sp.size[s],
                unit=unit, members=mems, params_per_unit=per_unit, prunable=not reasons,
                reasons=reasons, notes=notes, approximate=approximate,
                queries_per_unit=q_per, space=s,
            )
        )
    groups.sort(key=lambda g: (g.layer if g.layer is not None else 1 << 30,
                               KIND_ORDER[g.kind], g.members[0].param, g.members[0].dim))
    for i, g in enumerate(groups):
        g.id = i
    return DependencyResult(graph, groups, ctx, barriers)


def _kind(tags: set[str]) -> str:
    if "heads" in tags:
        return "heads"
    if "head_dim" in tags:
        return "channels"
    if tags & {"normed", "embedding", "stat"}:
        return "hidden"
    if "act" in tags:
        return "mlp"
    return "channels"


def _unit(kind: str, mems: list[Member], sp: ChannelSpaces) -> tuple[str, int]:
    if kind == "qheads":
        return "q-head", 1  # the same query head slot of every KV-group
    if kind != "heads":
        return "channel", 1
    best = 1
    for m in mems:
        best = max(best, _replicas_after(m.tree, m.space, sp))
    return ("kv-group", best) if best > 1 else ("head", 1)


def _replicas_after(tree: Tree, space: int, sp: ChannelSpaces) -> int:
    """Product of replica factors right after ``space`` in a product (q heads per kv)."""
    if tree.kind == "leaf":
        return 1
    best = 1
    kids = tree.children
    for i, c in enumerate(kids):
        if tree.kind == "merge" and c.kind == "leaf" and c.space == space:
            n = 1
            for nxt in kids[i + 1 :]:
                if nxt.kind == "leaf" and nxt.space in sp.replica:
                    n *= nxt.size
                else:
                    break
            best = max(best, n)
        best = max(best, _replicas_after(c, space, sp))
    return best
