"""The converter table: which converter translates which ONNX op.

``CONVERTERS`` is keyed by ``(domain, op_type)`` (the default domain is ``""``); an op
without an entry becomes ``OpKind.UNKNOWN`` (a barrier). The converters live in
:mod:`slimgraph.frontends.onnx.standard_ops` and, for ONNX Runtime's fused ops,
:mod:`slimgraph.frontends.onnx.contrib_ops`.
"""

from __future__ import annotations

from typing import Callable

from slimgraph.frontends.onnx.context import Converted, _Ctx
from slimgraph.frontends.onnx.contrib_ops import (
    _bias_gelu, _embed_layer_norm, _gqa, _mha, _ms_attention, _skip_norm,
)
from slimgraph.frontends.onnx.nodes import _ACT, _EW
from slimgraph.frontends.onnx.standard_ops import (
    _all, _arg_reduction, _attention, _concat, _dropout, _first, _gather, _gemm, _matmul, _norm,
    _reduction, _rotary, _slice, _softmax, _split, _transpose, _with_const,
)
from slimgraph.ir.graph import OpKind

_MS_ACT = ["QuickGelu", "Gelu"]
_ID = ["Cast", "Identity", "CastLike"]
_RESHAPE = ["Flatten"]
_SOURCE = ["Constant", "ConstantOfShape", "Range", "RandomNormal", "RandomUniform",
           "RandomNormalLike", "RandomUniformLike", "EyeLike"]
_NOOP = ["Shape", "Size"]

CONVERTERS: dict[tuple[str, str], Callable[[_Ctx], Converted]] = {
    ("", "MatMul"): _matmul,
    ("", "Gemm"): _gemm,
    ("", "LayerNormalization"): _norm("layer", 2),
    ("", "SimplifiedLayerNormalization"): _norm("rms", 1),
    ("com.microsoft", "SimplifiedLayerNormalization"): _norm("rms", 1),
    ("", "RMSNormalization"): _norm("rms", 1),
    ("", "ReduceMean"): _reduction("mean"),
    ("", "ReduceSum"): _reduction("sum"),
    ("", "ReduceMax"): _reduction("max"),
    ("", "ReduceMin"): _reduction("min"),
    ("", "ReduceProd"): _reduction("prod"),
    ("", "ReduceL2"): _reduction("l2"),
    ("", "ReduceL1"): _reduction("l1"),
    ("", "ReduceSumSquare"): _reduction("sumsquare"),
    ("", "ReduceLogSumExp"): _reduction("logsumexp"),
    ("", "ArgMax"): _arg_reduction("argmax"),
    ("", "ArgMin"): _arg_reduction("argmin"),
    ("", "Softmax"): _softmax,
    ("", "LogSoftmax"): _softmax,
    ("", "Gather"): _gather,
    ("", "Transpose"): _transpose,
    ("", "Expand"): _with_const(OpKind.EXPAND, "shape"),
    ("", "Reshape"): _with_const(OpKind.RESHAPE, "shape"),
    ("", "Unsqueeze"): _with_const(OpKind.RESHAPE, "axes"),
    ("", "Squeeze"): _with_const(OpKind.RESHAPE, "axes"),
    ("", "Concat"): _concat,
    ("", "Split"): _split,
    ("", "Slice"): _slice,
    ("", "Attention"): _attention,
    ("", "RotaryEmbedding"): _rotary,
    ("", "Dropout"): _dropout,
    ("com.microsoft", "SkipLayerNormalization"): _skip_norm("layer"),
    ("com.microsoft", "SkipSimplifiedLayerNormalization"): _skip_norm("rms"),
    ("com.microsoft", "EmbedLayerNormalization"): _embed_layer_norm,
    ("com.microsoft", "BiasGelu"): _bias_gelu,
    ("com.microsoft", "FastGelu"): _bias_gelu,
    ("com.microsoft", "Attention"): _ms_attention,
    ("com.microsoft", "MultiHeadAttention"): _mha,
    ("com.microsoft", "GroupQueryAttention"): _gqa,
    ("com.microsoft", "RotaryEmbedding"): _rotary,
}
for _n in _EW:
    CONVERTERS[("", _n)] = _all(OpKind.ELEMENTWISE)
for _n in _ACT:
    CONVERTERS[("", _n)] = _all(OpKind.ACTIVATION)
for _n in _MS_ACT:
    CONVERTERS[("com.microsoft", _n)] = _all(OpKind.ACTIVATION)
for _n in _ID:
    CONVERTERS[("", _n)] = _first(OpKind.IDENTITY)
for _n in _RESHAPE:
    CONVERTERS[("", _n)] = _first(OpKind.RESHAPE)
for _n in _SOURCE:
    CONVERTERS[("", _n)] = _all(OpKind.SOURCE)
for _n in _NOOP:
    CONVERTERS[("", _n)] = _all(OpKind.NOOP)
