"""Check N:M sparsity of stored weights: PyTorch models, state dicts and ONNX files.

Answers "does this model really hold 2:4 where TensorRT will look for it?" (ALGORITHMS.md
sections 1 and 6) and the ``slimgraph check-sparsity`` command.

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
``lm_head``; in an ONNX file without PyTorch provenance (hand-built, other exporters) every
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

import argparse
import ast
import json
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimgraph.errors import OnnxImportError, SlimgraphError

__all__ = [
    "LayerCheck",
    "SparsityCheckError",
    "SparsityReport",
    "add_parser",
    "check_model",
    "check_onnx",
    "check_torch",
    "cmd_check",
    "format_pattern",
    "in_decoder_block",
    "parse_pattern",
]

TRT_PATTERN = (2, 4)
TRT_MIN_DIM = 256
TRT_DIM_MULTIPLE = 64
TARGETS = ("blocks", "all-linear")

# ONNX metadata written by torch.onnx.export(dynamo=True) (see frontends/onnx/provenance.py)
_SIGNATURE_KEY = "pkg.torch.export.ExportedProgram.graph_signature"
_INPUT_KIND_KEY = "pkg.torch.export.graph_signature.InputSpec.kind"
_FOLDED_KEY = "pkg.onnxscript.optimizer.folded_from"
_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
_SIG_RE = re.compile(r"^\s*(\w+): (PARAMETER|BUFFER|CONSTANT_TENSOR)\b.*?target='([^']+)'", re.M)

# ops a weight may pass through and stay visible to TensorRT (axis unchanged), and Transpose
_AXIS_PRESERVING = {"Cast", "CastLike", "Identity", "QuantizeLinear", "DequantizeLinear",
                    "TRT_FP8QuantizeLinear", "TRT_FP8DequantizeLinear"}
_TRT_FLOAT = {"FLOAT", "FLOAT16", "BFLOAT16"}
_TRT_QUANT = {"INT8", "FLOAT8E4M3FN", "INT4"}  # stored quantized behind a DequantizeLinear
_BLOCK_RE = re.compile(r"\.\d+\.")
_NOT_LINEAR = ("embed", "lm_head", "wte", "wpe")


class SparsityCheckError(SlimgraphError):
    """A sparsity check cannot run: bad pattern, bad targets, no weights..."""


# --------------------------------------------------------------------------- pattern, targets


def parse_pattern(pattern: Any) -> tuple[int, int] | None:
    """``"N:M"`` or ``(N, M)`` -> ``(N, M)`` with ``0 < N < M``; ``None``/``"none"`` -> None.

    Same rules as :func:`slimgraph.sparsity.masks.parse_pattern` (which it calls); raises
    :class:`SparsityCheckError` instead of ValueError.
    """
    from slimgraph.sparsity.masks import parse_pattern as _parse

    if pattern is None or (isinstance(pattern, str) and pattern.strip().lower() in ("", "none")):
        return None
    try:
        return _parse(pattern)
    except ValueError as e:
        raise SparsityCheckError(str(e)) from None


def format_pattern(pattern: tuple[int, int] | None) -> str | None:
    return None if pattern is None else f"{pattern[0]}:{pattern[1]}"


def in_decoder_block(name: str) -> bool:
    """True for a weight inside a numbered block (``...layers.3.mlp.up_proj.weight``) that
    is not an embedding or ``lm_head``."""
    if not _BLOCK_RE.search("." + name):
        return False
    return not any(x in part.lower() for part in name.split(".") for x in _NOT_LINEAR)


def _is_embedding_name(name: str) -> bool:
    return any(x in part.lower() for part in name.split(".") for x in ("embed", "wte", "wpe")) \
        and "embed_out" not in name


def _target_fn(targets: str | Callable[[str], bool]) -> Callable[[str], bool] | None:
    """None means "all-linear"."""
    if callable(targets):
        return targets
    if targets == "blocks":
        return in_decoder_block
    if targets == "all-linear":
        return None
    raise SparsityCheckError(f"unknown targets {targets!r} (choose from {', '.join(TARGETS)}, "
                             "or give a callable name -> bool)")


# --------------------------------------------------------------------------- report


@dataclass
class LayerCheck:
    """One targeted weight and what was found."""

    name: str  # readable name (PyTorch parameter name, or recovered from ONNX provenance)
    op: str  # Linear | Conv1D | MatMul | Gemm | Conv | state-dict
    shape: list[int]  # stored shape
    dtype: str
    axis: int | None  # reduction axis in the stored layout (None: not determined)
    reduction_size: int | None  # K (Conv: C)
    output_size: int | None  # N (Conv: K)
    zero_fraction: float
    status: str  # holds | violates | skipped | not-visible | unchecked (no pattern)
    groups_total: int | None = None
    groups_violating: int | None = None
    trt_sparse: bool = False
    trt_reason: str | None = None  # why TensorRT would not use sparse kernels
    reason: str | None = None  # why skipped / not visible
    initializer: str | None = None  # ONNX: the stored tensor's name
    nodes: list[str] = field(default_factory=list)  # ONNX: consumer node(s)
    through: list[str] = field(default_factory=list)  # ONNX: ops traced through, consumer first

    @property
    def holds(self) -> bool | None:
        return {"holds": True, "violates": False}.get(self.status)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["holds"] = self.holds
        return d


@dataclass
class SparsityReport:
    source: str  # "torch" | "onnx"
    model: str  # what was checked (a path or a label)
    pattern: tuple[int, int] | None
    targets: str
    layers: list[LayerCheck]
    notes: list[str] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for lyr in self.layers if lyr.status == status)

    @property
    def ok(self) -> bool:
        if not self.layers:
            return False
        if self.pattern is None:
            return True
        return (self.count("holds") > 0 and self.count("violates") == 0
                and self.count("not-visible") == 0)

    def failures(self) -> list[LayerCheck]:
        if self.pattern is None:
            return []
        return [lyr for lyr in self.layers if lyr.status in ("violates", "not-visible")]

    def summary(self) -> dict[str, Any]:
        numel = sum(int(np.prod(lyr.shape)) for lyr in self.layers)
        zeros = sum(lyr.zero_fraction * int(np.prod(lyr.shape)) for lyr in self.layers)
        return {
            "layers": len(self.layers),
            "holds": self.count("holds"),
            "violates": self.count("violates"),
            "skipped": self.count("skipped"),
            "not_visible": self.count("not-visible"),
            "trt_sparse": sum(1 for lyr in self.layers if lyr.trt_sparse),
            "zero_fraction": zeros / numel if numel else 0.0,
        }

    def headline(self) -> str:
        """One line: what holds where."""
        s = self.summary()
        what = f"{self.source} {self.model}"
        if not self.layers:
            return f"{what}: no targeted layers ({self.targets})"
        zeros = f"zeros {100 * s['zero_fraction']:.1f}%"
        if self.pattern is None:
            return f"{what}: {s['layers']} layers, {zeros}"
        pat = format_pattern(self.pattern)
        extra = "".join(f", {s[k]} {label}" for k, label in
                        (("skipped", "skipped"), ("not_visible", "not TensorRT-visible"))
                        if s[k])
        return (f"{what}: {pat} holds on {s['holds']} of {s['layers']} layers{extra}; "
                f"{zeros}; TensorRT sparse kernels: {s['trt_sparse']}")

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "model": self.model,
                "pattern": format_pattern(self.pattern), "targets": self.targets,
                "ok": self.ok, "summary": self.summary(), "notes": list(self.notes),
                "layers": [lyr.to_dict() for lyr in self.layers]}


# --------------------------------------------------------------------------- evaluation


def _nonzeros(weight) -> int:
    if isinstance(weight, torch.Tensor):
        return int(torch.count_nonzero(weight.detach()))
    return int(np.count_nonzero(np.asarray(weight) != 0))


def _violations(weight, n: int, m: int, axis: int) -> tuple[int, int]:
    from slimgraph.sparsity.masks import nm_violations

    return nm_violations(weight, n, m, axis)


def _evaluate(layer: LayerCheck, weight, pattern: tuple[int, int] | None, *,
              trt_dtype_ok: bool) -> LayerCheck:
    """Fill zero fraction, N:M status and the TensorRT verdict of a visible weight."""
    numel = int(np.prod(layer.shape)) if layer.shape else 1
    layer.zero_fraction = 1.0 - _nonzeros(weight) / numel if numel else 0.0
    k, axis = layer.reduction_size, layer.axis
    assert k is not None and axis is not None
    results: dict[tuple[int, int], tuple[int, int]] = {}
    if pattern is not None:
        n, m = pattern
        if k % m:
            layer.status = "skipped"
            layer.reason = f"reduction size {k} (axis {axis}) is not a multiple of M = {m}"
        else:
            bad, total = results[pattern] = _violations(weight, n, m, axis)
            layer.groups_violating, layer.groups_total = bad, total
            layer.status = "violates" if bad else "holds"
    else:
        layer.status = "unchecked"
    why = []
    if not trt_dtype_ok:
        why.append(f"dtype {layer.dtype} (needs FP32/FP16/BF16, or INT8/FP8 through Q/DQ)")
    if k % 4:
        why.append(f"K = {k} is not a multiple of 4")
    else:
        bad, total = results.get(TRT_PATTERN) or _violations(weight, *TRT_PATTERN, axis)
        if bad:
            why.append(f"not 2:4 ({bad} of {total} groups)")
    small = [f"{label} = {v}" for label, v in (("K", k), ("N", layer.output_size))
             if v is not None and (v < TRT_MIN_DIM or v % TRT_DIM_MULTIPLE)]
    if small:
        why.append(", ".join(small) + f" (needs multiples of {TRT_DIM_MULTIPLE}, >= {TRT_MIN_DIM})")
    layer.trt_sparse = not why
    layer.trt_reason = "; ".join(why) or None
    return layer


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
            if _is_embedding_name(str(name)):
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
    select = _target_fn(targets)
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
            report.layers.append(_evaluate(layer, w, pat, trt_dtype_ok=dtype_ok))
    return report


# --------------------------------------------------------------------------- ONNX


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _meta(obj: Any) -> dict[str, str]:
    try:
        return dict(obj.metadata_props)
    except Exception:  # noqa: BLE001 - metadata is optional
        return {}


def _literal_list(text: str | None) -> list:
    if not text:
        return []
    try:
        out = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return []
    return list(out) if isinstance(out, (list, tuple)) else []


def _wrapper_prefix(fqns: set[str]) -> str:
    """``"model."`` when every parameter lives under one child of the exported root module
    (an export wrapper such as ``LogitsOnly``) and the rest does not start with a number."""
    if len(fqns) < 2 or not all("." in f for f in fqns):
        return ""
    firsts = {f.split(".", 1)[0] for f in fqns}
    if len(firsts) != 1:
        return ""
    if any(f.split(".", 1)[1].split(".", 1)[0].isdigit() for f in fqns):
        return ""
    return firsts.pop() + "."


class _Names:
    """Readable names of ONNX weights from the exporter's provenance metadata."""

    def __init__(self, model) -> None:
        text = _meta(model.graph).get(_SIGNATURE_KEY) or _meta(model).get(_SIGNATURE_KEY) or ""
        self.fqns = {m.group(3) for m in _SIG_RE.finditer(text)}
        for v in model.graph.initializers.values():
            if _meta(v).get(_INPUT_KIND_KEY):
                self.fqns.add(v.name)
        self.prefix = _wrapper_prefix(self.fqns)
        self.torch_provenance = bool(self.fqns)

    def strip(self, name: str) -> str:
        return name[len(self.prefix):] if self.prefix and name.startswith(self.prefix) else name

    def of(self, value) -> tuple[str, bool]:
        """(readable name, whether it comes from provenance)."""
        name = value.name or ""
        if name in self.fqns:
            return self.strip(name), True
        md = {**_meta(getattr(value, "const_value", None)), **_meta(value)}
        folded = [str(x) for x in _literal_list(md.get(_FOLDED_KEY))]
        if len(folded) == 1 and (folded[0] in self.fqns or (not self.fqns and "." in folded[0])):
            return self.strip(folded[0]), True
        return name, False

    def module_of(self, node) -> str | None:
        scopes = _literal_list(_meta(node).get(_SCOPES_KEY))
        return self.strip(str(scopes[-2])) if len(scopes) >= 2 and scopes[-2] else None


