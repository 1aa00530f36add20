"""The ONNX half of the sparsity check (``slimgraph/sparsity/check.py`` describes what is
checked): constant weights of MatMul / Gemm / Conv traced back through the ops TensorRT
looks through, named after the PyTorch parameters they came from where the exporter's
provenance says so (:class:`Names`, :func:`wrapper_prefix`).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slimgraph.errors import OnnxImportError
from slimgraph.sparsity.check_report import (LayerCheck, SparsityReport, evaluate, parse_pattern,
                                             target_fn)

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


def wrapper_prefix(fqns: set[str]) -> str:
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
        self.prefix = wrapper_prefix(self.fqns)
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
    select = target_fn(targets)
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
            report.layers.append(evaluate(layer, arr, pat, trt_dtype_ok=dtype_ok))
    if unknown:
        report.notes.append(f"{unknown} weight(s) without provenance were checked (block "
                            "membership unknown)")
    return report
