"""`sparsify` on a model that exists only as an ONNX file.

    slimgraph compile model.onnx -p "sparsify{score=wanda,pattern=2:4},export-onnx" -o OUT

The imported IR (``slimgraph.frontends.onnx_import``) holds the weights as
:class:`~slimgraph.frontends.onnx_import.OnnxParamHandle` s: ``read()`` gives a weight in
its module layout (``[out, in]`` for a linear whose provenance was recovered; the node's
``attrs["w_in"]`` says which dim is the input dim either way) and ``write()`` puts it back
into the ``onnx_ir`` model (``Graph.meta["onnx_model"]``), transposed storage included.
``export-onnx`` then saves that model as ``OUTDIR/model.onnx``.

Targets: the decoder-block linears (:func:`slimgraph.ir.blocks.block_linears`: ``LINEAR``
nodes whose weight is named inside a numbered block -- the rule of ``check-sparsity`` and
of the PyTorch path -- whatever the channel groups say, so a one-KV-head model's k/v and
a dynamic-axis export whose shape inference lost a projection's heads are targets too);
one that is not a stored 2-D constant is in the report's ``skipped`` with the reason.
Embeddings and ``lm_head`` are never targets. Scores and masks are those of the PyTorch
path (:func:`slimgraph.sparsity.scores.score`, ``nm_mask``, ``unstructured_mask``), N:M
along the input (reduction) dim.

Calibration (wanda, ria) is block-sequential as in the PyTorch path
(``sparsity/onnx_blocks.py``): the graph is cut into one segment per decoder layer, and
layer ``k``'s targets are observed in ONNX Runtime on the outputs of the already-pruned
layers ``0..k-1``, so the masks are those of the PyTorch path on the same model. When
the graph cannot be cut (see ``onnx_blocks.plan_segments``), calibration falls back to
one run of the dense model (:func:`input_stats`) and the report says why.
SparseGPT's reconstruction (``reconstruct=true``, ``score=sparsegpt``) uses the Gram
matrices accumulated by the same segment models. Channel permutations
(``permute=mask-only|fold|space|gather``) are realised in the ONNX model
(``sparsity/onnx_permute.py``). ``calib=self`` (sampling from the model) needs the
PyTorch model and is refused for ONNX input before any work starts.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from slimgraph.errors import PipelineError
from slimgraph.sparsity.onnx_blocks import batches, observe
from slimgraph.sparsity.reconstruct import GramAccumulator

if TYPE_CHECKING:
    from slimgraph.passes.base import CompileState
    from slimgraph.passes.sparsify import Sparsify

CALIBRATION = "block-sequential (ONNX Runtime, one segment model per layer)"
ONE_SHOT = "one-shot (dense activations, ONNX Runtime)"
RUN_BYTES = 1 << 30  # activations fetched from one ONNX Runtime run, at most (batch allowing)


def calib_source(opts: Sparsify, state: CompileState) -> str:
    return str(opts.calib or state.calib.get("file") or "self")


def check_onnx_input(opts: Sparsify, state: CompileState) -> None:
    """Refuse what only the PyTorch path supports, naming the option (``requires``)."""
    if state.graph is None or state.graph.meta.get("onnx_model") is None:
        raise PipelineError(f"pass '{opts.name}': the ONNX model is not loaded")
    if opts.schedule_name() != "uniform":
        from slimgraph.sparsity.onnx_blocks import SegmentError, target_layers

        targets, _ = find_targets(state.analysis())
        try:
            layers = target_layers(state.analysis(), targets)
        except SegmentError as e:
            raise opts.option_error("schedule", f"per-layer schedules need the layer of every "
                                    f"pruned linear: {e}") from None
        if opts.schedule_name() == "explicit":
            opts.check_layer_count(len(set(layers.values())))
    if opts.needs_data():
        if calib_source(opts, state) == "self":
            raise opts.option_error("calib", f"score '{opts.score}' needs calibration data; "
                                    "'self' (text sampled from the model) needs the PyTorch "
                                    "model: give a calibration file (calib=PATH or --calib-file)")
        if onnx_tokenizer(state) is None:
            raise PipelineError(f"pass '{opts.name}': score '{opts.score}' needs calibration "
                                f"data and there is no tokenizer next to "
                                f"{state.loaded.onnx_path}")


def onnx_tokenizer(state: CompileState) -> Any | None:
    """The model's tokenizer: the loaded one, else the one in the ONNX file's directory
    (as ``slimgraph eval MODEL.onnx`` finds it); cached on ``state.loaded``."""
    from slimgraph.frontends.loading import try_tokenizer

    if state.loaded.tokenizer is None and state.loaded.onnx_path is not None:
        state.loaded.tokenizer = try_tokenizer(Path(state.loaded.onnx_path).parent)
    return state.loaded.tokenizer


# --------------------------------------------------------------------------- targets


@dataclass
class Target:
    """One weight to prune: its IR parameter, input dim, and the ONNX activations
    (value names) that feed it, one per LINEAR use."""

    name: str
    handle: Any  # OnnxParamHandle
    w_in: int
    inputs: list[str] = field(default_factory=list)
    in_features: int = 0
    label: str = ""  # for reports: the module name, without an export wrapper's prefix
    layer: int = -1  # its decoder block


def find_targets(result) -> tuple[list[Target], list[dict]]:
    """The decoder-block linears of an imported ONNX graph
    (:func:`slimgraph.ir.blocks.block_linears`), in graph order, and the report entries
    (``skipped``: why) of block linears that cannot be targeted."""
    from slimgraph.frontends.onnx_import import OnnxParamHandle
    from slimgraph.ir.blocks import block_linears
    from slimgraph.ir.graph import OpKind
    from slimgraph.sparsity.block_prune import skipped as skip_entry
    from slimgraph.sparsity.check_onnx import wrapper_prefix

    layer = {lin.weight: lin.layer for lin in block_linears(result.graph)}
    targets: dict[str, Target] = {}
    skipped: dict[str, str] = {}
    for node in result.graph.nodes:
        if node.kind is not OpKind.LINEAR:
            continue
        w = node.inputs[1]
        if w is None or w.name not in layer:
            continue
        handle = w.param
        if not isinstance(handle, OnnxParamHandle) or not handle.targets or w.rank != 2:
            skipped[w.name] = "not a stored 2-D constant weight"
            continue
        w_in = int(node.attrs["w_in"])
        t = targets.setdefault(w.name, Target(w.name, handle, w_in,
                                              in_features=int(handle.shape[w_in]),
                                              layer=layer[w.name]))
        if t.w_in != w_in:
            skipped[w.name] = "used with different input dims by different nodes"
            continue
        x = node.inputs[0]
        if x is not None and x.name not in t.inputs:
            t.inputs.append(x.name)
    for name in skipped:
        targets.pop(name, None)
    prefix = wrapper_prefix({n for n in result.graph.params if "." in n})

    def label(name: str) -> str:
        return name.removeprefix(prefix).removesuffix(".weight")

    for t in targets.values():
        t.label = label(t.name)
    def numel(name: str) -> int:
        shape = getattr(result.graph.params.get(name), "shape", None) or ()
        return int(np.prod(shape)) if all(isinstance(d, int) for d in shape) else 0

    return list(targets.values()), [skip_entry(label(n), why, numel(n))
                                    for n, why in skipped.items()]


def claimed_weights(state: CompileState) -> tuple[list[str], Callable[[str], torch.Tensor]]:
    """The ONNX path's block linears (report labels) and a reader of a target's stored
    weight as ``[out, in]`` (``sparsify``'s ``ensures``)."""
    targets, skipped = find_targets(state.analysis())
    by_label = {t.label or t.name: t for t in targets}

    def weight_of(label: str) -> torch.Tensor:
        t = by_label[label]
        raw = t.handle.read()
        return raw if t.w_in == 1 else raw.T

    return [*by_label, *(r["name"] for r in skipped)], weight_of


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


def target_scores(opts: Sparsify, t: Target, acc=None, w: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """Pruning scores of ``t``'s ``[out, in]`` weight (``w``, read when not given;
    SparseGPT ranks by magnitude; ``acc``: its input statistics)."""
    from slimgraph.sparsity.scores import score

    if w is None:
        raw = t.handle.read().float()
        w = raw if t.w_in == 1 else raw.T
    return score(w,
                 "magnitude" if opts.score == "sparsegpt" else opts.score,
                 act_norm=acc.act_norm() if acc is not None else None, a=opts.a)


def gather_plans(opts: Sparsify, result, targets: list[Target], stats: dict | None) -> dict:
    """Under ``permute=gather``, the shared permutations of ``targets`` (one layer's, or
    all of them; ``stats``: input statistics by name) -- else nothing."""
    from slimgraph.sparsity.onnx_permute import plan_gathers

    if opts.permute != "gather":
        return {}
    return plan_gathers(opts, result, targets,
                        lambda t: target_scores(opts, t, stats.get(t.name) if stats else None))


def prune_target(opts: Sparsify, t: Target, acc=None, result=None,
                 sparsity: float | None = None, plan: tuple | None = None) -> dict:
    """Score ``t``'s weight (``[out, in]``), permute its input channels when
    ``opts.permute`` says so (``onnx_permute``; ``result``: the analysis, for ``fold``),
    prune it (:func:`~slimgraph.sparsity.block_prune.masked_weight`: masks, or SparseGPT's
    update with the Hessian of ``acc``, a
    :class:`~slimgraph.sparsity.reconstruct.GramAccumulator`), write it back through its
    handle. ``sparsity``: this layer's (a per-layer schedule), else ``opts.sparsity``;
    ``plan``: its shared permutation under ``gather`` (:func:`gather_plans`)."""
    from slimgraph.sparsity.block_prune import masked_weight, skip_reason, skipped
    from slimgraph.sparsity.onnx_permute import permute_target

    raw = t.handle.read().float()
    w = raw if t.w_in == 1 else raw.T  # [out, in]
    label = t.label or t.name
    nm = opts.nm()
    why = skip_reason(opts, w.shape[1])
    if why is not None:
        return skipped(label, why, w.numel())
    act = acc.act_norm() if acc is not None else None
    hess = acc.hessian() if acc is not None and opts.needs_hessian() else None
    s = target_scores(opts, t, acc, w)
    fixed, perm_info = None, None
    if opts.permute != "none":
        w, s, act, hess, fixed, perm_info = permute_target(opts, result, t, w, s, act, hess, nm,
                                                           plan)
    new = masked_weight(opts, w, s, hess, opts.sparsity if sparsity is None else sparsity, fixed)
    t.handle.write((new if t.w_in == 1 else new.T).contiguous())
    zeros = int((t.handle.read() == 0).sum())
    out = {"name": label, "shape": list(w.shape), "numel": w.numel(), "zeros": zeros,
           "sparsity": round(zeros / w.numel(), 6)}
    if perm_info is not None:
        out["permutation"] = perm_info
    return out


def sparsify_onnx(opts: Sparsify, state: CompileState):
    """The ``sparsify`` pass on ONNX input (``Sparsify.run`` hands over here)."""
    from slimgraph.passes.base import PassResult
    from slimgraph.sparsity.calibration import calibration_tokens, sample_windows

    targets, untargeted = find_targets(state.analysis())
    if not targets:
        raise PipelineError(f"pass '{opts.name}': no decoder-block linear with a stored weight "
                            "was found in the ONNX model"
                            + (f" ({untargeted[0]['name']}: {untargeted[0]['skipped']})"
                               if untargeted else ""))
    samples = opts.samples or state.calib.get("samples", 64)
    seqlen = opts.seqlen or state.calib.get("seqlen", 512)
    source = calib_source(opts, state)
    method, notes = None, []
    done: dict[str, dict] = {}
    windows = None
    if opts.needs_data():
        tokens = calibration_tokens(onnx_tokenizer(state), source, None, seqlen=seqlen,
                                    samples=samples, seed=opts.seed)
        windows = sample_windows(tokens, samples, seqlen, opts.seed)
    plan, layer_of = None, {}
    if opts.pattern is None and opts.schedule_name() != "uniform":
        plan, layer_of = schedule_plan(opts, state, targets, windows)
    sparsity = {t.name: plan["by_layer"][layer_of[t.name]] for t in targets} if plan else {}
    space_info = None
    if opts.permute == "space":
        from slimgraph.sparsity.onnx_permute import permute_space

        stats = input_stats(state.graph.meta["onnx_model"], targets, windows[:16],
                            batch=opts.batch, tmp_parent=state.out_dir) \
            if opts.score in ("wanda", "ria") else None
        space_info = permute_space(opts, state.analysis(), targets, stats)
    if opts.needs_stats():
        method, notes = calibrate_and_prune(opts, state, targets, windows, done, sparsity)
    left = [t for t in targets if t.name not in done]
    plans = gather_plans(opts, state.analysis(), left, None)
    for i, t in enumerate(targets):
        if t.name not in done:
            done[t.name] = prune_target(opts, t, None, state.analysis(), sparsity.get(t.name),
                                        plans.get(t.name))
            if state.progress:
                state.progress(i + 1, len(targets), "linears")
    layers = [done[t.name] for t in targets] + untargeted
    skipped = [r for r in layers if r.get("skipped")]
    pruned = [r for r in layers if not r.get("skipped")]
    if not pruned:
        raise PipelineError(f"pass '{opts.name}': no linear layer could be pruned "
                            f"({skipped[0]['skipped']})")
    state.graph.meta["onnx_modified"] = True
    total = sum(r["numel"] for r in pruned)
    zeros = sum(r["zeros"] for r in pruned)
    data = opts.needs_data()
    report = {"score": opts.score, "pattern": opts.pattern, "sparsity_target": opts.sparsity,
              "reconstruct": opts.reconstruct, "input": "onnx",
              "calibration": {"method": method,
                              "source": source if data else None,
                              "samples": samples if data else 0, "seqlen": seqlen},
              "layers": layers,
              "skipped": [f"{r['name']}: {r['skipped']}" for r in skipped],
              "sparsity": zeros / total, "notes": notes}
    if opts.permute != "none":
        report["permutation"] = opts.permutation_summary(pruned)
        if space_info is not None:
            report["permutation"]["space"] = space_info
    if plan is not None:
        by_layer: dict[int, list[dict]] = {}
        for t in targets:
            by_layer.setdefault(layer_of[t.name], []).append(done[t.name])
        report["sparsity_target"] = plan["target"]
        report["schedule"] = opts.schedule_report(plan, [{"layer": k, "layers": v}
                                                         for k, v in by_layer.items()])
    return PassResult(True, report)


def schedule_plan(opts: Sparsify, state: CompileState, targets: list[Target],
                  windows: torch.Tensor | None) -> tuple[dict, dict[str, int]]:
    """The per-layer sparsity plan (``Sparsify.schedule_plan``) over the targets' layers,
    and each target's layer. OWL's outlier ratios come from the dense statistics of one
    ONNX Runtime pass (:func:`input_stats`): the dense model's block-sequential
    activations are its ordinary forward's."""
    from slimgraph.sparsity.onnx_blocks import target_layers
    from slimgraph.sparsity.schedules import outlier_ratio
    from slimgraph.sparsity.scores import score

    layer_of = target_layers(state.analysis(), targets)
    layers = sorted(set(layer_of.values()))
    params = [sum(int(np.prod(t.handle.shape)) for t in targets if layer_of[t.name] == k)
              for k in layers]

    def owl_ratios() -> list[float]:
        stats = input_stats(state.graph.meta["onnx_model"], targets, windows, batch=opts.batch,
                            tmp_parent=state.out_dir)
        ratios = []
        for k in layers:
            mats = []
            for t in targets:
                if layer_of[t.name] == k:
                    raw = t.handle.read().float()
                    mats.append(score(raw if t.w_in == 1 else raw.T, "wanda",
                                      act_norm=stats[t.name].act_norm()))
            ratios.append(outlier_ratio(mats, opts.owl_threshold()))
        return ratios

    return opts.schedule_plan(layers, params, owl_ratios), layer_of


def calibrate_and_prune(opts: Sparsify, state: CompileState, targets: list[Target],
                        windows: torch.Tensor, done: dict[str, dict],
                        sparsity: dict[str, float]) -> tuple[str, list[str]]:
    """Prune every target with its calibration statistics (reports into ``done``; a
    per-layer schedule's values in ``sparsity``): block-sequential when the graph can be
    cut into layers, else one-shot. Returns the method and the report's notes."""
    from slimgraph.sparsity.onnx_blocks import (SegmentError, block_sequential_onnx,
                                                plan_segments, target_layers)

    model = state.graph.meta["onnx_model"]
    try:
        segments = plan_segments(model.graph, targets, target_layers(state.analysis(), targets))
    except SegmentError as e:
        if opts.needs_hessian():
            raise PipelineError(f"pass '{opts.name}': weight reconstruction needs block-"
                                f"sequential calibration and the ONNX graph cannot be cut into "
                                f"layers ({e})") from None
        stats = input_stats(model, targets, windows, batch=opts.batch, tmp_parent=state.out_dir)
        plans = gather_plans(opts, state.analysis(), targets, stats)
        for t in targets:
            done[t.name] = prune_target(opts, t, stats[t.name], state.analysis(),
                                       sparsity.get(t.name), plans.get(t.name))
        return ONE_SHOT, [f"calibration is one-shot on the dense model (ONNX Runtime), not "
                          f"block-sequential: the graph could not be cut into layers ({e}); "
                          "layers after the first see dense, not pruned, activations"]

    def prune_layer(segment, sums):
        plans = gather_plans(opts, state.analysis(), segment.targets, sums)
        for t in segment.targets:
            done[t.name] = prune_target(opts, t, sums[t.name], state.analysis(),
                                        sparsity.get(t.name), plans.get(t.name))

    block_sequential_onnx(model, segments, windows, prune_layer, hessian=opts.needs_hessian(),
                          batch=opts.batch,
                          tmp_parent=state.out_dir, progress=state.progress)
    return CALIBRATION, []
