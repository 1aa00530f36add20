"""`prune-structured`: score units by group magnitude, select, and remove them.

    prune-structured{heads=0.33,mlp=0.5,importance=l2,round_to=8,protect=0 29}

Ratios are fractions of the units of every group of that kind to remove (heads:
attention heads or whole GQA KV-groups; qheads: query heads within the KV-groups of a
GQA layer, the same slot in every group, so the query-per-KV ratio stays uniform (the
only head pruning for models with one KV head); mlp: MLP channels; hidden: the residual
dimension). ``ratio`` sets heads and mlp at once; explicit kinds override it.
``params=110e6`` instead of ``mlp``: the MLP ratio (the same in every layer before any
``allocation=global``) is the smallest that leaves at most that many parameters, after
the other ratios given (heads, qheads); not with ``hidden``.

Importance: ``l1`` / ``l2`` (group magnitude: the norm of every weight a unit owns),
``act`` (activation-aware: for each linear reading the unit's channels, the sum over
its positions j of ||X_j||^2 ||W[:, j]||^2 on calibration data, i.e. the output energy
the unit carries; calibration as for `sparsify`, ``samples`` windows of ``seqlen``) or
``obs`` (the output error left after the optimal update of the kept columns, units
removed greedily in ``obs_steps`` batches, SlimGPT).

Reconstruction (``reconstruct``; default: on whenever the pass has calibration data,
i.e. importance act/obs or a --calib-file; ``reconstruct=false`` turns it off): the
units of heads / qheads / mlp groups are chosen block by block, each block observed on
the outputs of the blocks already pruned (the walk `sparsify` uses,
``structured/recovery.py``); every linear that reads removed channels -- o_proj for
heads, KV-groups and query-head slots, down_proj for MLP channels -- gets its kept input
columns refitted on its calibration inputs, ``W_S' = W_S + W_P H_PS H_SS^-1`` with
``H = sum x x^T`` damped by ``damp`` (0.01) x mean(diag H) (``structured/refit.py``);
biases are kept as they are. Hidden channels are chosen before the walk (activation
energy for act/obs) and not refitted: the readers of the residual stream (q/k/v and
gate/up of every layer, lm_head) keep their weights, so hidden removal stays exactly the
masked model. The report's ``reconstruct`` lists the refitted linears (``refitted``),
what is not refitted (``not_refitted``) and per linear the calibration output error of
zeroing the columns without and with the refit (``rel_error_no_update``,
``rel_error_refit``, relative to the linear's output energy).
``refit_to``: what the refit aims at. ``pruned`` (default): the layer's own outputs on
the pruned model's inputs (the formula above). ``dense``: the dense model's outputs of the
layer -- the block is run on the dense model's inputs as well (a second stream of hidden
states carried block to block), and the kept columns are fitted to ``W x_dense`` from the
pruned inputs (``W_S' = (T_S + W_S L)(H_SS + L)^-1``, ``T = sum W x_dense x^T``, ``L`` the
damping), so each layer also makes up for what the blocks before it lost. ``residual``:
as dense, and the block's last writer to the residual stream (down_proj) is fitted to
what brings the block's output back to the dense block's output; checked per block (a
block whose output is not ``rest + down_proj(x)`` falls back to dense; the report's
``target`` per linear says which).
Calibration: ``samples`` windows of ``seqlen`` tokens (default: --calib-samples, 64, when
the blocks are walked or scored -- reconstruct, obs, global; 16 for act alone, as before;
``seqlen`` default: --calib-seqlen, 512).

``importance=obs``: SlimGPT's selection; each unit's cost is the output error left after
the optimal update of the other columns (``tr(W_P [H^-1]_PP^-1 W_P^T)`` summed over the
unit's readers), units removed greedily in ``obs_steps`` (8) batches with the weights and
``H^-1`` updated after each. It works with ``reconstruct=false`` too (chosen with the
update in mind, not updated).

``allocation=global`` (default ``uniform``: the same ratio in every layer): per kind, the
same total number of units as uniform, ranked across layers on one scale -- every
group's scores standardised (FLAP: ``(s - mean) / std`` within the group, from one dense
block-sequential pass for act/obs) -- with at least ``layer_floor`` (default ratio / 2)
and at most ``layer_ceiling`` (default min(2 x ratio, 0.9)) of each layer's units removed.
The units themselves are then chosen in the walk as above. Not with ``round_to``.

ONNX input (``compile model.onnx -p "prune-structured{mlp=0.5},export-onnx"``): heads,
mlp and hidden units are removed from the ONNX model in memory
(``slimgraph.structured.onnx_removal``: initializers sliced through the handles, shape
constants rewritten, means and norms over hidden channels corrected, shapes re-checked).
The calibrated parts -- act / obs, the refit, global allocation -- run through the model
kind's block observer (``state.kind.block_observer``; ``structured/observer.py``), on ONNX
input one segment model per decoder layer in ONNX Runtime, with the tokenizer found beside
the file; hidden channels are scored (act / obs) from one run of the dense model on
either kind. Where the blocks cannot be
observed (an ONNX graph that cannot be cut into layers), the default refit of l1 / l2
removal is left out and the report's ``reconstruct.note`` says why.
"""

