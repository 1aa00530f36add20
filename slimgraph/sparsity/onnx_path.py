"""`sparsify` on a model that exists only as an ONNX file: what its calibration needs
beyond the segment walk (the model's tokenizer, one run of the dense model) and the
permutation of the residual stream. The pass (``passes/sparsify.py``) walks the blocks
with :func:`slimgraph.sparsity.block_prune.prune_blocks`, as on a PyTorch model, on the
block observers of :mod:`slimgraph.structured.onnx_observer`.

    slimgraph compile model.onnx -p "sparsify{score=wanda,pattern=2:4},export-onnx" -o OUT

The imported IR (``slimgraph.frontends.onnx_import``) holds the weights as
:class:`~slimgraph.frontends.onnx_import.OnnxParamHandle` s: ``read()`` gives a weight in
its module layout (``[out, in]`` for a linear whose provenance was recovered; the node's
``attrs["w_in"]`` says which dim is the input dim either way) and ``write()`` puts it back
into the ``onnx_ir`` model (``Graph.onnx_model``), transposed storage included.
``export-onnx`` then saves that model as ``OUTDIR/model.onnx``. Each target is pruned by
the step the PyTorch path uses (:func:`slimgraph.sparsity.prune_step.prune_linear`: the
same scores, masks, SparseGPT update and permutation search), N:M along the input dim.

Calibration (wanda, ria) is block-sequential as on a PyTorch model
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
