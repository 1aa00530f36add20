"""Pass base class and the state passes work on.

A pass is a dataclass: its ``name`` is stable, its fields are its options (typed, with
defaults), so a pipeline parses from text (``prune-structured{mlp=0.5}``). The
manager calls ``check_options`` (before any work starts), ``requires``, ``run`` and
``ensures``; a pass returns a :class:`PassResult` whose ``modified`` flag is truthful
and whose ``report`` says what it changed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from slimgraph.errors import PipelineError

if TYPE_CHECKING:  # heavy (torch, transformers): for the annotations only
    import torch
    from transformers import PretrainedConfig

    from slimgraph.frontends.loading import LoadedModel
    from slimgraph.ir.dependency import DependencyResult
    from slimgraph.ir.graph import Graph
    from slimgraph.models.base import ModelKind
    from slimgraph.sparsity.offload import Offload


def split_names(text: str) -> list[str]:
    """An option listing names (``q_proj v_proj``, ``q_proj+v_proj``, ``heads,mlp``)."""
    return [t for t in text.replace(",", " ").replace("+", " ").split() if t]


@dataclass
class PassResult:
    modified: bool
    report: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CalibrationDefaults:
    """The compile's calibration settings (--calib-file, --calib-samples, --calib-seqlen):
    what a pass uses where its own options say nothing. ``file``: a text or Alpaca file,
    or ``self`` (text sampled from the model); None where no text is given."""

    file: str | None = None
    samples: int = 64
    seqlen: int = 512


@dataclass
class CompileState:
    """Everything a pipeline works on: the model, its graph, analysis, outputs."""

    loaded: LoadedModel
    graph: Graph | None = None
    # where passes write their outputs: a compile's staging folder inside OUTDIR,
    # committed into OUTDIR only after every pass succeeded (slimgraph.outdir)
    out_dir: Path | None = None
    # OUTDIR itself: for what must outlive a failed compile (training checkpoints to
    # resume from); None outside a compile (then out_dir serves)
    keep_dir: Path | None = None
    seq: int = 7
    # units chosen for removal, by group id of the current analysis: {gid: [units]}
    selection: dict[int, list[int]] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    # module attributes changed by removal (head counts, eps), replayed when reloading
    module_attrs: dict[str, dict[str, Any]] = field(default_factory=dict)
    gathers: list[str] = field(default_factory=list)  # linears turned into GatherLinear
    notes: list[str] = field(default_factory=list)
    calib: CalibrationDefaults = field(default_factory=CalibrationDefaults)
    # (done, total[, unit, info]) for long passes, set by the driver
    progress: Callable[..., None] | None = None
    original_config: PretrainedConfig | None = None  # the HF config before any pass changed it
    # a frozen copy of the model as loaded, kept when a pass asks for it
    # (Pass.uses_input_model: a distillation teacher)
    input_model: torch.nn.Module | None = None
    # compile --offload: the weights' whereabouts; blocks not being worked on stay on
    # the meta device
    offload: Offload | None = None
    _analysis: DependencyResult | None = None

    def __post_init__(self) -> None:
        import copy

        if self.original_config is None and getattr(self.loaded, "config", None) is not None:
            self.original_config = copy.deepcopy(self.loaded.config)

    @property
    def model(self) -> torch.nn.Module | None:
        """The PyTorch model (None for ONNX input)."""
        return self.loaded.model

    @property
    def kind(self) -> ModelKind:
        """What differs between a PyTorch and an ONNX model (:mod:`slimgraph.models`)."""
        from slimgraph.models import kind_of

        return kind_of(self.loaded)

    def analysis(self) -> DependencyResult:
        """The dependency analysis of the current graph (computed once, cached)."""
        if self._analysis is None:
            from slimgraph.ir.dependency import analyze

            self._analysis = analyze(self.graph)
        return self._analysis

    def record_removal(self, report: dict[str, Any]) -> None:
        for module, attrs in report.get("module_attrs", {}).items():
            self.module_attrs.setdefault(module, {}).update(attrs)

    def retrace(self) -> None:
        """Re-trace the (modified) model; invalidates the cached analysis."""
        self.graph = self.kind.retrace(self)
        self._analysis = None


class Pass:
    """Base class; subclasses are ``@dataclass`` with a class attribute ``name``."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    writes_files: ClassVar[bool] = False
    offload_ok: ClassVar[bool] = False  # can run with compile --offload
    # options naming files the pass reads: checked to exist before the model loads
    file_options: ClassVar[tuple[str, ...]] = ()

    def input_files(self) -> list[tuple[str, str]]:
        """(option, path) of every file this pass will read ('self', '' and 'default'
        name none)."""
        out = []
        for opt in self.file_options:
            value = getattr(self, opt, None)
            if value not in (None, "", "self", "default"):
                out.append((opt, str(value)))
        return out

    def check_offload(self, calib: CalibrationDefaults) -> None:
        """Refuse, before any work starts, a pass (or options) that cannot run with the
        weights offloaded (compile --offload). ``calib`` holds the compile defaults."""
        if not self.offload_ok:
            raise PipelineError(f"pass '{self.name}' needs the whole model in memory and cannot "
                                "run with --offload (offloaded pipelines take sparsify and "
                                "save-hf; run other passes on the saved OUTDIR/hf)")

    def uses_input_model(self) -> bool:
        """Does this pass read the model as loaded (``state.input_model``)?"""
        return False

    def check_options(self) -> None:
        """Validate options; raise ``self.option_error`` naming the option."""

    def requires(self, state: CompileState) -> None:
        """Preconditions on the state (raise a SlimgraphError to refuse)."""

    def run(self, state: CompileState) -> PassResult:
        raise NotImplementedError(f"pass {self.name} has no run()")

    def ensures(self, state: CompileState, result: PassResult) -> None:
        """Postconditions (raise to report a broken pass)."""

    def require_torch(self, state: CompileState, *, weights: bool = True,
                      out_dir: bool = False) -> None:
        """The common preconditions: a PyTorch model, with weights, and an OUTDIR."""
        from slimgraph.models.torch_model import TorchModel

        TorchModel().check_input(state, weights=weights, out_dir=out_dir)

    def option_error(self, option: str, message: str) -> PipelineError:
        return PipelineError(f"pass '{self.name}', option '{option}': {message}")

    @classmethod
    def options(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if not f.name.startswith("_")]

    def describe(self) -> str:
        """The pass as pipeline text, showing options that differ from their defaults."""
        opts = ",".join(f"{f.name}={getattr(self, f.name)}" for f in self.options()
                        if getattr(self, f.name) != f.default)
        return f"{self.name}{{{opts}}}" if opts else self.name
