"""`sparsify` on a model that exists only as an ONNX file: calibration and pruning of
the targets (``onnx_targets.py``) in the ``onnx_ir`` model (the pass, ``passes/sparsify.py``,
drives it).

    slimgraph compile model.onnx -p "sparsify{score=wanda,pattern=2:4},export-onnx" -o OUT

The imported IR (``slimgraph.frontends.onnx_import``) holds the weights as
:class:`~slimgraph.frontends.onnx_import.OnnxParamHandle` s: ``read()`` gives a weight in
its module layout (``[out, in]`` for a linear whose provenance was recovered; the node's
``attrs["w_in"]`` says which dim is the input dim either way) and ``write()`` puts it back
into the ``onnx_ir`` model (``Graph.onnx_model``), transposed storage included.
``export-onnx`` then saves that model as ``OUTDIR/model.onnx``. Each target is pruned by
the step the PyTorch path uses (:func:`slimgraph.sparsity.prune_step.prune_linear`: the
same scores, masks, SparseGPT update and permutation search), N:M along the input dim.

Calibration (wanda, ria) is block-sequential as in the PyTorch path
(``sparsity/onnx_blocks.py``): the graph is cut into one segment per decoder layer, and
layer ``k``'s targets are observed in ONNX Runtime on the outputs of the already-pruned
layers ``0..k-1``, so the masks are those of the PyTorch path on the same model. When
the graph cannot be cut (see ``onnx_blocks.plan_segments``), calibration falls back to
one run of the dense model (:func:`input_stats`) and the report says why.
SparseGPT's reconstruction (``reconstruct=true``, ``score=sparsegpt``) uses the Gram
matrices accumulated by the same segment models. Channel permutations
(``permute=mask-only|fold|space|gather``) are realised in the ONNX model
(``sparsity/onnx_permute.py``).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from slimgraph.errors import PipelineError
from slimgraph.sparsity.onnx_blocks import batches, observe
from slimgraph.sparsity.reconstruct import GramAccumulator

if TYPE_CHECKING:
    from slimgraph.sparsity.onnx_targets import Target
    from slimgraph.sparsity.options import PruneOptions

CALIBRATION = "block-sequential (ONNX Runtime, one segment model per layer)"
ONE_SHOT = "one-shot (dense activations, ONNX Runtime)"
RUN_BYTES = 1 << 30  # activations fetched from one ONNX Runtime run, at most (batch allowing)


def onnx_tokenizer(state: Any) -> Any | None:
    """The model's tokenizer (``state``: the compile state): the loaded one, else the one
    in the ONNX file's directory (as ``slimgraph eval MODEL.onnx`` finds it); cached on
    ``state.loaded``."""
    from slimgraph.frontends.loading import try_tokenizer

    if state.loaded.tokenizer is None and state.loaded.onnx_path is not None:
        state.loaded.tokenizer = try_tokenizer(Path(state.loaded.onnx_path).parent)
    return state.loaded.tokenizer


# --------------------------------------------------------------------------- calibration


def input_stats(model, targets: list[Target], windows: torch.Tensor, *, batch: int = 8,
                tmp_parent: Path | None = None) -> dict[str, GramAccumulator]:
    """Per-input-channel statistics of every target's input over ``windows`` (token ids
    ``[samples, seqlen]``), from one ONNX Runtime run of the dense ``model`` (an
    ``onnx_ir`` Model) per batch: channel norms only (``act_norm()`` is Wanda's
    ``‖X_j‖₂``), no Gram matrix.

    The inputs of the target MatMul/Gemm nodes become extra graph outputs on a copy of
    the model saved to a temporary directory (``tmp_parent`` or the system's); ``model``
    itself is left as it was.
    """
    import onnx_ir as ir

    from slimgraph.backends.ort_session import session, token_feeds

    by_name = {v.name: v for v in model.graph.inputs}
    by_name.update((o.name, o) for n in model.graph for o in n.outputs if o.name)
    wanted: dict[str, ir.Value] = {}
    for t in targets:
        for name in t.inputs:
            v = by_name.get(name)
            if v is None:
                raise PipelineError(f"calibration: the input '{name}' of {t.name} is not a value "
                                    "of the ONNX graph")
            last = v.shape[-1] if v.shape is not None and len(v.shape) else None
            if isinstance(last, int) and last != t.in_features:
                raise PipelineError(f"calibration: the input '{name}' of {t.name} has {last} "
                                    f"channels, the weight expects {t.in_features}")
            wanted[name] = v
    graph_inputs = {v.name for v in model.graph.inputs}
    extra = [v for n, v in wanted.items() if n not in graph_inputs
             and all(o is not v for o in model.graph.outputs)]
    tmp = Path(tempfile.mkdtemp(prefix=".calib-", dir=tmp_parent))
    old_types = [(v, v.type) for v in extra]
    try:
        for v in extra:
            if v.type is None:
                v.type = ir.TensorType(v.dtype or ir.DataType.FLOAT)
            model.graph.outputs.append(v)
        try:
            ir.save(model, tmp / "calib.onnx", external_data="calib.onnx.data")
        finally:
            for v in extra:
                model.graph.outputs.remove(v)
            for v, typ in old_types:
                v.type = typ
        sess = session(tmp / "calib.onnx")
        names = [n for n in wanted if n not in graph_inputs]
        accs = {n: GramAccumulator(_width(wanted[n], targets, n), hessian=False) for n in wanted}
        # the extra outputs of one run stay under RUN_BYTES (when the batch axis is free)
        per_window = 4 * windows.shape[1] * sum(_width(wanted[n], targets, n) for n in names)
        batch = max(1, min(batch, RUN_BYTES // max(per_window, 1)))
        for chunk in batches(sess, windows, batch):
            feeds = token_feeds(sess, chunk)
            outs = dict(zip(names, sess.run(names, feeds), strict=True)) if names else {}
            for name, acc in accs.items():
                observe(acc, name, np.asarray(outs[name] if name in outs else feeds[name],
                                              dtype=np.float32))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out: dict[str, GramAccumulator] = {}
    for t in targets:
        if len(t.inputs) == 1:
            out[t.name] = accs[t.inputs[0]]
            continue
        merged = out[t.name] = GramAccumulator(t.in_features, hessian=False)
        for n in t.inputs:
            merged.merge(accs[n])
    return out


def _width(value, targets: list[Target], name: str) -> int:
    """Channels of an activation (its last dim, else the in-features of its weight)."""
    last = value.shape[-1] if value.shape is not None and len(value.shape) else None
    if isinstance(last, int):
        return last
    return next(t.in_features for t in targets if name in t.inputs)


# --------------------------------------------------------------------------- pruning


def target_scores(opts: PruneOptions, t: Target, acc=None, w: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """Pruning scores of ``t``'s ``[out, in]`` weight (``w``, read when not given;
    SparseGPT ranks by magnitude; ``acc``: its input statistics)."""
    from slimgraph.sparsity.prune_step import linear_scores

    return linear_scores(opts, t.weight() if w is None else w, acc)


def gather_plans(opts: PruneOptions, result, targets: list[Target], stats: dict | None) -> dict:
    """Under ``permute=gather``, the shared permutations of ``targets`` (one layer's, or
    all of them; ``stats``: input statistics by name) -- else nothing."""
    from slimgraph.sparsity.onnx_permute import plan_gathers

    if opts.permute != "gather":
        return {}
    return plan_gathers(opts, result, targets,
                        lambda t: target_scores(opts, t, stats.get(t.name) if stats else None))


def prune_target(opts: PruneOptions, t: Target, acc=None, result=None,
                 sparsity: float | None = None, plan: tuple | None = None) -> dict:
    """Prune ``t`` (:func:`~slimgraph.sparsity.prune_step.prune_linear` on its
    :class:`~slimgraph.sparsity.onnx_permute.TargetSite`; ``acc``: its input statistics,
    a :class:`~slimgraph.sparsity.reconstruct.GramAccumulator`; ``result``: the analysis,
    for ``fold``). ``sparsity``: this layer's (a per-layer schedule), else
    ``opts.sparsity``; ``plan``: its shared permutation under ``gather``
    (:func:`gather_plans`)."""
    from slimgraph.sparsity.onnx_permute import TargetSite
    from slimgraph.sparsity.prune_step import prune_linear

    return prune_linear(opts, TargetSite(t), acc, opts.sparsity if sparsity is None else sparsity,
                        result, plan)


def prune_targets(opts: PruneOptions, result, model, targets: list[Target],
                  windows: torch.Tensor | None, sparsity: dict[str, float], *, batch: int = 8,
                  tmp_parent: Path | None = None, progress: Callable[..., None] | None = None
                  ) -> tuple[dict[str, dict], str | None, list[str]]:
    """Prune every target of the ``onnx_ir`` ``model`` (``result``: its analysis;
    ``sparsity``: a per-layer schedule's value by target name): with its calibration
    statistics over ``windows`` when the score or the reconstruction needs them
    (:func:`calibrate_and_prune`), else from the weights alone. Returns the report
    entries by target name, the calibration method (None without calibration) and the
    report's notes."""
    done: dict[str, dict] = {}
    method, notes = None, []
    if opts.needs_stats():
        method, notes = calibrate_and_prune(opts, result, model, targets, windows, done,
                                            sparsity, batch=batch, tmp_parent=tmp_parent,
                                            progress=progress)
    left = [t for t in targets if t.name not in done]
    plans = gather_plans(opts, result, left, None)
    for i, t in enumerate(targets):
        if t.name not in done:
            done[t.name] = prune_target(opts, t, None, result, sparsity.get(t.name),
                                        plans.get(t.name))
            if progress:
                progress(i + 1, len(targets), "linears")
    return done, method, notes


def calibrate_and_prune(opts: PruneOptions, result, model, targets: list[Target],
                        windows: torch.Tensor, done: dict[str, dict],
                        sparsity: dict[str, float], *, batch: int = 8,
                        tmp_parent: Path | None = None,
                        progress: Callable[..., None] | None = None) -> tuple[str, list[str]]:
    """Prune every target with its calibration statistics (reports into ``done``; a
    per-layer schedule's values in ``sparsity``): block-sequential when the graph can be
    cut into layers, else one-shot -- unless the reconstruction needs the Gram matrices
    of the pruned model's activations (then a
    :class:`~slimgraph.sparsity.onnx_blocks.SegmentError` says why it cannot run).
    Returns the method and the report's notes."""
    from slimgraph.sparsity.onnx_blocks import (SegmentError, block_sequential_onnx,
                                                plan_segments, target_layers)

    try:
        segments = plan_segments(model.graph, targets, target_layers(result, targets))
    except SegmentError as e:
        if opts.needs_hessian():
            raise SegmentError("weight reconstruction needs block-sequential calibration and "
                               f"the ONNX graph cannot be cut into layers ({e})") from None
        stats = input_stats(model, targets, windows, batch=batch, tmp_parent=tmp_parent)
        plans = gather_plans(opts, result, targets, stats)
        for t in targets:
            done[t.name] = prune_target(opts, t, stats[t.name], result, sparsity.get(t.name),
                                        plans.get(t.name))
        return ONE_SHOT, [f"calibration is one-shot on the dense model (ONNX Runtime), not "
                          f"block-sequential: the graph could not be cut into layers ({e}); "
                          "layers after the first see dense, not pruned, activations"]

    def prune_layer(segment, sums):
        plans = gather_plans(opts, result, segment.targets, sums)
        for t in segment.targets:
            done[t.name] = prune_target(opts, t, sums[t.name], result, sparsity.get(t.name),
                                        plans.get(t.name))

    block_sequential_onnx(model, segments, windows, prune_layer, hessian=opts.needs_hessian(),
                          batch=batch, tmp_parent=tmp_parent, progress=progress)
    return CALIBRATION, []


def permute_space(opts: PruneOptions, result, model, targets: list[Target],
                  windows: torch.Tensor | None, *, batch: int = 8,
                  tmp_parent: Path | None = None) -> dict:
    """``permute=space``: one permutation of the hidden space for its readers
    (:func:`~slimgraph.sparsity.onnx_permute.permute_space`), with the dense input
    statistics of the first 16 windows for Wanda / RIA. Returns the report's entry."""
    from slimgraph.sparsity import onnx_permute

    stats = input_stats(model, targets, windows[:16], batch=batch, tmp_parent=tmp_parent) \
        if opts.score in ("wanda", "ria") else None
    return onnx_permute.permute_space(opts, result, targets, stats)


# --------------------------------------------------------------------------- schedules


def layer_params(targets: list[Target], layer_of: dict[str, int], layers: list[int]
                 ) -> list[int]:
    """The weights of each layer's targets (``layer_of``: target name -> layer)."""
    return [sum(int(np.prod(t.handle.shape)) for t in targets if layer_of[t.name] == k)
            for k in layers]


def owl_ratios(model, targets: list[Target], layer_of: dict[str, int], layers: list[int],
               windows: torch.Tensor, threshold: float, *, batch: int = 8,
               tmp_parent: Path | None = None) -> list[float]:
    """OWL's outlier ratio of each layer, from the dense statistics of one ONNX Runtime
    pass (:func:`input_stats`): the dense model's block-sequential activations are its
    ordinary forward's."""
    from slimgraph.sparsity.schedules import outlier_ratio
    from slimgraph.sparsity.scores import score

    stats = input_stats(model, targets, windows, batch=batch, tmp_parent=tmp_parent)
    ratios = []
    for k in layers:
        mats = []
        for t in targets:
            if layer_of[t.name] == k:
                mats.append(score(t.weight(), "wanda", act_norm=stats[t.name].act_norm()))
        ratios.append(outlier_ratio(mats, threshold))
    return ratios