@dataclass
class _Found:
    value: Any  # the stored value (initializer, or a Constant's output)
    tensor: Any  # its ir tensor
    perms: list[list[int] | None]  # Transpose perms, consumer first (None: reversed)
    through: list[str]

    def stored_axis(self, axis: int) -> int:
        rank = len(self.tensor.shape)
        axis %= rank
        for perm in self.perms:  # output axis i of a Transpose is its input axis perm[i]
            axis = perm[axis] if perm is not None else rank - 1 - axis
        return axis


@dataclass
class _Hidden:
    blocker: Any  # the node TensorRT stops at
    value: Any  # the value it produces
    through: list[str]


def _const_tensor(value):
    """The ir tensor of an initializer or of a Constant node's output, else None."""
    if value.const_value is not None:
        return value.const_value
    prod = value.producer()
    if prod is not None and prod.op_type == "Constant" and prod.domain in ("", "ai.onnx"):
        attr = prod.attributes.get("value")
        if attr is not None and hasattr(attr.value, "numpy"):
            return attr.value
    return None


def _constant_values(graph) -> set[int]:
    """ids of the values computed from constants only (no graph input reaches them)."""
    const = {id(v) for v in graph.initializers.values()}
    for node in graph:
        ins = [v for v in node.inputs if v is not None]
        has_subgraph = any(getattr(a, "type", None) is not None and "GRAPH" in str(a.type)
                           for a in node.attributes.values())
        if node.op_type == "Constant" or (ins and not has_subgraph and all(id(v) in const for v in ins)):
            const.update(id(o) for o in node.outputs)
    return const


