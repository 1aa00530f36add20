"""`sparsify` on a model that exists only as an ONNX file.

    slimgraph compile model.onnx -p "sparsify{score=wanda,pattern=2:4},export-onnx" -o OUT

The imported IR (``slimgraph.frontends.onnx_import``) holds the weights as
:class:`~slimgraph.frontends.onnx_import.OnnxParamHandle` s: ``read()`` gives a weight in
its module layout (``[out, in]`` for a linear whose provenance was recovered; the node's
``attrs["w_in"]`` says which dim is the input dim either way) and ``write()`` puts it back
into the ``onnx_ir`` model (``Graph.meta["onnx_model"]``), transposed storage included.
``export-onnx`` then saves that model as ``OUTDIR/model.onnx``.

Targets: the decoder-block linears -- ``LINEAR`` nodes whose weight is a stored constant
that is a member of a per-layer ``heads``/``mlp`` group of the analysis (what the
PyTorch path prunes) or whose name places it in a numbered block (the rule of
``check-sparsity``; a dynamic-axis export can hide a projection's heads from the analysis
when shape inference loses a dim, so the group test alone would miss it). Embeddings and
``lm_head`` are never targets. Scores and masks are those of the PyTorch path
(:func:`slimgraph.sparsity.scores.score`, ``nm_mask``, ``unstructured_mask``), N:M along
the input (reduction) dim.

Calibration (wanda, ria) is block-sequential as in the PyTorch path
(``sparsity/onnx_blocks.py``): the graph is cut into one segment per decoder layer, and
layer ``k``'s targets are observed in ONNX Runtime on the outputs of the already-pruned
layers ``0..k-1``, so the masks are those of the PyTorch path on the same model. When
the graph cannot be cut (see ``onnx_blocks.plan_segments``), calibration falls back to
one run of the dense model (:func:`input_sumsq`) and the report says why.
Channel permutations (``permute=mask-only|fold|gather``) are realised in the ONNX model
(``sparsity/onnx_permute.py``). Reconstruction (``reconstruct=true``,
``score=sparsegpt``), ``permute=space`` and ``calib=self`` (sampling from the model) need
the PyTorch model and are refused for ONNX input before any work starts.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from slimgraph.errors import PipelineError

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
    if opts.reconstruct:
        raise opts.option_error("reconstruct", "weight reconstruction needs the PyTorch model; "
                                "it is not supported for ONNX input (use reconstruct=false)")
    if opts.score == "sparsegpt":
        raise opts.option_error("score", "'sparsegpt' reconstructs weights and needs the PyTorch "
                                "model; for ONNX input use magnitude, wanda, ri or ria")
    if opts.permute == "space":
        raise opts.option_error("permute", "permute=space (one permutation of the residual "
                                "stream) needs the PyTorch model; it is not supported for ONNX "
                                "input (use fold, gather or mask-only)")
    if state.graph is None or state.graph.meta.get("onnx_model") is None:
        raise PipelineError(f"pass '{opts.name}': the ONNX model is not loaded")
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
    from slimgraph.frontends.loading import _try_tokenizer

    if state.loaded.tokenizer is None and state.loaded.onnx_path is not None:
        state.loaded.tokenizer = _try_tokenizer(Path(state.loaded.onnx_path).parent)
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


def find_targets(result) -> tuple[list[Target], list[str]]:
    """The decoder-block linears of an imported ONNX graph (see the module docstring),
    in graph order, and ``"name: why"`` for block weights that cannot be targeted."""
    from slimgraph.frontends.onnx_import import OnnxParamHandle
    from slimgraph.ir.graph import OpKind
    from slimgraph.sparsity.check import _wrapper_prefix, in_decoder_block

    in_groups = {m.param for g in result.groups if g.layer is not None
                 and g.kind in ("heads", "mlp") for m in g.members}
    targets: dict[str, Target] = {}
    skipped: dict[str, str] = {}
    for node in result.graph.nodes:
        if node.kind is not OpKind.LINEAR:
            continue
        w = node.inputs[1]
        if w is None or w.param is None:
            continue
        if w.name not in in_groups and not in_decoder_block(w.name):
            continue
        handle = w.param
        if not isinstance(handle, OnnxParamHandle) or not handle.targets or w.rank != 2:
            skipped[w.name] = "not a stored 2-D constant weight"
            continue
        w_in = int(node.attrs["w_in"])
        t = targets.setdefault(w.name, Target(w.name, handle, w_in,
                                              in_features=int(handle.shape[w_in])))
        if t.w_in != w_in:
            skipped[w.name] = "used with different input dims by different nodes"
            continue
        x = node.inputs[0]
        if x is not None and x.name not in t.inputs:
            t.inputs.append(x.name)
    for name in skipped:
        targets.pop(name, None)
    prefix = _wrapper_prefix({n for n in result.graph.params if "." in n})
    for t in targets.values():
        label = t.name.removeprefix(prefix)
        t.label = label.removesuffix(".weight")
    return list(targets.values()), [f"{n}: {why}" for n, why in skipped.items()]


# --------------------------------------------------------------------------- calibration


def input_sumsq(model, targets: list[Target], windows: torch.Tensor, *, batch: int = 8,
                tmp_parent: Path | None = None) -> dict[str, torch.Tensor]:
    """Per-input-channel sum of squares (float64 ``[C_in]``) of every target's input over
    ``windows`` (token ids ``[samples, seqlen]``), from one ONNX Runtime run of the dense
    ``model`` (an ``onnx_ir`` Model) per batch; ``sqrt`` of it is Wanda's ``‖X_j‖₂``.

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
        sums: dict[str, np.ndarray] = {}
        # the extra outputs of one run stay under RUN_BYTES (when the batch axis is free)
        per_window = 4 * windows.shape[1] * sum(_width(wanted[n], targets, n) for n in names)
        batch = max(1, min(batch, RUN_BYTES // max(per_window, 1)))
        for chunk in _batches(sess, windows, batch):
            feeds = token_feeds(sess, chunk)
            outs = dict(zip(names, sess.run(names, feeds), strict=True)) if names else {}
            for name in wanted:
                arr = outs[name] if name in outs else feeds[name]
                x = np.asarray(arr, dtype=np.float64).reshape(-1, arr.shape[-1])
                sums[name] = sums.get(name, 0.0) + np.einsum("ij,ij->j", x, x)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out: dict[str, torch.Tensor] = {}
    for t in targets:
        parts = [sums[n] for n in t.inputs]
        total = np.sum(parts, axis=0)
        if total.shape != (t.in_features,):
            raise PipelineError(f"calibration: the inputs of {t.name} have {total.shape[0]} "
                                f"channels, the weight expects {t.in_features}")
        out[t.name] = torch.from_numpy(total)
    return out


def _width(value, targets: list[Target], name: str) -> int:
    """Channels of an activation (its last dim, else the in-features of its weight)."""
    last = value.shape[-1] if value.shape is not None and len(value.shape) else None
    if isinstance(last, int):
        return last
    return next(t.in_features for t in targets if name in t.inputs)


def _batches(sess, windows: torch.Tensor, batch: int):
    """Windows in batches the model's token input accepts (fixed axes are respected)."""
    ids_in = next((i for i in sess.get_inputs() if "input_ids" in i.name), sess.get_inputs()[0])
    shape = list(ids_in.shape) if ids_in.shape is not None else []
    n, seqlen = windows.shape
    if len(shape) != 2:
        raise PipelineError(f"calibration: the ONNX input '{ids_in.name}' has shape {shape}, "
                            "not [batch, sequence] token ids")
    if isinstance(shape[1], int) and shape[1] != seqlen:
        raise PipelineError(f"calibration: the ONNX input '{ids_in.name}' has a fixed length of "
                            f"{shape[1]} tokens; set seqlen={shape[1]} (or --calib-seqlen)")
    if isinstance(shape[0], int):
        if n % shape[0]:
            raise PipelineError(f"calibration: the ONNX input '{ids_in.name}' has a fixed batch "
                                f"of {shape[0]}; use a multiple of it as samples ({n} given)")
        batch = shape[0]
    ids = windows.numpy()
    for i in range(0, n, batch):
        yield ids[i : i + batch]


# --------------------------------------------------------------------------- pruning


def prune_target(opts: Sparsify, t: Target, sumsq: torch.Tensor | None, result=None) -> dict:
    """Score ``t``'s weight (``[out, in]``), permute its input channels when
    ``opts.permute`` says so (``onnx_permute``; ``result``: the analysis, for ``fold``),
    mask it, write it back through its handle."""
    from slimgraph.sparsity.masks import nm_mask, unstructured_mask
    from slimgraph.sparsity.onnx_permute import permute_target
    from slimgraph.sparsity.scores import score

    raw = t.handle.read().float()
    w = raw if t.w_in == 1 else raw.T  # [out, in]
    label = t.label or t.name
    nm = opts.nm()
    if nm is not None and w.shape[1] % nm[1]:
        return {"name": label, "skipped": f"input size {w.shape[1]} is not divisible by {nm[1]}",
                "numel": w.numel(), "zeros": 0}
    act = sumsq.sqrt().float() if sumsq is not None else None
    s = score(w, opts.score, act_norm=act, a=opts.a)
    keep, perm_info = None, None
    if opts.permute != "none":
        w, s, act, keep, perm_info = permute_target(opts, result, t, w, s, act, nm)
    if keep is not None:
        pass  # mask-only: chosen in permuted order, in the stored order
    elif nm is not None:
        keep = nm_mask(s, *nm)
    else:
        keep = unstructured_mask(s, opts.sparsity, opts.scope or ("row" if opts.score == "wanda"
                                                                   else "layer"))
    new = w * keep
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

    targets, skipped_names = find_targets(state.analysis())
    if not targets:
        raise PipelineError(f"pass '{opts.name}': no decoder-block linear with a stored weight "
                            "was found in the ONNX model"
                            + (f" ({skipped_names[0]})" if skipped_names else ""))
    samples = opts.samples or state.calib.get("samples", 64)
    seqlen = opts.seqlen or state.calib.get("seqlen", 512)
    source = calib_source(opts, state)
    method, notes = None, []
    done: dict[str, dict] = {}
    if opts.needs_data():
        tokens = calibration_tokens(onnx_tokenizer(state), source, None, seqlen=seqlen,
                                    samples=samples, seed=opts.seed)
        windows = sample_windows(tokens, samples, seqlen, opts.seed)
        method, notes = calibrate_and_prune(opts, state, targets, windows, done)
    for i, t in enumerate(targets):
        if t.name not in done:
            done[t.name] = prune_target(opts, t, None, state.analysis())
            if state.progress:
                state.progress(i + 1, len(targets), "linears")
    layers = [done[t.name] for t in targets]
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
              "reconstruct": False, "input": "onnx",
              "calibration": {"method": method,
                              "source": source if data else None,
                              "samples": samples if data else 0, "seqlen": seqlen},
              "layers": layers,
              "skipped": [f"{r['name']}: {r['skipped']}" for r in skipped] + skipped_names,
              "sparsity": zeros / total, "notes": notes}
    if opts.permute != "none":
        report["permutation"] = opts.permutation_summary(pruned)
    return PassResult(True, report)


def calibrate_and_prune(opts: Sparsify, state: CompileState, targets: list[Target],
                        windows: torch.Tensor, done: dict[str, dict]) -> tuple[str, list[str]]:
    """Prune every target with its calibration statistics (reports into ``done``):
    block-sequential when the graph can be cut into layers, else one-shot. Returns the
    method and the report's notes."""
    from slimgraph.sparsity.onnx_blocks import (SegmentError, block_sequential_onnx,
                                                plan_segments, target_layers)

    model = state.graph.meta["onnx_model"]
    try:
        segments = plan_segments(model.graph, targets, target_layers(state.analysis(), targets))
    except SegmentError as e:
        sumsq = input_sumsq(model, targets, windows, batch=opts.batch, tmp_parent=state.out_dir)
        for t in targets:
            done[t.name] = prune_target(opts, t, sumsq[t.name], state.analysis())
        return ONE_SHOT, [f"calibration is one-shot on the dense model (ONNX Runtime), not "
                          f"block-sequential: the graph could not be cut into layers ({e}); "
                          "layers after the first see dense, not pruned, activations"]

    def prune_layer(segment, sums):
        for t in segment.targets:
            done[t.name] = prune_target(opts, t, sums[t.name], state.analysis())

    block_sequential_onnx(model, segments, windows, prune_layer, batch=opts.batch,
                          tmp_parent=state.out_dir, progress=state.progress)
    return CALIBRATION, []
