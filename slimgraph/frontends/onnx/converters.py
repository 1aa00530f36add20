"""The converter table: which converter translates which ONNX op.

``CONVERTERS`` is keyed by ``(domain, op_type)`` (the default domain is ``""``); an op
without an entry becomes ``OpKind.UNKNOWN`` (a barrier). The converters live in
:mod:`slimgraph.frontends.onnx.standard_ops` and, for ONNX Runtime's fused ops,
:mod:`slimgraph.frontends.onnx.contrib_ops`.
"""

from __future__ import annotations

from typing import Callable

from slimgraph.frontends.onnx.context import ConversionContext, Converted
from slimgraph.frontends.onnx.contrib_ops import (
    convert_bias_gelu, convert_embed_layer_norm, convert_group_query_attention,
    convert_ms_attention, convert_multi_head_attention, skip_norm_converter,
)
from slimgraph.frontends.onnx.nodes import ACTIVATION_OPS, ELEMENTWISE_OPS
from slimgraph.frontends.onnx.standard_ops import (
    all_inputs_as, arg_reduction_converter, convert_attention, convert_concat, convert_dropout,
    convert_gather, convert_gemm, convert_matmul, convert_rotary, convert_slice, convert_softmax,
    convert_split, convert_transpose, first_input_as, norm_converter, reduction_converter,
    with_const_input_as,
)
from slimgraph.ir.graph import OpKind

_MS_ACT = ["QuickGelu", "Gelu"]
_ID = ["Cast", "Identity", "CastLike"]
_RESHAPE = ["Flatten"]
_SOURCE = ["Constant", "ConstantOfShape", "Range", "RandomNormal", "RandomUniform",
           "RandomNormalLike", "RandomUniformLike", "EyeLike"]
_NOOP = ["Shape", "Size"]

CONVERTERS: dict[tuple[str, str], Callable[[ConversionContext], Converted]] = {
    ("", "MatMul"): convert_matmul,
    ("", "Gemm"): convert_gemm,
    ("", "LayerNormalization"): norm_converter("layer", 2),
    ("", "SimplifiedLayerNormalization"): norm_converter("rms", 1),
    ("com.microsoft", "SimplifiedLayerNormalization"): norm_converter("rms", 1),
    ("", "RMSNormalization"): norm_converter("rms", 1),
    ("", "ReduceMean"): reduction_converter("mean"),
    ("", "ReduceSum"): reduction_converter("sum"),
    ("", "ReduceMax"): reduction_converter("max"),
    ("", "ReduceMin"): reduction_converter("min"),
    ("", "ReduceProd"): reduction_converter("prod"),
    ("", "ReduceL2"): reduction_converter("l2"),
    ("", "ReduceL1"): reduction_converter("l1"),
    ("", "ReduceSumSquare"): reduction_converter("sumsquare"),
    ("", "ReduceLogSumExp"): reduction_converter("logsumexp"),
    ("", "ArgMax"): arg_reduction_converter("argmax"),
    ("", "ArgMin"): arg_reduction_converter("argmin"),
    ("", "Softmax"): convert_softmax,
    ("", "LogSoftmax"): convert_softmax,
    ("", "Gather"): convert_gather,
    ("", "Transpose"): convert_transpose,
    ("", "Expand"): with_const_input_as(OpKind.EXPAND, "shape"),
    ("", "Reshape"): with_const_input_as(OpKind.RESHAPE, "shape"),
    ("", "Unsqueeze"): with_const_input_as(OpKind.RESHAPE, "axes"),
    ("", "Squeeze"): with_const_input_as(OpKind.RESHAPE, "axes"),
    ("", "Concat"): convert_concat,
    ("", "Split"): convert_split,
    ("", "Slice"): convert_slice,
    ("", "Attention"): convert_attention,
    ("", "RotaryEmbedding"): convert_rotary,
    ("", "Dropout"): convert_dropout,
    ("com.microsoft", "SkipLayerNormalization"): skip_norm_converter("layer"),
    ("com.microsoft", "SkipSimplifiedLayerNormalization"): skip_norm_converter("rms"),
    ("com.microsoft", "EmbedLayerNormalization"): convert_embed_layer_norm,
    ("com.microsoft", "BiasGelu"): convert_bias_gelu,
    ("com.microsoft", "FastGelu"): convert_bias_gelu,
    ("com.microsoft", "Attention"): convert_ms_attention,
    ("com.microsoft", "MultiHeadAttention"): convert_multi_head_attention,
    ("com.microsoft", "GroupQueryAttention"): convert_group_query_attention,
    ("com.microsoft", "RotaryEmbedding"): convert_rotary,
}
for _n in ELEMENTWISE_OPS:
    CONVERTERS[("", _n)] = all_inputs_as(OpKind.ELEMENTWISE)
for _n in ACTIVATION_OPS:
    CONVERTERS[("", _n)] = all_inputs_as(OpKind.ACTIVATION)
for _n in _MS_ACT:
    CONVERTERS[("com.microsoft", _n)] = all_inputs_as(OpKind.ACTIVATION)
for _n in _ID:
    CONVERTERS[("", _n)] = first_input_as(OpKind.IDENTITY)
for _n in _RESHAPE:
    CONVERTERS[("", _n)] = first_input_as(OpKind.RESHAPE)
for _n in _SOURCE:
    CONVERTERS[("", _n)] = all_inputs_as(OpKind.SOURCE)
for _n in _NOOP:
    CONVERTERS[("", _n)] = all_inputs_as(OpKind.NOOP)
