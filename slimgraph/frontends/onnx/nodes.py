"""Reading ONNX nodes and values: the helpers every part of the importer shares.

Domains (``""`` and ``"ai.onnx"`` are the same), op names as the IR shows them,
attributes with defaults, ``metadata_props``, dtypes as numpy names, and the op
families (elementwise ops, activations) that both the converter table and shape
completion (:mod:`slimgraph.frontends.onnx.folding`) go by.
"""

from __future__ import annotations

import ast
from typing import Any

import numpy as np
import onnx_ir as ir

CONST_MAX_ELEMENTS = 4096  # small constants are evaluated and kept as python values


def _dtype_str(dt: ir.DataType | None) -> str | None:
    if dt is None:
        return None
    try:
        return str(np.dtype(dt.numpy()))
    except Exception:
        return dt.name.lower()


def _pylist(arr: np.ndarray) -> Any:
    return arr.item() if arr.ndim == 0 else arr.tolist()


def _meta(value_or_node) -> dict[str, str]:
    try:
        return dict(value_or_node.metadata_props)
    except Exception:
        return {}


def _parse_list(text: str | None) -> list:
    if not text:
        return []
    try:
        out = ast.literal_eval(text)
        return list(out) if isinstance(out, (list, tuple)) else []
    except (ValueError, SyntaxError):
        return []


def _domain(d: str) -> str:
    return "" if d in ("", "ai.onnx") else d


def _op_name(node: ir.Node) -> str:
    d = _domain(node.domain)
    return f"{d}.{node.op_type}" if d else node.op_type


def _attr(node: ir.Node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


def _constant_attr(node: ir.Node) -> np.ndarray | None:
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32),
                       ("value_int", np.int64), ("value_ints", np.int64)):
        a = node.attributes.get(key)
        if a is not None:
            return np.asarray(list(a.value) if isinstance(a.value, (list, tuple)) else a.value,
                              dtype=dtype)
    return None



# ops computed elementwise (with broadcasting) and activations
_EW = [
    "Add", "Sub", "Mul", "Div", "Pow", "Neg", "Sqrt", "Reciprocal", "Where", "Equal", "Not",
    "And", "Or", "Xor", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Max", "Min",
    "Abs", "Exp", "Log", "Cos", "Sin", "Tan", "Erf", "Floor", "Ceil", "Round", "Sign",
    "IsNaN", "IsInf", "Mod", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "BitwiseNot", "Clip",
    "Sum", "Mean", "Atan", "Asin", "Acos", "Sinh", "Cosh",
]
_ACT = [
    "Sigmoid", "Tanh", "Relu", "Gelu", "Elu", "LeakyRelu", "Softplus", "Softsign",
    "HardSigmoid", "HardSwish", "Mish", "Selu", "Celu", "ThresholdedRelu", "PRelu", "Swish",
]