def _trace(value, const: set[int]) -> _Found | _Hidden | None:
    """Follow a weight input back through the ops TensorRT looks through."""
    perms: list[list[int] | None] = []
    through: list[str] = []
    v = value
    for _ in range(64):
        if v is None:
            return None
        tensor = _const_tensor(v)
        if tensor is not None:
            return _Found(v, tensor, perms, through)
        prod = v.producer()
        if prod is None or id(v) not in const:
            return None  # an activation, not a weight
        if prod.op_type == "Transpose":
            attr = prod.attributes.get("perm")
            perms.append([int(i) for i in attr.value] if attr is not None else None)
        elif prod.op_type not in _AXIS_PRESERVING:
            return _Hidden(prod, v, through)
        through.append(prod.op_type)
        v = prod.inputs[0]
    return None


def _largest_source(value, const: set[int]):
    """The biggest float constant a hidden weight is computed from (for its name and zeros)."""
    best, seen, stack = None, set(), [value]
    while stack:
        v = stack.pop()
        if v is None or id(v) in seen or id(v) not in const:
            continue
        seen.add(id(v))
        t = _const_tensor(v)
        if t is not None:
            if t.dtype.is_floating_point() and (best is None or t.size > best[1].size):
                best = (v, t)
            continue
        prod = v.producer()
        if prod is not None:
            stack.extend(prod.inputs)
    return best


