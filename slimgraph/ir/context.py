"""The state channel rules work on: the channel spaces and each value's per-dim layouts.

:class:`AnalysisContext` sits below both the rules (``rules.py``, which read and set
layouts through it) and the driver (``dependency.py``, which creates one per analysis and
runs the rules over the graph), so neither has to import the other for it.
"""

from __future__ import annotations

from slimgraph.ir.graph import Graph, Value
from slimgraph.ir.spaces import ChannelSpaces, Layout, LayoutConflict

__all__ = ["AnalysisContext"]


class AnalysisContext:
    """What rules see: the spaces and each value's per-dim layouts."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.spaces = ChannelSpaces()
        self._layouts: dict[int, list[Layout]] = {}

    def layouts(self, v: Value) -> list[Layout]:
        lay = self._layouts.get(id(v))
        if lay is None:
            lay = self.set_fresh(v)
        return lay

    def set(self, v: Value, layouts: list[Layout]) -> None:
        if v.is_tensor and len(layouts) != v.rank:
            raise LayoutConflict(f"rule produced {len(layouts)} dims for rank-{v.rank} {v.name}")
        self._layouts[id(v)] = layouts

    def set_fresh(self, v: Value) -> list[Layout]:
        lay = [self.spaces.fresh_layout(d) for d in (v.shape or ())]
        self._layouts[id(v)] = lay
        return lay

    def has(self, v: Value) -> bool:
        return id(v) in self._layouts

    def unify(self, a: Layout, b: Layout) -> None:
        self.spaces.unify(a, b)
