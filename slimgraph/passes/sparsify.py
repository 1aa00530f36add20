"""`sparsify`: post-training unstructured or N:M sparsity of the decoder-block linears.

    sparsify{score=ria,pattern=2:4}
    sparsify{score=wanda,sparsity=0.5,scope=row}
    sparsify{score=ria,pattern=2:4,reconstruct=true}
    sparsify{score=wanda,sparsity=0.5,schedule=owl}

Scores: magnitude, wanda, ri, ria (``a`` = activation exponent, default 0.5), or
sparsegpt (SparseGPT's adaptive saliency w^2/[H^-1]_jj^2; implies reconstruct). Masks:
unstructured at ``sparsity`` (compared per ``scope``: layer or row) or N:M
(``pattern``) along the reduction axis. ``reconstruct`` adds the SparseGPT-style
weight update. Calibration is block-sequential (``sparsity/calibration.py``): samples
x seqlen tokens from ``calib`` (a text file, Alpaca JSON/JSONL, or ``self``); the
compile command's --calib-* options set the defaults.

Channel permutation (N:M only, ``sparsity/deploy.py``): ``permute=mask-only`` (the
permutation only chooses the mask; the stored weight is not N:M, the RIA reference's
behaviour), ``fold`` (folded into the producers of a linear's inputs where the channel
groups allow: down_proj with gate/up rows, o_proj with v_proj rows), ``space`` (one
permutation of the residual stream for all its readers, plus fold), ``gather`` (any
permutation: ``W[:, pi]`` stored, the input gathered; down_proj folds, at no cost; with
``gather_share=true`` linears reading the same activation share one permutation and one
gather: a third of the runtime cost, some of the gain lost). ``search=fast``
(independent blocks of channels) or ``exact``. After fold, space or gather the stored
weights are N:M and the model computes what the un-permuted masked model computes.

Per-layer schedules (unstructured only, ``sparsity/schedules.py``): ``schedule=uniform``
(default), ``layer_sparsity=0.4 0.5 ...`` (one value per decoder block), ``schedule=linear``
with ``spread``, ``schedule=owl`` (``owl_m``, ``owl_lambda``; one extra dense
block-sequential pass for the outlier ratios). The parameter-weighted mean over the pruned
linears equals ``sparsity``; the per-layer values are in the report.

The pruned linears are the decoder-block linears of ``slimgraph/ir/blocks.py`` (named
inside a numbered block; not found through the channel groups, so k/v of a one-KV-head
model are pruned too). The pass is one piece of code for every model kind: the block walk
is ``sparsity/block_prune.py`` (``prune_blocks``, on the kind's block observer: hooks on
a PyTorch model's block modules, or one ONNX Runtime segment model per layer of an ONNX
model, ``structured/onnx_observer.py``), the per-linear step (score, permutation, mask or
update) ``sparsity/prune_step.py``; this module holds the options, their checks and the
driver. A block linear left as it is (input size not divisible by M, not an nn.Linear) is
listed in the report's ``skipped`` with the reason. ``ensures`` checks the claim: every
block linear is pruned or skipped, and under ``pattern=N:M`` every pruned one holds N:M
(else the compile fails).

On ONNX input (a model that exists only as an .onnx file) the weights are written back
into the ONNX model (``export-onnx`` saves it) and calibration runs through ONNX Runtime
(the masks of the PyTorch model); reconstruction, every permute mode and per-layer
schedules work; calib=self is refused. A graph that cannot be cut into layers is
calibrated in one dense run (not with reconstruction) and the report says so.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from slimgraph.errors import PipelineError
from slimgraph.passes.base import CalibrationDefaults, CompileState, Pass, PassResult
from slimgraph.passes.registry import register

if TYPE_CHECKING:
    from slimgraph.sparsity.options import PruneOptions

SCORES = ("magnitude", "wanda", "ri", "ria", "sparsegpt")  # sparsegpt: its own saliency
PERMUTE_MODES = ("none", "mask-only", "fold", "space", "gather")


@dataclass
class Sparsify(Pass):
    name = "sparsify"
    offload_ok = True
    summary = "magnitude / Wanda / RI / RIA sparsity (unstructured or N:M), optional reconstruction"
    file_options = ("calib",)
    score: str = "ria"
    sparsity: float | None = None
    pattern: str | None = None
    scope: str | None = None
    a: float = 0.5
    reconstruct: bool = False
    calib: str | None = None
    samples: int | None = None
    seqlen: int | None = None
    seed: int = 0
    batch: int = 8
    permute: str = "none"
    search: str = "fast"
    gather_share: bool = False  # permute=gather: one permutation per activation, not per linear
    schedule: str | None = None  # uniform (default), explicit, linear, owl
    layer_sparsity: str = ""  # explicit per-block values, "0.4 0.45 0.5"
    spread: float | None = None  # schedule=linear: s - spread .. s + spread
    owl_m: float | None = None  # schedule=owl: outlier threshold, M x the mean score (5)
    owl_lambda: float | None = None  # schedule=owl: density range 1 - s -/+ lambda (0.08)

    def schedule_name(self) -> str:
        """The schedule in effect: ``layer_sparsity`` implies ``explicit``."""
        if self.schedule is None:
            return "explicit" if self.layer_sparsity.strip() else "uniform"
        return self.schedule

    def layer_values(self) -> list[float]:
        from slimgraph.sparsity.schedules import parse_layer_sparsity

        try:
            return parse_layer_sparsity(self.layer_sparsity)
        except ValueError as e:
            raise self.option_error("layer_sparsity", str(e)) from None

    def nm(self) -> tuple[int, int] | None:
        from slimgraph.sparsity.masks import parse_pattern

        if self.pattern is None:
            return None
        try:
            return parse_pattern(self.pattern)
        except ValueError as e:
            raise self.option_error("pattern", str(e)) from None

    def check_options(self) -> None:
        if self.score not in SCORES:
            raise self.option_error("score", f"{self.score!r} is not one of {', '.join(SCORES)}")
        if self.pattern is None and self.sparsity is None and not self.layer_sparsity.strip():
            raise self.option_error("sparsity/pattern", "give a sparsity (e.g. sparsity=0.5) or "
                                    "an N:M pattern (e.g. pattern=2:4)")
        if self.pattern is not None and self.sparsity is not None:
            raise self.option_error("sparsity/pattern", "give either sparsity or pattern, not both")
        if self.sparsity is not None and not 0.0 < self.sparsity < 1.0:
            raise self.option_error("sparsity", f"{self.sparsity} is outside (0, 1)")
        self.nm()
        self.check_schedule()
        if self.scope not in (None, "layer", "row"):
            raise self.option_error("scope", f"{self.scope!r} is not one of layer, row")
        if self.pattern is not None and self.scope is not None:
            raise self.option_error("scope", "N:M masks are always per row and group of M")
        if self.permute not in PERMUTE_MODES:
            raise self.option_error("permute", f"{self.permute!r} is not one of "
                                    f"{', '.join(PERMUTE_MODES)}")
        if self.permute != "none" and self.pattern is None:
            raise self.option_error("permute", "channel permutation needs an N:M pattern")
        if self.search not in ("fast", "exact"):
            raise self.option_error("search", f"{self.search!r} is not one of fast, exact")
        if self.gather_share and self.permute != "gather":
            raise self.option_error("gather_share", f"is an option of permute=gather (permute "
                                    f"is {self.permute})")
        if self.a < 0:
            raise self.option_error("a", f"must be >= 0, got {self.a}")
        for opt in ("samples", "seqlen", "batch"):
            val = getattr(self, opt)
            if val is not None and val < 1:
                raise self.option_error(opt, f"must be >= 1, got {val}")

    def check_schedule(self) -> None:
        """Per-layer schedule options (the count of ``layer_sparsity`` is checked against
        the model's blocks in ``requires``)."""
        from slimgraph.sparsity.schedules import SCHEDULES

        sched = self.schedule_name()
        if sched not in SCHEDULES:
            raise self.option_error("schedule", f"{sched!r} is not one of {', '.join(SCHEDULES)}")
        if self.pattern is not None and sched != "uniform":
            raise self.option_error("schedule", f"an N:M pattern ({self.pattern}) fixes the "
                                    "sparsity of every group of M weights; per-layer schedules "
                                    f"(here {sched}) are for unstructured sparsity: give "
                                    "sparsity=... instead of pattern")
        if self.layer_sparsity.strip():
            if sched != "explicit":
                raise self.option_error("layer_sparsity", f"explicit per-layer values cannot be "
                                        f"combined with schedule={sched}")
            self.layer_values()
            if self.sparsity is not None:
                raise self.option_error("layer_sparsity", "give either sparsity or "
                                        "layer_sparsity (the overall sparsity is then the "
                                        "parameter-weighted mean of the per-layer values)")
        elif sched == "explicit":
            raise self.option_error("schedule", "schedule=explicit needs layer_sparsity (one "
                                    "value per decoder block, e.g. layer_sparsity=0.4 0.5 0.6)")
        for opt, owner in (("spread", "linear"), ("owl_m", "owl"), ("owl_lambda", "owl")):
            if getattr(self, opt) is not None and sched != owner:
                raise self.option_error(opt, f"is an option of schedule={owner} (the schedule "
                                        f"is {sched})")
        if sched in ("linear", "owl") and self.sparsity is None:
            raise self.option_error("schedule", f"schedule={sched} needs a mean sparsity "
                                    "(e.g. sparsity=0.5)")
        s = self.sparsity
        if sched == "linear":
            if self.spread is None:
                raise self.option_error("spread", "schedule=linear needs spread (e.g. "
                                        "spread=0.1: from sparsity - 0.1 to sparsity + 0.1)")
            if self.spread < 0:
                raise self.option_error("spread", f"must be >= 0, got {self.spread}")
            if not (s - self.spread > 0.0 and s + self.spread < 1.0):
                raise self.option_error("spread", f"spread={self.spread} with sparsity={s} gives "
                                        f"layers from {s - self.spread:g} to {s + self.spread:g}, "
                                        "outside (0, 1)")
        if sched == "owl":
            if self.owl_m is not None and self.owl_m <= 0:
                raise self.option_error("owl_m", f"must be > 0, got {self.owl_m}")
            lam = self.owl_lam()
            if lam < 0:
                raise self.option_error("owl_lambda", f"must be >= 0, got {lam}")
            if not (s - lam > 0.0 and s + lam < 1.0):
                raise self.option_error("owl_lambda", f"owl_lambda={lam} with sparsity={s} maps "
                                        f"layers into [{s - lam:g}, {s + lam:g}], outside (0, 1)")

    def owl_lam(self) -> float:
        return 0.08 if self.owl_lambda is None else self.owl_lambda

    def owl_threshold(self) -> float:
        return 5.0 if self.owl_m is None else self.owl_m

    def check_offload(self, calib: CalibrationDefaults) -> None:
        if self.permute in ("fold", "space", "gather"):
            raise self.option_error("permute", f"{self.permute} changes weights outside one "
                                    "block and cannot run with --offload (mask-only can)")
        if self.needs_data() and str(self.calib or calib.file or "self") == "self":
            raise self.option_error("calib", "text sampled from the model itself ('self') needs "
                                    "the whole model in memory; give a calibration file with "
                                    "--offload (--calib-file)")

    def needs_data(self) -> bool:
        """Calibration text is needed: for the score, the reconstruction, or OWL's
        outlier ratios (Wanda scores, whatever the pruning score)."""
        return self.needs_stats() or self.schedule_name() == "owl"

    def needs_stats(self) -> bool:
        """The pruning pass observes each block's linear inputs."""
        from slimgraph.sparsity.options import needs_stats

        return needs_stats(self.score, self.reconstruct)

    def needs_hessian(self) -> bool:
        """SparseGPT's weight update (reconstruct=true or score=sparsegpt) needs the Gram
        matrix of each linear's inputs."""
        from slimgraph.sparsity.options import needs_hessian

        return needs_hessian(self.score, self.reconstruct)

    def prune_options(self) -> PruneOptions:
        """The options the sparsity library reads (a
        :class:`~slimgraph.sparsity.options.PruneOptions`)."""
        from slimgraph.sparsity.options import PruneOptions

        return PruneOptions(score=self.score, nm=self.nm(), sparsity=self.sparsity,
                            scope=self.scope, a=self.a, reconstruct=self.reconstruct,
                            permute=self.permute, search=self.search,
                            gather_share=self.gather_share)

    def requires(self, state: CompileState) -> None:
        from slimgraph.structured.observer import ObserverError

        state.kind.check_input(state)
        if self.schedule_name() != "uniform":
            try:
                layers = state.kind.pruned_layer_count(state)
            except ObserverError as e:
                raise self.option_error("schedule", "per-layer schedules need the layer of "
                                        f"every pruned linear: {e}") from None
            if self.schedule_name() == "explicit":
                self.check_layer_count(layers)
        if self.needs_data() and str(self.calib_source(state)) == "self" and \
                state.kind.sampling_model(state) is None:
            raise self.option_error("calib", f"score '{self.score}' needs calibration data; "
                                    "'self' (text sampled from the model) needs the PyTorch "
                                    "model: give a calibration file (calib=PATH or "
                                    "--calib-file)")
        if self.needs_data() and (self.calib or state.calib.file) != "self" and \
                state.kind.tokenizer(state) is None:
            why = f"score '{self.score}'" if self.needs_stats() else "schedule=owl"
            raise PipelineError(f"pass '{self.name}': {why} needs calibration data "
                                f"and {state.kind.missing_tokenizer(state)}")

    def check_layer_count(self, n_blocks: int) -> None:
        """``layer_sparsity`` has one value per decoder block."""
        n_values = len(self.layer_values())
        if n_values != n_blocks:
            raise self.option_error("layer_sparsity", f"{n_values} value"
                                    f"{'s' if n_values != 1 else ''} given; the model has "
                                    f"{n_blocks} decoder blocks (give one value per block)")

    def calib_source(self, state: CompileState):
        return self.calib or state.calib.file or "self"

    def calibration(self, state: CompileState):
        """``(samples, seqlen, source, windows)``: the calibration windows
        ``[samples, seqlen]`` (None when no data is needed) read with the model kind's
        tokenizer."""
        from slimgraph.sparsity.calibration import calibration_tokens, sample_windows

        samples = self.samples or state.calib.samples
        seqlen = self.seqlen or state.calib.seqlen
        source = self.calib_source(state)
        if not self.needs_data():
            return samples, seqlen, source, None
        tokens = calibration_tokens(state.kind.tokenizer(state), source,
                                    state.kind.sampling_model(state), seqlen=seqlen,
                                    samples=samples, seed=self.seed, progress=state.progress)
        return samples, seqlen, source, sample_windows(tokens, samples, seqlen, self.seed)

    def run(self, state: CompileState) -> PassResult:
        """Block by block on the model kind's block observer
        (:func:`~slimgraph.sparsity.block_prune.prune_blocks`), the same walk for every
        kind; what differs (how blocks run, how weights are stored) is the kind's."""
        from slimgraph.sparsity.block_prune import prune_blocks

        opts = self.prune_options()
        result = state.analysis()
        samples, seqlen, source, windows = self.calibration(state)
        space_info = None
        if self.permute == "space":  # before calibration: an exact reordering of the model
            space_info = state.kind.permute_space(state, opts, result, windows, self.batch)
        observer, extras, notes = state.kind.sparsify_observer(
            state, result, windows if self.needs_stats() else None, self.batch,
            hessian=self.needs_hessian())
        try:
            plan = None
            if self.pattern is None:
                plan = self.schedule_plan([b.layer for b in observer.blocks],
                                          block_params(observer, result, opts),
                                          lambda: self.owl_ratios(state, result, windows))
            reports = prune_blocks(opts, observer, result,
                                   plan["by_layer"] if plan is not None else None,
                                   progress=state.progress)
        finally:
            observer.close()
        layers = [r for rep in reports for r in rep["layers"]] + list(observer.untargeted)
        data = self.needs_data()
        calibration = {**extras, "source": str(source) if data else None,
                       "samples": samples if data else 0, "seqlen": seqlen}
        report, pruned = self.build_report(layers, calibration, plan, reports, space_info,
                                           notes=notes)
        state.kind.sparsified(state, [r["name"] for r in pruned if r.get(
            "permutation", {}).get("realised") == "gather"])
        return PassResult(True, report)

    def owl_ratios(self, state: CompileState, result, windows) -> list[float]:
        """OWL's outlier ratio of every block, from one pass of the dense model."""
        from slimgraph.sparsity.schedules import owl_outlier_ratios

        observer = state.kind.dense_observer(state, result, windows, self.batch)
        try:
            return owl_outlier_ratios(observer, self.prune_options(), self.owl_threshold(),
                                      progress=state.progress)
        finally:
            observer.close()

    def build_report(self, layers: list[dict], calibration: dict, plan: dict | None,
                     reports: list[dict], space_info: dict | None,
                     notes: list[str] | None = None) -> tuple[dict, list[dict]]:
        """The pass's report from the per-linear entries (``reports``: per block, for the
        schedule; ``notes`` given on ONNX input) and the pruned entries."""
        from slimgraph.sparsity.prune_step import permutation_summary

        skipped = [r for r in layers if r.get("skipped")]
        pruned = [r for r in layers if not r.get("skipped")]
        if not pruned:
            raise PipelineError(f"pass '{self.name}': no linear layer could be pruned "
                                f"({skipped[0]['skipped'] if skipped else 'none found'})")
        total = sum(r["numel"] for r in pruned)
        zeros = sum(r["zeros"] for r in pruned)
        report = {"score": self.score, "pattern": self.pattern, "sparsity_target": self.sparsity,
                  "reconstruct": self.reconstruct}
        if notes is not None:
            report["input"] = "onnx"
        report.update(calibration=calibration, layers=layers,
                      skipped=[f"{r['name']}: {r['skipped']}" for r in skipped],
                      sparsity=zeros / total)
        if notes is not None:
            report["notes"] = notes
        if plan is not None:
            report["sparsity_target"] = plan["target"]
            report["schedule"] = self.schedule_report(plan, reports)
        if self.permute != "none":
            report["permutation"] = permutation_summary(self.prune_options(), pruned)
            if space_info is not None:
                report["permutation"]["space"] = space_info
        return report, pruned

    def ensures(self, state: CompileState, result: PassResult) -> None:
        """Every decoder-block linear is in the report (pruned, or skipped with the reason);
        under ``pattern=N:M`` each one reported pruned holds N:M in its stored weight
        (:class:`~slimgraph.sparsity.block_prune.SparsityClaimError` otherwise)."""
        from slimgraph.sparsity import block_prune

        expected, weight_of = state.kind.claimed_weights(state)
        layers = result.report["layers"]
        missing = block_prune.unclaimed(expected, layers)
        nm = self.nm()
        failures = block_prune.nm_claim_failures(layers, nm, weight_of) if nm else []
        if missing or failures:
            raise block_prune.claim_error(self.pattern, failures, missing)

    def schedule_plan(self, layers: list[int], params: list[int],
                      owl_ratios: Callable[[], list[float]]) -> dict:
        """``by_layer`` (layer index -> s_l), the layers' parameter counts, the overall
        target and, for OWL, the outlier ratios (``owl_ratios()``, dense statistics)."""
        from slimgraph.sparsity import schedules

        sched = self.schedule_name()
        owl = None
        try:
            if sched == "uniform":
                values = [self.sparsity] * len(layers)
            elif sched == "explicit":
                values = self.layer_values()
            elif sched == "linear":
                values = schedules.match_mean(
                    schedules.linear_schedule(self.sparsity, self.spread, len(layers)), params,
                    self.sparsity)
            else:  # owl
                t0 = time.perf_counter()
                ratios = owl_ratios()
                values = schedules.match_mean(
                    schedules.owl_schedule(ratios, self.sparsity, self.owl_lam()), params,
                    self.sparsity)
                owl = {"m": self.owl_threshold(), "lambda": self.owl_lam(),
                       "outlier_ratio": [round(r, 8) for r in ratios],
                       "dense_pass_seconds": round(time.perf_counter() - t0, 3)}
        except schedules.ScheduleError as e:
            raise self.option_error("schedule", str(e)) from None
        target = schedules.weighted_mean(values, params) if sched == "explicit" else self.sparsity
        return {"name": sched, "by_layer": dict(zip(layers, values, strict=True)),
                "blocks": list(layers), "values": values, "params": params,
                "target": target, "owl": owl}

    def schedule_report(self, plan: dict, reports: list[dict]) -> dict:
        actual = {}
        for rep in reports:
            done = [r for r in rep["layers"] if not r.get("skipped")]
            numel = sum(r["numel"] for r in done)
            actual[rep["layer"]] = sum(r["zeros"] for r in done) / numel if numel else 0.0
        out = {"name": plan["name"], "layers": plan["blocks"],
               "layer_sparsity": [round(v, 6) for v in plan["values"]],
               "layer_sparsity_pruned": [round(actual.get(layer, 0.0), 6)
                                         for layer in plan["blocks"]],
               "layer_params": plan["params"]}
        if plan["name"] == "linear":
            out["spread"] = self.spread
        if plan["owl"] is not None:
            out["owl"] = plan["owl"]
        return out


def block_params(observer, result, opts: PruneOptions) -> list[int]:
    """The weights of each block's linears (shapes only: fine on the meta device)."""
    import math

    out = []
    for blk in observer.blocks:
        sites = observer.sites(blk, opts).values()
        out.append(sum(s["numel"] if isinstance(s, dict) else
                       math.prod(result.graph.params[s.param].shape) for s in sites))
    return out


register(Sparsify)
