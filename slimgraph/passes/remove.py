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
        from slimgraph.structured.onnx_removal import check_selection

        if state.is_onnx:
            if state.selection:
                check_selection(state.analysis(), state.selection, self.name)
            return
        self.require_torch(state)

    def run(self, state: CompileState) -> PassResult:
        if not state.selection:
            return PassResult(False, {"note": "no units were selected; nothing removed"})
        if state.is_onnx:
            from slimgraph.structured.onnx_removal import remove_units_onnx

            report = remove_units_onnx(state.analysis(), state.selection, self.name)
        else:
            from slimgraph.structured.removal import remove_units

            report = remove_units(state.model, state.analysis(), state.selection)
        state.selection = {}
        state.record_removal(report)
        state.retrace()
        return PassResult(True, report)


register(Remove)
