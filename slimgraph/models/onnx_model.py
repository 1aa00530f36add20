"""The ONNX model kind: an ONNX file loaded as an ``onnx_ir`` model.

Removal slices initializers and rewrites shape constants
(:mod:`slimgraph.structured.onnx_removal`); block walks (sparsity, calibrated structured
removal) run one segment model per decoder layer in ONNX Runtime
(:mod:`slimgraph.structured.onnx_observer`) and write the stored weights through the
parameter handles; the graph is re-imported from the model
in memory after a pass changed it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from slimgraph.errors import PipelineError

if TYPE_CHECKING:
    from slimgraph.ir.dependency import DependencyResult
    from slimgraph.ir.graph import Graph
    from slimgraph.passes.base import CompileState


class OnnxModel:
    label = "ONNX"
    trains = False
    no_groups_hint = ("; on ONNX input, groups are tracked exactly on files exported with "
                      "static shapes (dynamic batch/sequence axes can hide head counts and "
                      "channels behind run-time shape arithmetic; see slimgraph inspect "
                      "MODEL.onnx --all)")
    exports_with_opset = False

    def check_input(self, state: CompileState, *, weights: bool = True,
                    out_dir: bool = False) -> None:
        """The ONNX model is loaded (and an OUTDIR given when ``out_dir``)."""
        if state.graph is None or state.graph.onnx_model is None:
            raise PipelineError("the ONNX model is not loaded")
        if out_dir and state.out_dir is None:
            raise PipelineError("needs an output directory (-o OUTDIR)")

    def retrace(self, state: CompileState) -> Graph:
        """The model in memory (as the passes left it), not the input file."""
        from slimgraph.frontends.build import graph_of
        from slimgraph.frontends.onnx_import import import_onnx_model

        if state.graph is None or state.graph.onnx_model is None:
            return graph_of(state.loaded, seq=state.seq)
        modified = state.graph.onnx_modified
        graph = import_onnx_model(state.graph.onnx_model, state.graph.meta["onnx_path"])
        if modified:
            graph.onnx_modified = True
        return graph

    def tokenizer(self, state: CompileState) -> Any:
        from slimgraph.sparsity.onnx_path import onnx_tokenizer

        return onnx_tokenizer(state)

    def missing_tokenizer(self, state: CompileState) -> str:
        return f"there is no tokenizer next to {state.loaded.onnx_path}"

    def sampling_model(self, state: CompileState) -> Any:
        """None: sampling calibration text needs the PyTorch model."""
        return None

    def check_head_removal(self, state: CompileState) -> None:
        """Refuse com.microsoft attention nodes the importer could not describe."""
        from slimgraph.structured.onnx_removal import check_contrib_attention

        check_contrib_attention(state.graph)

    def remove_units(self, state: CompileState, analysis: DependencyResult,
                     selection: dict[int, list[int]]) -> dict[str, Any]:
        from slimgraph.structured.onnx_removal import remove_units_onnx

        return remove_units_onnx(analysis, selection)

    def check_selection(self, state: CompileState, selection: dict[int, list[int]]) -> None:
        from slimgraph.structured.onnx_removal import check_selection

        if selection:
            check_selection(state.analysis(), selection)

    def block_observer(self, state: CompileState, analysis: DependencyResult, windows: Any,
                       batch: int) -> Any:
        """One segment model per decoder layer, run in ONNX Runtime
        (:class:`~slimgraph.structured.onnx_observer.OnnxBlocks`); the weights it changes
        are the model's in memory, so the model no longer is the input file."""
        from slimgraph.sparsity.onnx_blocks import SegmentError
        from slimgraph.structured.observer import ObserverError
        from slimgraph.structured.onnx_observer import OnnxBlocks

        try:
            observer = OnnxBlocks(state.graph.onnx_model, analysis, windows, batch=batch,
                                  tmp_parent=state.out_dir)
        except SegmentError as e:
            raise ObserverError(f"calibration runs one decoder layer at a time and the ONNX "
                                f"graph cannot be cut into layers ({e})") from None
        state.graph.onnx_modified = True
        return observer

    def activation_scores(self, state: CompileState, groups: list[Any], windows: Any,
                          batch: int) -> dict[int, Any]:
        """The groups of one layer (heads, qheads, mlp): one dense pass over the decoder
        layers (ONNX Runtime, a segment model per layer), each layer's readers observed.
        Hidden channels: one run of the dense model with the input of every linear that
        reads them (every layer's q/k/v and gate/up, the LM head) as extra outputs."""
        from slimgraph.sparsity.onnx_path import input_stats
        from slimgraph.sparsity.onnx_targets import find_targets
        from slimgraph.structured.importance import activation_importance
        from slimgraph.structured.observer import linear_inputs
        from slimgraph.structured.recovery import dense_unit_scores

        result = state.analysis()
        out: dict[int, Any] = {}
        in_blocks = [g for g in groups if g.layer is not None]
        if in_blocks:
            modified = state.graph.onnx_modified
            observer = self.block_observer(state, result, windows, batch)
            try:
                out.update(dense_unit_scores(observer, in_blocks, "act", progress=state.progress))
            finally:
                observer.close()
                state.graph.onnx_modified = modified  # observed, not changed
        hidden = [g for g in groups if g.layer is None]
        if hidden:
            targets, _ = find_targets(result, blocks_only=False)
            stats = input_stats(state.graph.onnx_model, targets, windows, batch=batch,
                                tmp_parent=state.out_dir)
            # act_norm()² = Σ x_j² / samples: one scale for every reader, as a plain sum
            sq_norms = {name: acc.act_norm().double() ** 2 for name, acc in stats.items()}
            w_in = linear_inputs(result)
            for g in hidden:
                out[g.id] = activation_importance(result.graph, g, sq_norms, w_in)
        return out

    def claimed_weights(self, state: CompileState) -> tuple[list[str], Any]:
        from slimgraph.sparsity.onnx_targets import claimed_weights

        return claimed_weights(state.analysis())

    def input_sparsity_reports(self, state: CompileState, pattern: tuple[int, int] | None,
                               targets: str) -> tuple[list[Any], list[str], set[Path]]:
        """The input file, unless a pass modified the model in memory (then only the
        ONNX files written since are checked)."""
        from slimgraph.sparsity.check import check_onnx

        if state.graph is not None and state.graph.onnx_modified:
            return [], [f"{state.loaded.onnx_path} (the input) was modified in memory by an "
                        "earlier pass; only the ONNX files written since are checked"], set()
        path = Path(state.loaded.onnx_path).resolve()
        return [check_onnx(path, pattern, targets=targets)], [], {path}

    def pruned_layer_count(self, state: CompileState) -> int:
        """The layers of the linears ``sparsify`` prunes, from their block numbers;
        :class:`~slimgraph.structured.observer.ObserverError` when one has none."""
        from slimgraph.sparsity.onnx_blocks import SegmentError, target_layers
        from slimgraph.sparsity.onnx_targets import find_targets
        from slimgraph.structured.observer import ObserverError

        targets, _ = find_targets(state.analysis())
        try:
            return len(set(target_layers(state.analysis(), targets).values()))
        except SegmentError as e:
            raise ObserverError(str(e)) from None

    def write_onnx(self, state: CompileState, path: Path, *, opset: int, check: bool,
                   tolerance: float) -> dict[str, Any]:
        """Save the model in memory to ``path`` (checker; an ONNX Runtime run on a random
        input when ``check``), with the tokenizer next to it; the report. ``opset`` and
        ``tolerance`` do not apply (the model keeps its opset; nothing to compare with)."""
        from slimgraph.backends.onnx_export import (onnx_bytes, ort_smoke_test, save_onnx_model,
                                                    save_tokenizer)
        from slimgraph.ir.graph import OpKind

        path = save_onnx_model(state.graph.onnx_model, path)
        report: dict[str, Any] = {"file": str(path), "bytes": onnx_bytes(path),
                                  "source": "the ONNX input, as modified by the passes before "
                                  "(saved, not re-exported)",
                                  "modified": state.graph.onnx_modified}
        if check:
            tables = [n.inputs[0].shape[0] for n in state.graph.nodes
                      if n.kind is OpKind.EMBEDDING and n.inputs[0].shape]
            vocab = tables[0] if tables and isinstance(tables[0], int) else 2
            report["ort_check"] = ort_smoke_test(path, vocab=vocab)
        state.files.append(str(path))
        tokenizer = self.tokenizer(state)
        if tokenizer is not None:
            save_tokenizer(tokenizer, state.out_dir, state)
        return report

    def sparsify_observer(self, state: CompileState, analysis: DependencyResult, windows: Any,
                          batch: int, *, hessian: bool
                          ) -> tuple[Any, dict[str, Any], list[str] | None]:
        """``sparsify``'s blocks: one segment model per layer in ONNX Runtime when there
        are ``windows``; a graph that cannot be cut into layers is calibrated in one run
        of the dense model (refused when the reconstruction needs the Gram matrices of
        the pruned model's activations). The report's extras: the calibration method and
        notes."""
        from slimgraph.sparsity import onnx_path
        from slimgraph.sparsity.onnx_blocks import SegmentError
        from slimgraph.sparsity.onnx_targets import find_targets
        from slimgraph.structured.onnx_observer import OnnxBlocks, OnnxLayers

        targets, untargeted = find_targets(analysis)
        if not targets:
            raise PipelineError("no decoder-block linear with a stored weight was found in "
                                "the ONNX model"
                                + (f" ({untargeted[0]['name']}: {untargeted[0]['skipped']})"
                                   if untargeted else ""))
        state.graph.onnx_modified = True
        if windows is None:
            return OnnxLayers(analysis), {"method": None}, []
        model = state.graph.onnx_model
        try:
            observer = OnnxBlocks(model, analysis, windows, batch=batch, tmp_parent=state.out_dir)
            return observer, {"method": onnx_path.CALIBRATION}, []
        except SegmentError as e:
            if hessian:
                raise PipelineError("weight reconstruction needs "
                                    "block-sequential calibration and the ONNX graph cannot be "
                                    f"cut into layers ({e})") from None
            stats = onnx_path.input_stats(model, targets, windows, batch=batch,
                                          tmp_parent=state.out_dir)
            return OnnxLayers(analysis, stats), {"method": onnx_path.ONE_SHOT}, [
                "calibration is one-shot on the dense model (ONNX Runtime), not "
                f"block-sequential: the graph could not be cut into layers ({e}); layers after "
                "the first see dense, not pruned, activations"]

    def dense_observer(self, state: CompileState, analysis: DependencyResult, windows: Any,
                       batch: int) -> Any:
        """The dense model's statistics from one ONNX Runtime run (its block-sequential
        activations are its ordinary forward's)."""
        from slimgraph.sparsity.onnx_path import input_stats
        from slimgraph.sparsity.onnx_targets import find_targets
        from slimgraph.structured.onnx_observer import OnnxLayers

        targets, _ = find_targets(analysis)
        return OnnxLayers(analysis, input_stats(state.graph.onnx_model, targets, windows,
                                                batch=batch, tmp_parent=state.out_dir))

    def permute_space(self, state: CompileState, opts: Any, analysis: DependencyResult,
                      windows: Any, batch: int) -> dict[str, Any]:
        """``permute=space`` through the initializers, scored with the dense statistics
        of the first 16 windows."""
        from slimgraph.sparsity import onnx_path
        from slimgraph.sparsity.onnx_targets import find_targets

        targets, _ = find_targets(analysis)
        state.graph.onnx_modified = True
        return onnx_path.permute_space(opts, analysis, state.graph.onnx_model, targets, windows,
                                       batch=batch, tmp_parent=state.out_dir)

    def sparsified(self, state: CompileState, gathered: list[str]) -> None:
        """Nothing to do: gathers are nodes of the model in memory already."""