def _weight_inputs(node) -> list[tuple[int, int, int]]:
    """``[(input index, reduction axis, output axis)]`` in the consumer's (logical) layout;
    negative axes count from the end."""
    if node.domain not in ("", "ai.onnx"):
        return []
    if node.op_type == "MatMul":
        return [(1, -2, -1)]
    if node.op_type == "Gemm":
        attr = node.attributes.get("transB")
        trans_b = bool(attr.value) if attr is not None else False
        return [(1, 1, 0) if trans_b else (1, 0, 1)]
    if node.op_type == "Conv":
        return [(1, 1, 0)]
    return []


def _load_onnx(path: str | Path):
    import onnx_ir as ir

    p = Path(path).expanduser()
    if not p.exists():
        raise OnnxImportError(f"ONNX file '{path}' does not exist")
    if p.is_dir():
        raise OnnxImportError(f"ONNX file '{path}' is a directory")
    try:
        model = ir.load(str(p))
    except Exception as e:
        raise OnnxImportError(f"cannot read ONNX file '{path}': {_one_line(e)}") from e
    if len(model.graph) == 0 and not model.opset_imports:
        raise OnnxImportError(f"'{path}' is not an ONNX model (no graph, no opset)")
    return model


def check_onnx(path: str | Path, pattern: Any = None, *,
               targets: str | Callable[[str], bool] = "blocks") -> SparsityReport:
    """Check the constant weights of an ONNX file the way TensorRT sees them."""
    pat = parse_pattern(pattern)
    select = _target_fn(targets)
    model = _load_onnx(path)
    graph = model.graph
    try:
        graph.sort()
    except Exception:  # noqa: BLE001 - an unsortable graph is walked in file order
        pass
    names = _Names(model)
    const = _constant_values(graph)
    report = SparsityReport("onnx", str(path), pat,
                            targets if isinstance(targets, str) else "custom", [])
    if not names.torch_provenance and targets == "blocks":
        report.notes.append("no PyTorch provenance in the file: every constant weight is checked "
                            "(decoder blocks cannot be told apart)")
    seen: dict[tuple[int, int], LayerCheck] = {}
    unknown = 0
    for node in graph:
        for index, logical_axis, out_axis in _weight_inputs(node):
            if index >= len(node.inputs) or node.inputs[index] is None:
                continue
            found = _trace(node.inputs[index], const)
            if found is None:
                continue
            node_label = node.name or f"{node.op_type}#{id(node)}"
            if isinstance(found, _Found):
                name, known = names.of(found.value)
                shape = [int(d) for d in found.tensor.shape]
                if len(shape) < 2:
                    continue  # a vector, not a weight matrix
            else:
                src = _largest_source(found.value, const)
                name, known = names.of(src[0]) if src else (found.value.name or node_label, False)
            module = names.module_of(node)
            if select is not None:
                if targets != "blocks" or known:
                    chosen = select(name)
                elif module is not None:
                    chosen = select(module + ".weight")
                else:
                    chosen = True
                    unknown += names.torch_provenance
                if not chosen:
                    continue
            if isinstance(found, _Hidden):
                key = (id(found.value), -1)
                if key in seen:
                    seen[key].nodes.append(node_label)
                    continue
                tensor = src[1] if src else None
                arr = tensor.numpy() if tensor is not None else None
                zero = 1.0 - np.count_nonzero(arr) / arr.size if arr is not None and arr.size else 0.0
                blocker = found.blocker
                layer = LayerCheck(
                    name=name, op=node.op_type,
                    shape=[int(d) for d in tensor.shape] if tensor is not None else [],
                    dtype=tensor.dtype.name if tensor is not None else "?", axis=None,
                    reduction_size=None, output_size=None, zero_fraction=float(zero),
                    status="not-visible", trt_sparse=False,
                    reason=f"not a TensorRT-visible constant: reached through {blocker.op_type}"
                    + (f" '{blocker.name}'" if blocker.name else ""),
                    trt_reason="not a TensorRT-visible constant",
                    initializer=src[0].name if src else None, nodes=[node_label],
                    through=found.through + [blocker.op_type])
                seen[key] = layer
                report.layers.append(layer)
                continue
            axis = found.stored_axis(logical_axis)
            key = (id(found.value), axis)
            if key in seen:
                seen[key].nodes.append(node_label)
                continue
            try:
                arr = found.tensor.numpy()
            except Exception as e:
                raise OnnxImportError(f"cannot read weight '{found.value.name}' of '{path}': "
                                      f"{_one_line(e)}") from e
            dtype = found.tensor.dtype.name
            dq = "DequantizeLinear" in found.through or "TRT_FP8DequantizeLinear" in found.through
            layer = LayerCheck(
                name=name, op=node.op_type, shape=shape, dtype=dtype, axis=axis,
                reduction_size=shape[axis], output_size=shape[found.stored_axis(out_axis)],
                zero_fraction=0.0, status="unchecked", initializer=found.value.name,
                nodes=[node_label], through=found.through)
            dtype_ok = dtype in _TRT_FLOAT or (dq and dtype in _TRT_QUANT)
            seen[key] = layer
            report.layers.append(_evaluate(layer, arr, pat, trt_dtype_ok=dtype_ok))
    if unknown:
        report.notes.append(f"{unknown} weight(s) without provenance were checked (block "
                            "membership unknown)")
    return report


