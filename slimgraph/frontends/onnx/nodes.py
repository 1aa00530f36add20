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


def dtype_name(dt: ir.DataType | None) -> str | None:
    """The numpy name of an ONNX dtype (``"float32"``), as IR values carry it."""
    if dt is None:
        return None
    try:
        return str(np.dtype(dt.numpy()))
    except Exception:
        return dt.name.lower()


def as_python(arr: np.ndarray) -> Any:
    """A small constant as the python value ``Value.const`` holds (a scalar or nested lists)."""
    return arr.item() if arr.ndim == 0 else arr.tolist()


def metadata_of(value_or_node) -> dict[str, str]:
    """The ``metadata_props`` of a value, node, graph or model (``{}`` where it has none)."""
    try:
        return dict(value_or_node.metadata_props)
    except Exception:
        return {}


def parse_list_literal(text: str | None) -> list:
    """A python list literal stored as metadata text (``[]`` where it is not one)."""
    if not text:
        return []
    try:
        out = ast.literal_eval(text)
        return list(out) if isinstance(out, (list, tuple)) else []
    except (ValueError, SyntaxError):
        return []


def normalized_domain(d: str) -> str:
    """The domain of an op, with ``"ai.onnx"`` written ``""`` (the default domain)."""
    return "" if d in ("", "ai.onnx") else d


def ir_op_name(node: ir.Node) -> str:
    """The op name an IR node shows: ``op_type``, prefixed by its domain if not the default."""
    d = normalized_domain(node.domain)
    return f"{d}.{node.op_type}" if d else node.op_type


def attr_value(node: ir.Node, name: str, default=None):
    """The value of attribute ``name`` of ``node``, ``default`` where it is not set."""
    a = node.attributes.get(name)
    return default if a is None else a.value


def constant_attr_value(node: ir.Node) -> np.ndarray | None:
    """The value of a ``Constant`` node given as ``value_float(s)`` / ``value_int(s)``."""
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32),
                       ("value_int", np.int64), ("value_ints", np.int64)):
        a = node.attributes.get(key)
        if a is not None:
            return np.asarray(list(a.value) if isinstance(a.value, (list, tuple)) else a.value,
                              dtype=dtype)
    return None



# ops computed elementwise (with broadcasting) and activations
ELEMENTWISE_OPS = [
    "Add", "Sub", "Mul", "Div", "Pow", "Neg", "Sqrt", "Reciprocal", "Where", "Equal", "Not",
    "And", "Or", "Xor", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Max", "Min",
    "Abs", "Exp", "Log", "Cos", "Sin", "Tan", "Erf", "Floor", "Ceil", "Round", "Sign",
    "IsNaN", "IsInf", "Mod", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "BitwiseNot", "Clip",
    "Sum", "Mean", "Atan", "Asin", "Acos", "Sinh", "Cosh",
]
ACTIVATION_OPS = [
    "Sigmoid", "Tanh", "Relu", "Gelu", "Elu", "LeakyRelu", "Softplus", "Softsign",
    "HardSigmoid", "HardSwish", "Mish", "Selu", "Celu", "ThresholdedRelu", "PRelu", "Swish",
]
