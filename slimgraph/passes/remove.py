"""`remove`: physically remove the units an earlier pass selected (e.g. `l0`)."""

from __future__ import annotations

from dataclasses import dataclass

from slimgraph.passes.base import CompileState, Pass, PassResult
from slimgraph.passes.registry import register


@dataclass
class Remove(Pass):
    name = "remove"
    summary = "slice out the units selected by an earlier pass"

    def requires(self, state: CompileState) -> None:
        state.kind.check_selection(state, state.selection)

    def run(self, state: CompileState) -> PassResult:
        if not state.selection:
            return PassResult(False, {"note": "no units were selected; nothing removed"})
        report = state.kind.remove_units(state, state.analysis(), state.selection)
        state.selection = {}
        state.record_removal(report)
        state.retrace()
        return PassResult(True, report)


register(Remove)
