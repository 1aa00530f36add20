"""`export-onnx`: write OUTDIR/model.onnx for ONNX Runtime, and check it.

A PyTorch model is exported with dynamic batch and sequence axes (input ``input_ids``,
output ``logits``; :mod:`slimgraph.backends.onnx_export`), the ONNX checker runs on the
file and ONNX Runtime's output is compared with PyTorch's on a random input. On ONNX
input the imported model, as the passes before left it (``sparsify`` writes its masked
weights into it), is saved instead: same atomic write, the checker, and an ONNX Runtime
run on a random input (there is no PyTorch reference to compare with). The file is
written to a temporary name and renamed at the end, so an interrupted export leaves
nothing; models over 2 GB get external data (``model.onnx.data``). The tokenizer is
copied along. What differs between the two kinds is the model kind's ``write_onnx``.
"""

from __future__ import annotations

from dataclasses import dataclass

from slimgraph.backends.onnx_export import DEFAULT_OPSET
from slimgraph.passes.base import CompileState, Pass, PassResult
from slimgraph.passes.registry import register


@dataclass
class ExportOnnx(Pass):
    name = "export-onnx"
    summary = "write OUTDIR/model.onnx (dynamic batch and sequence), checked against PyTorch"
    writes_files = True
    filename: str = "model.onnx"
    opset: int = DEFAULT_OPSET
    check: bool = True
    tolerance: float = 1e-4

    def check_options(self) -> None:
        if not self.filename.endswith(".onnx") or "/" in self.filename:
            raise self.option_error("filename", f"{self.filename!r} must be a plain *.onnx name")
        if self.opset and not 17 <= self.opset <= 25:
            raise self.option_error("opset", f"{self.opset} is not a supported opset (17-25; "
                                    f"default {DEFAULT_OPSET})")

    def requires(self, state: CompileState) -> None:
        if not state.kind.exports_with_opset and self.opset != DEFAULT_OPSET:
            raise self.option_error("opset", f"the {state.kind.label} input is saved with its "
                                    "own opset; opset is for export from PyTorch")
        state.kind.check_input(state, out_dir=True)

    def run(self, state: CompileState) -> PassResult:
        return PassResult(False, state.kind.write_onnx(
            state, state.out_dir / self.filename, opset=self.opset, check=self.check,
            tolerance=self.tolerance))


register(ExportOnnx)