# --------------------------------------------------------------------------- model specs


def check_model(spec: str, pattern: Any = None, *, targets: str = "blocks"
                ) -> list[SparsityReport]:
    """What ``slimgraph check-sparsity MODEL`` checks: an ``.onnx`` file; a compile output
    directory (``OUTDIR/hf`` with PyTorch, and every ``OUTDIR/*.onnx``); an HF model
    directory (plus any ``*.onnx`` in it); or any other ``load_model`` spec."""
    from slimgraph.frontends.loading import load_model

    pat = parse_pattern(pattern)  # fail fast, before loading anything
    _target_fn(targets)
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


# --------------------------------------------------------------------------- CLI

DESCRIPTION = """\
Check that the targeted weights of MODEL hold an N:M sparsity pattern along their
reduction axis (PyTorch Linear [C_out, C_in]: axis 1; ONNX MatMul B [K, N]: axis 0, Gemm:
axis 1 if transB else 0, Conv W[K, C, R, S]: axis 1), and whether TensorRT could use its
sparse kernels for each (2:4, a constant it can see, K and N multiples of 64 and >= 256).
Without --pattern only zero fractions are reported."""

EPILOG = """\
exit status: 0 every targeted layer holds the pattern (without --pattern: there are
targeted layers), 1 some do not (or an ONNX weight is hidden from TensorRT behind
Reshape/Concat/Slice/Gather, or no layer is targeted), 2 bad arguments or unreadable model.

examples:
  slimgraph check-sparsity out/sparse --pattern 2:4        compile OUTDIR: hf/ and *.onnx
  slimgraph check-sparsity out/sparse/model.onnx --pattern 2:4 --json
  slimgraph check-sparsity smollm2-135m                     zero fractions only

MODEL: an HF model directory, a .gguf file, a .onnx file, the alias smollm2-135m,
hf-config:PATH.json, or a compile output directory.
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``check-sparsity`` subcommand; returns its parser."""
    p = subparsers.add_parser(
        "check-sparsity",
        help="verify an N:M sparsity pattern (e.g. 2:4) in a model or ONNX file",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="model to check (see below)")
    p.add_argument("--pattern", metavar="N:M",
                   help="pattern to verify, N kept of every M (e.g. 2:4); default: report zeros only")
    p.add_argument("--all-linear", action="store_true",
                   help="check every linear weight (lm_head included), not only decoder blocks")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.set_defaults(func=cmd_check)
    return p


