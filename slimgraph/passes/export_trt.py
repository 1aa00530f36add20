"""`export-trt`: an ONNX file for TensorRT's sparse kernels, with verified 2:4 weights.

The model is exported like `export-onnx` (optionally in fp16), then the file is checked
independently of how it was made (:func:`slimgraph.sparsity.check.check_onnx`): every
decoder-block weight must be N:M along its reduction axis as TensorRT reads it (MatMul B
[K, N] along K, Gemm by transB, Conv along C per kernel position; constants reachable
only through Transpose/Cast). The report lists which layers qualify for sparse kernels
(K and N multiples of 64 and >= 256) and why the others do not. A model whose masks are
not N:M in stored order (e.g. `permute=mask-only`) is refused with the layers named.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from slimgraph.errors import SlimgraphError
from slimgraph.passes.base import CompileState, Pass, PassResult
from slimgraph.passes.registry import register


@dataclass
class ExportTRT(Pass):
    name = "export-trt"
    summary = "write OUTDIR/model.trt.onnx with verified N:M weights and a sparse-kernel report"
    writes_files = True
    filename: str = "model.trt.onnx"
    fp16: bool = False
    pattern: str = "2:4"

    def check_options(self) -> None:
        from slimgraph.sparsity.masks import parse_pattern

        if not self.filename.endswith(".onnx") or "/" in self.filename:
            raise self.option_error("filename", f"{self.filename!r} must be a plain *.onnx name")
        try:
            parse_pattern(self.pattern)
        except ValueError as e:
            raise self.option_error("pattern", str(e)) from None

    def requires(self, state: CompileState) -> None:
        self.require_torch(state, out_dir=True)

    def run(self, state: CompileState) -> PassResult:
        import torch

        from slimgraph.backends.onnx_export import (ExportStages, compare_with_torch,
                                                    export_onnx, save_tokenizer)
        from slimgraph.sparsity.check import check_onnx
        from slimgraph.sparsity.masks import parse_pattern

        vocab = int(getattr(state.loaded.config, "vocab_size", 2) or 2)
        model = state.model
        if self.fp16:
            model = copy.deepcopy(model).to(torch.float16)
        report: dict = {}
        stages = ExportStages(state.progress)
        path = export_onnx(model, state.out_dir / self.filename, vocab=vocab, report=report,
                           stages=stages)
        report.update(file=str(path), fp16=self.fp16)
        if not self.fp16:  # ONNX Runtime's CPU kernels are fp32; TensorRT consumes the fp16 file
            stages.enter(5)
            report["ort_vs_torch"] = compare_with_torch(model, path, vocab=vocab)
        check = check_onnx(path, parse_pattern(self.pattern))
        stages.finish()
        report["check"] = {"ok": check.ok, **check.summary()}
        report["layers"] = [{"name": lyr.name, "status": lyr.status, "shape": lyr.shape,
                             "trt_sparse": lyr.trt_sparse, "why_not": lyr.trt_reason}
                            for lyr in check.layers]
        state.files.append(str(path))
        if state.loaded.tokenizer is not None:
            save_tokenizer(state.loaded.tokenizer, state.out_dir, state)
        if not check.ok:
            bad = ", ".join(lyr.name for lyr in check.failures()[:5])
            raise SlimgraphError(f"{path.name}: weights are not {self.pattern} along TensorRT's "
                                 f"reduction axis in stored order ({bad}); use permute=fold or "
                                 "gather, not mask-only")
        return PassResult(False, report)


register(ExportTRT)
