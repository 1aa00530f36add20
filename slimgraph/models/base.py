"""The protocol every model kind implements (:class:`ModelKind`).

Passes are written against it: they call these methods where the work differs between a
PyTorch model (modules and their ``weight`` tensors, traced with torch.export) and an ONNX
model (an ``onnx_ir`` graph and its initializers). Each method takes the compile state
and plain arguments; a kind keeps no state of its own, so one instance serves a whole
compile.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from slimgraph.ir.dependency import DependencyResult
    from slimgraph.ir.graph import Graph
    from slimgraph.passes.base import CompileState


class ModelKind(Protocol):
    #: "PyTorch" or "ONNX": for messages
    label: str
    #: True when the kind can train its modules (``l0``, ``distill``)
    trains: bool
    #: appended to "nothing to prune" errors: why groups may be missing on this kind
    no_groups_hint: str
    #: True when ``export-onnx`` exports at a chosen opset (False: the model keeps its own)
    exports_with_opset: bool

    def retrace(self, state: CompileState) -> Graph:
        """The graph of the model as the passes left it."""

    def check_input(self, state: CompileState, *, weights: bool = True,
                    out_dir: bool = False) -> None:
        """Refuse (PipelineError) a state this kind cannot work on: the model not loaded,
        no weights (unless ``weights=False``), no OUTDIR when ``out_dir``."""

    def tokenizer(self, state: CompileState) -> Any:
        """The tokenizer that reads calibration text (None when there is none)."""

    def missing_tokenizer(self, state: CompileState) -> str:
        """Why there is no tokenizer, ending a sentence "... needs calibration data and
        ..." (the fix included)."""

    def sampling_model(self, state: CompileState) -> Any:
        """The model that writes calibration text for ``calib=self`` (None: this kind
        cannot sample text)."""

    def pruned_layer_count(self, state: CompileState) -> int:
        """How many decoder layers the linears that ``sparsify`` prunes lie in (per-layer
        schedules give one value per layer);
        :class:`~slimgraph.structured.observer.ObserverError` when a linear's layer is
        unknown."""

    def check_head_removal(self, state: CompileState) -> None:
        """Refuse (PipelineError) a model whose attention heads this kind cannot remove."""

    def remove_units(self, state: CompileState, analysis: DependencyResult,
                     selection: dict[int, list[int]]) -> dict[str, Any]:
        """Physically remove the selected units; the removal report."""

    def check_selection(self, state: CompileState, selection: dict[int, list[int]]) -> None:
        """Refuse (PipelineError) a selection this kind cannot remove."""

    def claimed_weights(self, state: CompileState) -> tuple[list[str], Any]:
        """The decoder-block linears a sparsity pass must account for, and a function
        from a report entry's name to the stored weight."""

    def input_sparsity_reports(self, state: CompileState, pattern: tuple[int, int] | None,
                               targets: str) -> tuple[list[Any], list[str], set[Path]]:
        """``check-sparsity`` on the model itself: (reports, notes, files checked)."""

    def write_onnx(self, state: CompileState, path: Path, *, opset: int, check: bool,
                   tolerance: float) -> dict[str, Any]:
        """``export-onnx``: write the model to ``path`` and check it; the report."""

    def block_observer(self, state: CompileState, analysis: DependencyResult, windows: Any,
                       batch: int) -> Any:
        """The decoder blocks on calibration ``windows`` for calibrated structured removal
        (a :class:`~slimgraph.structured.observer.BlockObserver`; close it after use);
        :class:`~slimgraph.structured.observer.ObserverError` when they cannot be
        observed."""

    def activation_scores(self, state: CompileState, groups: list[Any], windows: Any,
                          batch: int) -> dict[int, Any]:
        """``importance=act`` without the block walk: per group id, every unit's score
        from the dense model's activations on ``windows``."""

    def sparsify_observer(self, state: CompileState, analysis: DependencyResult, windows: Any,
                          batch: int, *, hessian: bool
                          ) -> tuple[Any, dict[str, Any], list[str] | None]:
        """``sparsify``'s decoder blocks (a :class:`~slimgraph.structured.observer.
        BlockObserver` with ``sites``; close it after use) on calibration ``windows``
        (None: no statistics are needed, no block is run), with the Gram matrices when
        ``hessian``; also extra keys of the report's ``calibration`` and the report's
        notes (None: none on this kind)."""

    def dense_observer(self, state: CompileState, analysis: DependencyResult, windows: Any,
                       batch: int) -> Any:
        """The dense model's decoder blocks on ``windows`` for statistics that change no
        weight (OWL's outlier ratios); close it after use."""

    def permute_space(self, state: CompileState, opts: Any, analysis: DependencyResult,
                      windows: Any, batch: int) -> dict[str, Any]:
        """``sparsify{permute=space}``: one permutation of the residual stream for all its
        readers, applied before the block walk; the report's entry."""

    def sparsified(self, state: CompileState, gathered: list[str]) -> None:
        """After ``sparsify``: bring the model in line with the gathers it inserted in
        front of the linears ``gathered`` (report names)."""
