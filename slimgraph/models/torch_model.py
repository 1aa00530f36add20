"""The PyTorch model kind: a Hugging Face / PyTorch model in memory.

Removal slices the modules' tensors and fixes their sizes and head counts
(:mod:`slimgraph.structured.removal`); sparsity walks the decoder blocks with forward
hooks (:mod:`slimgraph.sparsity.calibration`) and writes each linear's ``weight``; the
graph is re-traced with torch.export after a pass changed the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from slimgraph.errors import PipelineError

if TYPE_CHECKING:
    from slimgraph.ir.dependency import DependencyResult
    from slimgraph.ir.graph import Graph
    from slimgraph.passes.base import CompileState


class TorchModel:
    label = "PyTorch"
    trains = True
    no_groups_hint = ""
    exports_with_opset = True

    def check_input(self, state: CompileState, *, weights: bool = True,
                    out_dir: bool = False) -> None:
        """A PyTorch model, with weights (unless ``weights=False``), and an OUTDIR when
        ``out_dir``."""
        if state.model is None:
            raise PipelineError("needs a PyTorch model (ONNX input is not "
                                "supported by this pass yet)")
        if weights and state.loaded.meta and state.offload is None:
            raise PipelineError("needs weights; the model was loaded with "
                                "--meta")
        if out_dir and state.out_dir is None:
            raise PipelineError("needs an output directory (-o OUTDIR)")

    def retrace(self, state: CompileState) -> Graph:
        from slimgraph.frontends.build import graph_of

        return graph_of(state.loaded, seq=state.seq)

    def tokenizer(self, state: CompileState) -> Any:
        return state.loaded.tokenizer

    def missing_tokenizer(self, state: CompileState) -> str:
        return "the model has no tokenizer"

    def sampling_model(self, state: CompileState) -> Any:
        """The model that writes calibration text for ``calib=self``."""
        return state.model

    def check_head_removal(self, state: CompileState) -> None:
        """Heads can be removed from any traced attention."""

    def remove_units(self, state: CompileState, analysis: DependencyResult,
                     selection: dict[int, list[int]]) -> dict[str, Any]:
        from slimgraph.structured.removal import remove_units

        return remove_units(state.model, analysis, selection)

    def check_selection(self, state: CompileState, selection: dict[int, list[int]]) -> None:
        self.check_input(state)

    def block_observer(self, state: CompileState, analysis: DependencyResult, windows: Any,
                       batch: int) -> Any:
        """Hooks on the decoder blocks' modules (:class:`~slimgraph.structured.torch_blocks.
        TorchBlocks`)."""
        from slimgraph.structured.torch_blocks import TorchBlocks

        return TorchBlocks(state.model, analysis, windows, batch=batch)

    def activation_scores(self, state: CompileState, groups: list[Any], windows: Any,
                          batch: int) -> dict[int, Any]:
        """One run of the whole model per batch, every linear's inputs seen by hooks."""
        from slimgraph.structured.importance import activation_scorer

        score_of = activation_scorer(state.model, state.graph, windows.split(batch))
        return {g.id: score_of(g) for g in groups}

    def claimed_weights(self, state: CompileState) -> tuple[list[str], Any]:
        from slimgraph.sparsity.block_prune import torch_claims

        return torch_claims(state.graph, state.model,
                            state.offload.stored if state.offload is not None else None)

    def input_sparsity_reports(self, state: CompileState, pattern: tuple[int, int] | None,
                               targets: str) -> tuple[list[Any], list[str], set[Path]]:
        from slimgraph.sparsity.check import check_torch

        return ([check_torch(state.model, pattern, targets=targets,
                             name=f"{state.loaded.spec} (in memory)")], [], set())

    def pruned_layer_count(self, state: CompileState) -> int:
        """The decoder blocks of the traced graph."""
        from slimgraph.ir.blocks import find_blocks

        return len(find_blocks(state.graph))

    def write_onnx(self, state: CompileState, path: Path, *, opset: int, check: bool,
                   tolerance: float) -> dict[str, Any]:
        """Export to ``path`` (checker, then ONNX Runtime against PyTorch when ``check``),
        with the tokenizer next to it; the report."""
        import onnx

        from slimgraph.backends.onnx_export import (ExportStages, compare_with_torch,
                                                    export_onnx, onnx_bytes, save_tokenizer)
        from slimgraph.errors import SlimgraphError

        vocab = int(getattr(state.loaded.config, "vocab_size", 2) or 2)
        report: dict[str, Any] = {}
        stages = ExportStages(state.progress)
        path = export_onnx(state.model, path, vocab=vocab, opset=opset or None, report=report,
                           stages=stages)
        onnx.checker.check_model(str(path))
        report.update(file=str(path), bytes=onnx_bytes(path))
        if check:
            stages.enter(5)
            cmp = compare_with_torch(state.model, path, vocab=vocab)
            report["ort_vs_torch"] = cmp
            if not cmp["finite"]:
                raise SlimgraphError("the model's output has non-finite values (NaN or "
                                     "infinity): nothing usable to export")
            if not cmp["rel_error"] <= tolerance:  # NaN fails too
                raise SlimgraphError(f"ONNX Runtime output differs from PyTorch (relative error "
                                     f"{cmp['rel_error']:.2e} > {tolerance})")
        state.files.append(str(path))
        if state.loaded.tokenizer is not None:
            save_tokenizer(state.loaded.tokenizer, state.out_dir, state)
        stages.finish()
        return report

    def sparsify_observer(self, state: CompileState, analysis: DependencyResult, windows: Any,
                          batch: int, *, hessian: bool
                          ) -> tuple[Any, dict[str, Any], list[str] | None]:
        """``sparsify``'s blocks: hooks on the decoder blocks' modules (one block in memory
        at a time with --offload); no report extras."""
        from slimgraph.structured.torch_blocks import TorchBlocks

        observer = TorchBlocks(state.model, analysis, windows, batch=batch, lazy=state.offload)
        if not observer.blocks:
            raise PipelineError("no decoder blocks with prunable linears "
                                "were found")
        return observer, {}, None

    def dense_observer(self, state: CompileState, analysis: DependencyResult, windows: Any,
                       batch: int) -> Any:
        """The dense model's blocks on ``windows`` (OWL's outlier ratios): the same walk,
        with no weight changed."""
        from slimgraph.structured.torch_blocks import TorchBlocks

        return TorchBlocks(state.model, analysis, windows, batch=batch, lazy=state.offload)

    def permute_space(self, state: CompileState, opts: Any, analysis: DependencyResult,
                      windows: Any, batch: int) -> dict[str, Any]:
        """``permute=space``: one permutation of the residual stream, scored with the
        activation norms of one dense pass (:func:`~slimgraph.sparsity.block_prune.
        permute_residual_space`)."""
        from slimgraph.sparsity.block_prune import permute_residual_space

        return permute_residual_space(opts, state.model, analysis, windows)

    def sparsified(self, state: CompileState, gathered: list[str]) -> None:
        """The linears that got a gather become gather modules of the graph."""
        if gathered:
            state.gathers.extend(gathered)
            state.retrace()