def _render(report: SparsityReport, console) -> None:
    from rich.table import Table

    pat = format_pattern(report.pattern)
    t = Table(title=f"{report.source}: {report.model}", title_justify="left")
    for col in ("layer", "op", "shape", "axis", "zeros", f"{pat} bad/groups" if pat else "N:M",
                "status", "TensorRT sparse"):
        t.add_column(col, justify="right" if col in ("axis", "zeros") else "left")
    for lyr in report.layers:
        groups = (f"{lyr.groups_violating}/{lyr.groups_total}" if lyr.groups_total is not None
                  else "-")
        status = lyr.status if lyr.reason is None else f"{lyr.status}: {lyr.reason}"
        t.add_row(lyr.name, lyr.op, "x".join(map(str, lyr.shape)),
                  "-" if lyr.axis is None else str(lyr.axis), f"{100 * lyr.zero_fraction:.1f}%",
                  groups, status, "yes" if lyr.trt_sparse else f"no: {lyr.trt_reason}")
    console.print(t)
    for note in report.notes:
        console.print(f"note: {note}")
    console.print(report.headline())
    fails = report.failures()
    if fails:
        shown = ", ".join(f"{f.name} ({f.groups_violating} of {f.groups_total} groups)"
                          if f.status == "violates" else f"{f.name} (not TensorRT-visible)"
                          for f in fails[:8])
        more = f" and {len(fails) - 8} more" if len(fails) > 8 else ""
        console.print(f"FAIL: {pat} does not hold on {len(fails)} layer(s): {shown}{more}")


def cmd_check(args: argparse.Namespace) -> int:
    """Handler of ``slimgraph check-sparsity``: 0 ok, 1 pattern not held (SlimgraphError: 2)."""
    pattern = parse_pattern(args.pattern)
    targets = "all-linear" if getattr(args, "all_linear", False) else "blocks"
    reports = check_model(args.model, pattern, targets=targets)
    ok = bool(reports) and all(r.ok for r in reports)
    if args.json:
        obj = {"model": args.model, "pattern": format_pattern(pattern), "targets": targets,
               "ok": ok, "reports": [r.to_dict() for r in reports]}
        json.dump(obj, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        from rich.console import Console

        out = Console(width=None if sys.stdout.isatty() else 200)
        for r in reports:
            _render(r, out)
        out.print("OK" if ok else "NOT OK")
    return 0 if ok else 1
