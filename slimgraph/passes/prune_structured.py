"""`prune-structured`: score units by group magnitude, select, and remove them.

    prune-structured{heads=0.33,mlp=0.5,importance=l2,round_to=8,protect=0 29}

Ratios are fractions of the units of every group of that kind to remove (heads:
attention heads or whole GQA KV-groups; qheads: query heads within the KV-groups of a
GQA layer, the same slot in every group, so the query-per-KV ratio stays uniform (the
only head pruning for models with one KV head); mlp: MLP channels; hidden: the residual
dimension). ``ratio`` sets heads and mlp at once; explicit kinds override it.

Importance: ``l1`` / ``l2`` (group magnitude: the norm of every weight a unit owns) or
``act`` (activation-aware: for each linear reading the unit's channels, the sum over
its positions j of ||X_j||^2 ||W[:, j]||^2 on calibration data, i.e. the output energy
the unit carries; calibration as for `sparsify`, ``samples`` windows of ``seqlen``).

ONNX input (``compile model.onnx -p "prune-structured{mlp=0.5},export-onnx"``): heads,
mlp and hidden units are removed from the ONNX model in memory
(``slimgraph.structured.onnx_removal``: initializers sliced through the handles, shape
constants rewritten, means and norms over hidden channels corrected, shapes re-checked);
``importance=act`` is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from slimgraph.errors import PipelineError
from slimgraph.passes.base import CompileState, Pass, PassResult
from slimgraph.passes.registry import register
from slimgraph.structured.importance import group_importance
from slimgraph.structured.removal import remove_units
from slimgraph.structured.selection import choose, plan_counts


def parse_layers(text: str, pass_name: str) -> set[int]:
    out: set[int] = set()
    for tok in text.replace(";", " ").replace(":", " ").split():
        try:
            out.add(int(tok))
        except ValueError:
            raise PipelineError(f"pass '{pass_name}', option 'protect': {tok!r} is not a layer "
                                "index (write e.g. protect=0 29)") from None
    return out


@dataclass
class PruneStructured(Pass):
    name = "prune-structured"
    summary = "remove the least important heads / MLP channels / hidden channels"
    heads: float | None = None
    qheads: float | None = None
    mlp: float | None = None
    hidden: float | None = None
    ratio: float | None = None
    importance: str = "l2"
    round_to: int = 1
    protect: str = ""
    remove: bool = True
    samples: int = 16
    seqlen: int = 512

    def ratios(self) -> dict[str, float]:
        out = {}
        for kind in ("heads", "qheads", "mlp", "hidden"):
            val = getattr(self, kind)
            if val is None and kind in ("heads", "mlp"):
                val = self.ratio
            if val is not None:
                out[kind] = val
        return out

    def check_options(self) -> None:
        for opt in ("heads", "qheads", "mlp", "hidden", "ratio"):
            val = getattr(self, opt)
            if val is not None and not 0.0 <= val < 1.0:
                raise self.option_error(opt, f"ratio {val} is outside [0, 1)")
        if not any(self.ratios().values()):
            raise self.option_error("heads/qheads/mlp/hidden/ratio", "nothing to remove: give a ratio "
                                    "> 0, e.g. prune-structured{mlp=0.5}")
        if self.importance not in ("l1", "l2", "act"):
            raise self.option_error("importance", f"{self.importance!r} is not one of l1, l2, act")
        for opt in ("samples", "seqlen"):
            if getattr(self, opt) < 1:
                raise self.option_error(opt, f"must be >= 1, got {getattr(self, opt)}")
        if self.round_to < 1:
            raise self.option_error("round_to", f"must be >= 1, got {self.round_to}")
        parse_layers(self.protect, self.name)

    def requires(self, state: CompileState) -> None:
        if state.is_onnx:
            self._check_onnx(state)
            return
        self.require_torch(state)
        if self.importance == "act" and state.loaded.tokenizer is None and \
                (state.calib.get("file") or "self") != "self":
            raise PipelineError(f"pass '{self.name}': importance=act needs calibration data "
                                "and the model has no tokenizer")

    def run(self, state: CompileState) -> PassResult:
        result = state.analysis()
        try:
            counts, skipped = plan_counts(result.groups, self.ratios(), self.round_to,
                                          parse_layers(self.protect, self.name), self.name)
        except PipelineError as e:
            if state.model is None and ("unprunable" in str(e) or "has no" in str(e)):
                raise PipelineError(f"{e}; on ONNX input, groups are tracked exactly on files "
                                    "exported with static shapes (dynamic batch/sequence axes "
                                    "can hide head counts and channels behind run-time shape "
                                    "arithmetic; see slimgraph inspect MODEL.onnx --all)"
                                    ) from None
            raise
        selection: dict[int, list[int]] = {}
        by_id = {g.id: g for g in result.groups}
        score_of = self._scorer(state) if counts else None
        for gid, n in counts.items():
            selection[gid] = choose(score_of(by_id[gid]), n)
        report = {"skipped": skipped, "selected_units": {str(k): v for k, v in selection.items()}}
        if not selection:
            return PassResult(False, report)
        if not self.remove:
            state.selection.update(selection)
            return PassResult(False, report)
        if state.model is None:
            from slimgraph.structured.onnx_removal import remove_units_onnx

            report.update(remove_units_onnx(result, selection, self.name))
        else:
            report.update(remove_units(state.model, result, selection))
        state.record_removal(report)
        state.retrace()
        return PassResult(True, report)

    def _check_onnx(self, state: CompileState) -> None:
        """ONNX input: what only the PyTorch path supports is refused here, by option."""
        if self.importance == "act":
            raise self.option_error("importance", "'act' runs the PyTorch model on calibration "
                                    "data; it is not supported for ONNX input (use l1 or l2)")
        if state.graph is None or state.graph.meta.get("onnx_model") is None:
            raise PipelineError(f"pass '{self.name}': the ONNX model is not loaded")
        if self.ratios().get("heads") or self.ratios().get("qheads"):
            from slimgraph.structured.onnx_removal import check_contrib_attention

            check_contrib_attention(state.graph, self.name)

    def _scorer(self, state: CompileState):
        if self.importance in ("l1", "l2"):
            return lambda g: group_importance(state.graph, g, self.importance)
        from slimgraph.sparsity.calibration import calibration_tokens, sample_windows
        from slimgraph.structured.importance import activation_scorer

        source = state.calib.get("file") or "self"
        tokens = calibration_tokens(state.loaded.tokenizer, source, state.model,
                                    seqlen=self.seqlen, samples=self.samples)
        windows = sample_windows(tokens, self.samples, self.seqlen, 0)
        return activation_scorer(state.model, state.graph, windows.split(8))


register(PruneStructured)