from __future__ import annotations

from dataclasses import dataclass

from slimgraph.errors import PipelineError
from slimgraph.passes.base import CompileState, Pass, PassResult
from slimgraph.passes.registry import register


def parse_layers(text: str) -> set[int]:
    out: set[int] = set()
    for tok in text.replace(";", " ").replace(":", " ").split():
        try:
            out.add(int(tok))
        except ValueError:
            raise PipelineError(f"option 'protect': {tok!r} is not a layer "
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
    params: float | None = None
    importance: str = "l2"
    round_to: int = 1
    protect: str = ""
    remove: bool = True
    samples: int | None = None
    seqlen: int | None = None  # default: --calib-seqlen (512)
    reconstruct: bool | None = None
    allocation: str = "uniform"
    layer_floor: float | None = None
    layer_ceiling: float | None = None
    damp: float = 0.01
    refit_to: str = "pruned"
    obs_steps: int = 8
    batch: int = 8

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
        if self.params is not None:
            if not self.params >= 1:
                raise self.option_error("params", f"must be a parameter count >= 1, got "
                                        f"{self.params}")
            for opt in ("mlp", "ratio", "hidden"):
                if getattr(self, opt) is not None:
                    raise self.option_error(
                        "params", f"params sets the MLP ratio; it cannot be given with {opt}="
                        + (" (hidden channels shrink every MLP channel's size)"
                           if opt == "hidden" else ""))
        elif not any(self.ratios().values()):
            raise self.option_error("heads/qheads/mlp/hidden/ratio", "nothing to remove: give a ratio "
                                    "> 0, e.g. prune-structured{mlp=0.5}")
        if self.importance not in ("l1", "l2", "act", "obs"):
            raise self.option_error("importance", f"{self.importance!r} is not one of l1, l2, "
                                    "act, obs")
        for opt in ("samples", "seqlen", "obs_steps", "batch"):
            if getattr(self, opt) is not None and getattr(self, opt) < 1:
                raise self.option_error(opt, f"must be >= 1, got {getattr(self, opt)}")
        if not 0 <= self.damp < 1:
            raise self.option_error("damp", f"must be in [0, 1), got {self.damp}")
        if self.refit_to not in ("pruned", "dense", "residual"):
            raise self.option_error("refit_to", f"{self.refit_to!r} is not one of pruned, dense, "
                                    "residual")
        if self.allocation not in ("uniform", "global"):
            raise self.option_error("allocation", f"{self.allocation!r} is not one of uniform, "
                                    "global")
        for opt in ("layer_floor", "layer_ceiling"):
            val = getattr(self, opt)
            if val is not None and self.allocation != "global":
                raise self.option_error(opt, "applies to allocation=global only")
            if val is not None and not 0.0 <= val < 1.0:
                raise self.option_error(opt, f"{val} is outside [0, 1)")
        if self.allocation == "global" and self.round_to > 1:
            raise self.option_error("round_to", "applies to allocation=uniform only (global "
                                    "allocation gives every layer its own count)")
        if self.allocation == "global" and self.layer_floor is not None and \
                self.layer_ceiling is not None and self.layer_floor > self.layer_ceiling:
            raise self.option_error("layer_floor", f"{self.layer_floor} is above layer_ceiling "
                                    f"{self.layer_ceiling}")
        for kind, ratio in self.ratios().items() if self.allocation == "global" else ():
            if ratio and self.layer_floor is not None and self.layer_floor > ratio:
                raise self.option_error("layer_floor", f"{self.layer_floor} is above the {kind} "
                                        f"ratio {ratio} (no layer could remove less)")
            if ratio and self.layer_ceiling is not None and self.layer_ceiling < ratio:
                raise self.option_error("layer_ceiling", f"{self.layer_ceiling} is below the "
                                        f"{kind} ratio {ratio} (no layer could remove more)")
        if self.round_to < 1:
            raise self.option_error("round_to", f"must be >= 1, got {self.round_to}")
        parse_layers(self.protect)

    def requires(self, state: CompileState) -> None:
        state.kind.check_input(state)
        if self.ratios().get("heads") or self.ratios().get("qheads"):
            state.kind.check_head_removal(state)
        source = state.calib.file or "self"
        if self.uses_data(state) and source != "self" and state.kind.tokenizer(state) is None:
            raise PipelineError(f"pass '{self.name}': {self._data_use()} needs calibration data "
                                f"and {state.kind.missing_tokenizer(state)}")
        if self.uses_data(state) and source == "self" and \
                state.kind.sampling_model(state) is None:
            raise PipelineError(f"pass '{self.name}': {self._data_use()} needs calibration data; "
                                f"text sampled from the model (self) needs the PyTorch model: "
                                "give a calibration file (--calib-file)")

    def _data_use(self) -> str:
        return f"importance={self.importance}" if self.importance in ("act", "obs") else \
            "reconstruct=true"

    def reconstructs(self, state: CompileState) -> bool:
        """``reconstruct`` as given, else on whenever the pass has calibration data
        (importance act/obs, or a calibration text -- the default --calib-file -- and a
        tokenizer to read it)."""
        if self.reconstruct is not None:
            return self.reconstruct
        if self.importance in ("act", "obs"):
            return True
        # a calibration text needs a tokenizer to be data ('self' samples from the model)
        source = state.calib.file or "self"
        if source == "self":
            return bool(state.calib.file) and state.kind.sampling_model(state) is not None
        return bool(state.calib.file) and state.kind.tokenizer(state) is not None

    def uses_data(self, state: CompileState) -> bool:
        return self.importance in ("act", "obs") or self.reconstructs(state)

    def run(self, state: CompileState) -> PassResult:
        from slimgraph.structured.recovery import BLOCK_KINDS
        from slimgraph.structured.selection import (NothingToPruneError, choose,
                                                    counts_for_params, plan_counts)

        result = state.analysis()
        params_plan = {}
        ratios = self.ratios()
        try:
            if self.params is not None:
                total = result.graph.num_parameters()
                ratio, counts, skipped = counts_for_params(
                    result.groups, self.ratios(), "mlp", int(self.params), total,
                    self.round_to, parse_layers(self.protect))
                params_plan = {"target": int(self.params), "before": total,
                               "mlp_ratio": round(ratio, 6)}
                ratios = {**ratios, "mlp": ratio}
            else:
                counts, skipped = plan_counts(result.groups, self.ratios(), self.round_to,
                                              parse_layers(self.protect))
        except NothingToPruneError as e:
            if state.kind.no_groups_hint:  # either reason: no group of the kind, or none prunable
                raise PipelineError(f"{e}{state.kind.no_groups_hint}") from None
            raise
        by_id = {g.id: g for g in result.groups}
        windows = self._windows(state) if counts and self.uses_data(state) else None
        walk = self.reconstructs(state) or self.importance == "obs"
        blocks = any(by_id[gid].kind in BLOCK_KINDS for gid in counts)
        observer, note = None, None
        if blocks and (walk or (self.allocation == "global" and
                                self.importance in ("act", "obs"))):
            observer, note = self._observer(state, result, windows)
            walk = walk and observer is not None
        try:
            if counts and self.allocation == "global":
                counts = self._global_counts(state, result, counts, windows, ratios, observer)
            later = {gid: n for gid, n in counts.items()
                     if walk and by_id[gid].kind in BLOCK_KINDS}
            walk = bool(later)
            selection: dict[int, list[int]] = {}
            now = {gid: n for gid, n in counts.items() if gid not in later}
            scores = self._scores(state, [by_id[gid] for gid in now], windows) if now else {}
            for gid, n in now.items():
                selection[gid] = choose(scores[gid], n)
            report = {"skipped": skipped, "importance": self.importance,
                      "allocation": self.allocation}
            if params_plan:
                report["params_target"] = params_plan
            if walk:
                report["reconstruct"] = self._walk(state, result, later, selection, windows,
                                                   observer)
            else:
                report["reconstruct"] = {"enabled": False, **({"note": note} if note else {})}
        finally:
            if observer is not None:
                observer.close()
        report["selected_units"] = {str(k): v for k, v in sorted(selection.items())}
        if not selection:
            return PassResult(False, report)
        if not self.remove:
            state.selection.update(selection)
            return PassResult(False, report)
        report.update(state.kind.remove_units(state, result, selection))
        state.record_removal(report)
        state.retrace()
        return PassResult(True, report)

    def _windows(self, state: CompileState):
        from slimgraph.sparsity.calibration import calibration_tokens, sample_windows

        samples = self.samples_used(state)
        source = state.calib.file or "self"
        tokens = calibration_tokens(state.kind.tokenizer(state), source,
                                    state.kind.sampling_model(state),
                                    seqlen=self.seqlen_used(state), samples=samples,
                                    progress=state.progress)
        return sample_windows(tokens, samples, self.seqlen_used(state), 0)

    def seqlen_used(self, state: CompileState) -> int:
        """``seqlen``, else the compile's --calib-seqlen (512)."""
        return self.seqlen or state.calib.seqlen

    def samples_used(self, state: CompileState) -> int:
        """``samples``, else the compile default (64) where the pass walks the blocks
        (reconstruct, obs, global act), else 16 (importance=act alone, as before)."""
        if self.samples is not None:
            return self.samples
        if self.reconstructs(state) or self.importance == "obs" or self.allocation == "global":
            return state.calib.samples
        return 16

    def _observer(self, state: CompileState, result, windows):
        """The model kind's block observer, and None with a note for the report where the
        blocks cannot be observed and nothing asked for it explicitly (the default refit
        of l1/l2 removal is then left out); else that is an error."""
        from slimgraph.structured.observer import ObserverError

        try:
            return state.kind.block_observer(state, result, windows, self.batch), None
        except ObserverError as e:
            if self.reconstruct is None and self.importance in ("l1", "l2"):
                return None, f"no refit: {e}"
            raise PipelineError(f"pass '{self.name}': {self._data_use()}: {e}") from None

    def _scores(self, state: CompileState, groups: list, windows) -> dict:
        """Per group id, its units' scores when chosen outside the block walk."""
        from slimgraph.structured.importance import group_importance

        if self.importance in ("l1", "l2"):
            return {g.id: group_importance(state.graph, g, self.importance) for g in groups}
        # hidden channels with obs: scored by activation energy (obs is per block)
        return state.kind.activation_scores(state, groups, windows, self.batch)

    def _global_counts(self, state, result, counts: dict[int, int], windows,
                       ratios: dict[str, float], observer) -> dict[int, int]:
        from slimgraph.structured.recovery import BLOCK_KINDS, dense_unit_scores
        from slimgraph.structured.selection import global_counts

        by_id = {g.id: g for g in result.groups}
        groups = [by_id[gid] for gid in counts]
        scores = {}
        block_groups = [g for g in groups if g.kind in BLOCK_KINDS]
        if block_groups and self.importance in ("l1", "l2"):
            scores.update(self._scores(state, block_groups, windows))
        elif block_groups:
            scores.update(dense_unit_scores(observer, block_groups, self.importance,
                                            damp=self.damp, progress=state.progress))
        rest = [g for g in groups if g.kind not in BLOCK_KINDS]
        if rest:
            scores.update(self._scores(state, rest, windows))
        out = {}
        for kind in {g.kind for g in groups}:
            ratio = ratios[kind]
            floor = self.layer_floor if self.layer_floor is not None else ratio / 2
            ceiling = self.layer_ceiling if self.layer_ceiling is not None else min(0.9, 2 * ratio)
            out.update(global_counts(groups, {g.id: counts[g.id] for g in groups
                                              if g.kind == kind}, scores, floor, ceiling))
        return out

    def _walk(self, state, result, counts: dict[int, int], selection: dict[int, list[int]],
              windows, observer) -> dict:
        """Block-sequential choice (and refit) of the heads / qheads / mlp units on the
        model kind's block ``observer``; the units chosen before (hidden) are masked
        first, so the blocks see the masked model."""
        from slimgraph.structured.recovery import BlockRemover, walk_blocks
        from slimgraph.structured.unit_slicing import mask_units

        reconstruct = self.reconstructs(state)
        if selection:
            mask_units(result, selection)
        remover = BlockRemover(result, counts, self.importance, reconstruct=reconstruct,
                               damp=self.damp, obs_steps=self.obs_steps,
                               target=self.refit_to, observer=observer)
        walk_blocks(observer, remover.visit, progress=state.progress)
        selection.update(remover.selection)
        by_id = {g.id: g for g in result.groups}
        hidden = [gid for gid in selection if by_id[gid].kind == "hidden"]
        not_refitted = ["the readers of the removed hidden channels (q/k/v, gate/up of every "
                        "layer, lm_head) are not refitted"] if hidden else []
        return {"enabled": reconstruct, "damp": self.damp, "refit_to": self.refit_to,
                "calibration": {
                    "source": str(state.calib.file or "self"),
                    "samples": self.samples_used(state), "seqlen": self.seqlen_used(state)},
                "refitted": [r["linear"] for r in remover.refitted],
                "not_refitted": not_refitted, "linears": remover.refitted}


register(PruneStructured)
