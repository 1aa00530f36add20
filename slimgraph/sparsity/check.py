"""Check N:M sparsity of stored weights: PyTorch models, state dicts and ONNX files.

Answers "does this model really hold 2:4 where TensorRT will look for it?" (ALGORITHMS.md
sections 1 and 6); the ``slimgraph check-sparsity`` command (:mod:`slimgraph.commands.check`)
runs it.

- :func:`check_torch` -- a module or a state dict. A ``nn.Linear`` weight ``[C_out, C_in]``
  is checked along axis 1 (its input channels); a transformers ``Conv1D`` weight
  ``[C_in, C_out]`` along axis 0. A state dict has no module types: its 2-D ``*.weight``
  tensors are taken to be ``nn.Linear`` weights.
- :func:`check_onnx` -- an ONNX file (external data included). The weights are the
  constant ``B`` of ``MatMul`` (``[K, N]``: axis 0; batched ``[..., K, N]``: axis -2),
  ``Gemm`` (axis 1 if ``transB=1`` else 0) and ``Conv`` (``W[K, C, R, S]``: axis 1,
  separately for each ``(k, r, s)``). ``Transpose`` (the axis follows its ``perm``),
  ``Cast``/``CastLike``/``Identity`` and Q/DQ nodes between the constant and its consumer
  are traced through, as TensorRT does; a weight computed from constants through anything
  else (``Reshape``, ``Concat``, ``Slice``, ``Gather``, ...) is reported as *not a
  TensorRT-visible constant*. ``B`` inputs computed from activations (attention scores)
  are not weights and are not listed. Only the main graph is walked (not ``If``/``Loop``
  bodies). Names: a weight constant-folded by the dynamo exporter is named after the
  parameter it came from (``pkg.onnxscript.optimizer.folded_from``), without the prefix
  of an export wrapper module (``model.`` of ``LogitsOnly``), so names match the PyTorch
  model's; otherwise the initializer name is used (``initializer`` always has it).
- :func:`check_model` -- what ``slimgraph check-sparsity MODEL`` checks: any
  :func:`~slimgraph.frontends.loading.load_model` spec, an ``.onnx`` file, or a compile
  output directory (``OUTDIR/hf`` and every ``OUTDIR/*.onnx``).

Targeted layers (``targets``): ``"blocks"`` (default) -- the decoder-block linears, i.e.
weights whose name has a numbered component (``layers.3.``) and is not an embedding or
``lm_head`` (:func:`slimgraph.ir.blocks.in_decoder_block`, the rule ``sparsify`` prunes
by); in an ONNX file without PyTorch provenance (hand-built, other exporters) every
constant weight is checked since blocks cannot be told apart. ``"all-linear"`` -- every
linear (2-D ``nn.Linear``/``Conv1D`` weight; every ONNX ``MatMul``/``Gemm``/``Conv``
constant weight), ``lm_head`` included; embedding tables are never linears. A callable
``name -> bool`` selects by (readable) name.

Per layer the report gives the stored shape, the reduction axis in that stored layout,
the zero fraction, N:M validity (groups of M consecutive elements along the axis with
more than N nonzeros / all groups; counted by
:func:`slimgraph.sparsity.masks.nm_violations`, so the check and the pruner agree), and
whether TensorRT can use sparse kernels for it: a visible FP32/FP16/BF16 (or Q/DQ int8/fp8)
constant, 2:4 along the axis, reduction size K and output size N multiples of 64 and
>= 256 (for ``Conv``: C and K), with the reasons when not. A layer whose reduction size
is not a multiple of M is *skipped* (reason given).

Verdict (:attr:`SparsityReport.ok`): with a pattern, True only when at least one targeted
layer was checked, none violates the pattern and none is a weight TensorRT cannot see;
skipped layers are listed but do not decide it. Without a pattern (zero fractions only),
True when there is at least one targeted layer. The CLI exits 0 when ok, 1 when not, 2 on
user errors (bad pattern, missing or corrupt file).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimgraph.ir.blocks import in_decoder_block, is_embedding_name
from slimgraph.sparsity.check_onnx import check_onnx, wrapper_prefix
from slimgraph.sparsity.check_report import (TARGETS, TRT_DIM_MULTIPLE, TRT_MIN_DIM, TRT_PATTERN,
                                             LayerCheck, SparsityCheckError, SparsityReport,
                                             evaluate, format_pattern, parse_pattern, target_fn)

__all__ = [
    "TARGETS",
    "TRT_DIM_MULTIPLE",
    "TRT_MIN_DIM",
    "TRT_PATTERN",
    "LayerCheck",
    "SparsityCheckError",
    "SparsityReport",
    "check_model",
    "check_onnx",
    "check_torch",
    "format_pattern",
    "in_decoder_block",
    "parse_pattern",
    "wrapper_prefix",
]


# --------------------------------------------------------------------------- PyTorch


def _torch_weights(obj: Any, select: Callable[[str], bool] | None, notes: list[str]
                   ) -> list[tuple[str, str, Any, int]]:
    """``[(name, op, weight, axis)]`` of the targeted linears of a module or state dict."""
    out = []
    if isinstance(obj, torch.nn.Module):
        for mname, mod in obj.named_modules():
            if isinstance(mod, torch.nn.Linear):
                op, axis = "Linear", 1
            elif type(mod).__name__ == "Conv1D":  # transformers' GPT-2 linear, weight [in, out]
                op, axis = "Conv1D", 0
            else:
                continue
            w = getattr(mod, "weight", None)
            if not isinstance(w, torch.Tensor) or w.dim() != 2:
                continue
            name = f"{mname}.weight" if mname else "weight"
            if select is None or select(name):
                out.append((name, op, w, axis))
        return out
    if isinstance(obj, Mapping):
        notes.append("state dict: every 2-D '*.weight' is taken to be an nn.Linear weight "
                     "[C_out, C_in] (reduction axis 1)")
        for name, w in obj.items():
            if isinstance(w, np.ndarray):
                w = torch.from_numpy(w)
            if not isinstance(w, torch.Tensor) or w.dim() != 2 or not str(name).endswith("weight"):
                continue
            if is_embedding_name(str(name)):
                continue
            if select is None or select(str(name)):
                out.append((str(name), "state-dict", w, 1))
        return out
    raise SparsityCheckError(f"check_torch needs an nn.Module or a state dict, got "
                             f"{type(obj).__name__}")


def check_torch(model_or_state_dict: Any, pattern: Any = None, *,
                targets: str | Callable[[str], bool] = "blocks",
                name: str | None = None) -> SparsityReport:
    """Check the targeted linear weights of a PyTorch module (or state dict, or a
    :class:`~slimgraph.frontends.loading.LoadedModel`) for an N:M ``pattern`` ("2:4",
    ``(2, 4)``, or None for zero fractions only)."""
    pat = parse_pattern(pattern)
    select = target_fn(targets)
    obj = model_or_state_dict
    if not isinstance(obj, (torch.nn.Module, Mapping)) and isinstance(
            getattr(obj, "model", None), torch.nn.Module):
        name = name or getattr(obj, "spec", None)
        obj = obj.model
    notes: list[str] = []
    label = name or (type(obj).__name__ if isinstance(obj, torch.nn.Module) else "state dict")
    report = SparsityReport("torch", str(label), pat,
                            targets if isinstance(targets, str) else "custom", [], notes)
    with torch.no_grad():
        for wname, op, w, axis in _torch_weights(obj, select, notes):
            if w.is_meta:
                raise SparsityCheckError(f"weight '{wname}' is on the meta device: the sparsity "
                                         "check needs a model loaded with weights")
            shape = list(w.shape)
            layer = LayerCheck(name=wname, op=op, shape=shape, dtype=str(w.dtype).removeprefix("torch."),
                               axis=axis, reduction_size=shape[axis], output_size=shape[1 - axis],
                               zero_fraction=0.0, status="unchecked")
            dtype_ok = w.dtype in (torch.float32, torch.float16, torch.bfloat16)
            report.layers.append(evaluate(layer, w, pat, trt_dtype_ok=dtype_ok))
    return report


# --------------------------------------------------------------------------- model specs


def check_model(spec: str, pattern: Any = None, *, targets: str = "blocks"
                ) -> list[SparsityReport]:
    """What ``slimgraph check-sparsity MODEL`` checks: an ``.onnx`` file; a compile output
    directory (``OUTDIR/hf`` with PyTorch, and every ``OUTDIR/*.onnx``); an HF model
    directory (plus any ``*.onnx`` in it); or any other ``load_model`` spec."""
    from slimgraph.frontends.loading import load_model

    pat = parse_pattern(pattern)  # fail fast, before loading anything
    target_fn(targets)
    path = Path(spec).expanduser()
    reports: list[SparsityReport] = []
    if path.is_dir():
        hf = None
        if (path / "hf" / "config.json").is_file():
            hf = path / "hf"
        elif (path / "config.json").is_file():
            hf = path
        onnx_files = sorted(p for p in path.glob("*.onnx") if p.is_file())
        if hf is None and not onnx_files:
            raise SparsityCheckError(f"directory '{spec}' has no model: expected config.json (an HF "
                                     "model), or hf/ and/or *.onnx (a compile output directory)")
        if hf is not None:
            loaded = load_model(str(hf), verbose=False)
            reports.append(check_torch(loaded.model, pat, targets=targets, name=str(hf)))
        reports.extend(check_onnx(f, pat, targets=targets) for f in onnx_files)
        return reports
    if path.is_file() and path.suffix.lower() == ".onnx":
        return [check_onnx(path, pat, targets=targets)]
    loaded = load_model(spec, verbose=False)
    if loaded.model is None:
        return [check_onnx(loaded.onnx_path, pat, targets=targets)]
    if loaded.meta:
        raise SparsityCheckError(f"'{spec}' was loaded without weights")
    return [check_torch(loaded.model, pat, targets=targets, name=spec)]
