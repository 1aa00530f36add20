"""Trace an ``nn.Module`` with ``torch.export`` (non-strict) and lower it to the IR.

Works on the meta device: shapes come from the fake tensors that export records, and
parameter handles point into the module, so a LLaMA-2-70B configuration without
weights can be analysed on a small machine.

Each ATen op is translated by an entry of ``CONVERTERS`` into a normalized
``OpKind`` with normalized attributes; an op without an entry becomes
``OpKind.UNKNOWN`` (a barrier for the analysis), never a guess.
"""

from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.fx

from slimgraph.errors import TraceError
from slimgraph.ir.graph import Graph, OpKind, Value
from slimgraph.ir.params import TorchParamHandle

aten = torch.ops.aten


def trace(module: torch.nn.Module, args: tuple = (), kwargs: dict | None = None) -> Graph:
    """Export ``module`` and lower the exported program to a :class:`Graph`."""
    kwargs = dict(kwargs or {})
    try:
        with torch.no_grad():
            ep = torch.export.export(module, tuple(args), kwargs=kwargs, strict=False)
    except Exception as e:  # export raises many types; the user needs one clear line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TraceError(
            f"torch.export could not trace {type(module).__name__} with the given example "
            f"inputs: {type(e).__name__}: {first}"
        ) from e
    return lower(ep, module)


def _dtype(val: Any) -> str | None:
    dt = getattr(val, "dtype", None)
    return str(dt).replace("torch.", "") if dt is not None else None


def _shape(val: Any):
    if isinstance(val, torch.Tensor):
        return tuple(int(d) if isinstance(d, int) or not hasattr(d, "node") else _sym(d)
                     for d in val.shape)
    return None


def _sym(d) -> int | str:
    try:
        return int(d)
    except Exception:
        return str(d)


def _alias_table(module: torch.nn.Module) -> dict[int, tuple[list[str], str]]:
    table: dict[int, tuple[list[str], str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        table.setdefault(id(p), ([], "parameter"))[0].append(name)
    for name, b in module.named_buffers(remove_duplicate=False):
        table.setdefault(id(b), ([], "buffer"))[0].append(name)
    return table


def lower(ep: torch.export.ExportedProgram, module: torch.nn.Module) -> Graph:
    """The :class:`Graph` of ``ep``; parameters are handles into ``module``. ``ep`` is not
    kept: its state dict references every original weight, which would stay in memory
    beside the new ones a pass writes (permutations, removal)."""
    graph = Graph(type(module).__name__, source="torch")
    aliases = _alias_table(module)
    state = {**ep.state_dict, **ep.constants}
    env: dict[torch.fx.Node, Any] = {}
    kinds = {s.arg.name: s for s in ep.graph_signature.input_specs}
    by_tensor: dict[int, Value] = {}
    for node in ep.graph.nodes:
        if node.op == "placeholder":
            spec = kinds.get(node.name)
            target = getattr(spec, "target", None)
            if spec is not None and target is not None and target in state and \
                    id(state[target]) not in aliases and target in ep.constants:
                # a tensor made inside forward (torch.export lifts it: Falcon's
                # lifted_tensor_0): no module attribute holds it, so it is an input
                val = state[target]
                env[node] = graph.add_input(target, _shape(val), _dtype(val))
            elif spec is not None and target is not None and target in state:
                tensor = state[target]
                if id(tensor) in by_tensor:  # a tied weight seen under another name
                    env[node] = by_tensor[id(tensor)]
                    continue
                names, kind = aliases.get(id(tensor), ([target], "buffer"))
                handle = TorchParamHandle(module, names, kind)
                v = graph.add_param(names[0], handle)
                by_tensor[id(tensor)] = v
                env[node] = v
            elif isinstance(node.meta.get("val"), torch.Tensor):
                val = node.meta["val"]
                env[node] = graph.add_input(node.name, _shape(val), _dtype(val))
            else:
                env[node] = node.meta.get("val")
        elif node.op == "call_function":
            if node.target is operator.getitem:
                src, idx = node.args
                outs = env[src]
                env[node] = outs[idx] if isinstance(outs, (list, tuple)) else None
                continue
            _lower_call(graph, node, env)
        elif node.op == "output":
            outs = _flat_outputs(node, env)
            graph.set_outputs([v for v in outs if isinstance(v, Value) and v.is_tensor])
        elif node.op == "get_attr":
            env[node] = None
    return graph


def _flat_outputs(node: torch.fx.Node, env) -> list:
    out: list = []

    def visit(a):
        if isinstance(a, torch.fx.Node):
            out.append(env.get(a))
        elif isinstance(a, (list, tuple)):
            for x in a:
                visit(x)

    visit(node.args[0])
    return out


# -- op conversion ---------------------------------------------------------------------

Converted = tuple[OpKind, list[Any], dict[str, Any]]


def _lower_call(graph: Graph, node: torch.fx.Node, env: dict) -> None:
    def get(a):
        return env.get(a) if isinstance(a, torch.fx.Node) else None

    def const(a):
        if isinstance(a, torch.fx.Node):
            return env.get(a) if not isinstance(env.get(a), Value) else None
        return a

    name = _op_name(node.target)
    conv = CONVERTERS.get(name)
    if conv is not None:
        try:
            kind, inputs, attrs = conv(node, get, const)
        except (TypeError, ValueError, IndexError, KeyError):
            kind, inputs, attrs = OpKind.UNKNOWN, _tensor_args(node, get), {}
    else:
        kind, inputs, attrs = OpKind.UNKNOWN, _tensor_args(node, get), {}
    val = node.meta.get("val")
    if isinstance(val, (list, tuple)):
        outs = [(f"{node.name}.{i}", _shape(x), _dtype(x)) for i, x in enumerate(val)]
    else:
        outs = [(node.name, _shape(val), _dtype(val))]
    stack = node.meta.get("nn_module_stack") or {}
    meta = {"module": list(stack.values())[-1][0] if stack else ""}
    ir_node = graph.add_node(node.name, kind, name, inputs, outs, attrs, meta)
    env[node] = ir_node.outputs if isinstance(val, (list, tuple)) else ir_node.outputs[0]


def _op_name(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"aten.{target._schema.name.split('::')[-1]}.{target._overloadname}"
    return getattr(target, "__name__", str(target))


def _tensor_args(node: torch.fx.Node, get) -> list:
    out = []

    def visit(a):
        if isinstance(a, torch.fx.Node):
            v = get(a)
            if isinstance(v, Value):
                out.append(v)
        elif isinstance(a, (list, tuple)):
            for x in a:
                visit(x)

    for a in list(node.args) + list(node.kwargs.values()):
        visit(a)
    return out


def _arg(node, i, key, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(key, default)


def _simple(kind: OpKind) -> Callable:
    def conv(node, get, const) -> Converted:
        return kind, _tensor_args(node, get), {}

    return conv


def _first_only(kind: OpKind) -> Callable:
    def conv(node, get, const) -> Converted:
        return kind, [get(node.args[0])], {}

    return conv


def _elementwise(kind: OpKind) -> Callable:
    def conv(node, get, const) -> Converted:
        ins = [get(a) if isinstance(a, torch.fx.Node) else None for a in node.args]
        return kind, ins, {}

    return conv


def _linear(node, get, const) -> Converted:
    b = _arg(node, 2, "bias")
    return OpKind.LINEAR, [get(node.args[0]), get(node.args[1]), get(b)], {"w_in": 1, "w_out": 0}


def _mm(node, get, const) -> Converted:
    a, b = get(node.args[0]), get(node.args[1])
    if isinstance(b, Value) and b.param is not None and b.rank == 2:
        return OpKind.LINEAR, [a, b], {"w_in": 0, "w_out": 1}
    return OpKind.MATMUL, [a, b], {}


def _addmm(node, get, const) -> Converted:
    bias, a, w = get(node.args[0]), get(node.args[1]), get(node.args[2])
    if isinstance(w, Value) and w.param is not None and not node.kwargs:
        return OpKind.LINEAR, [a, w, bias], {"w_in": 0, "w_out": 1}
    raise ValueError("addmm without a parameter weight")


def _transpose(node, get, const) -> Converted:
    x = get(node.args[0])
    perm = list(range(x.rank))
    d0, d1 = node.args[1] % max(x.rank, 1), node.args[2] % max(x.rank, 1)
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return OpKind.TRANSPOSE, [x], {"perm": perm}


def _t(node, get, const) -> Converted:
    x = get(node.args[0])
    return OpKind.TRANSPOSE, [x], {"perm": list(range(x.rank))[::-1]}


def _permute(node, get, const) -> Converted:
    x = get(node.args[0])
    return OpKind.TRANSPOSE, [x], {"perm": [d % x.rank for d in node.args[1]]}


def _reduction(op: str) -> Callable:
    def conv(node, get, const) -> Converted:
        axes = _arg(node, 1, "dim")
        if isinstance(axes, int):
            axes = [axes]
        keep = bool(_arg(node, 2, "keepdim", False))
        return OpKind.REDUCTION, [get(node.args[0])], {"axes": axes, "keepdim": keep, "op": op}

    return conv


def _softmax(node, get, const) -> Converted:
    return OpKind.SOFTMAX, [get(node.args[0])], {"axis": node.args[1]}


def _layer_norm(node, get, const) -> Converted:
    shape = node.args[1]
    w, b = _arg(node, 2, "weight"), _arg(node, 3, "bias")
    axes = list(range(-len(shape), 0))
    return OpKind.NORM, [get(node.args[0]), get(w), get(b)], {"axes": axes, "stat": "layer"}


def _rms_norm(node, get, const) -> Converted:
    shape = node.args[1]
    w = _arg(node, 2, "weight")
    axes = list(range(-len(shape), 0))
    return OpKind.NORM, [get(node.args[0]), get(w)], {"axes": axes, "stat": "rms"}


def _embedding(node, get, const) -> Converted:
    return OpKind.EMBEDDING, [get(node.args[0]), get(node.args[1])], {}


def _cat(node, get, const) -> Converted:
    tensors = [get(t) for t in node.args[0]]
    return OpKind.CONCAT, tensors, {"axis": _arg(node, 1, "dim", 0)}


def _stack(node, get, const) -> Converted:
    tensors = [get(t) for t in node.args[0]]
    return OpKind.STACK, tensors, {"axis": _arg(node, 1, "dim", 0)}


def _split(node, get, const) -> Converted:
    return OpKind.SPLIT, [get(node.args[0])], {"axis": _arg(node, 2, "dim", 0)}


def _chunk(node, get, const) -> Converted:
    return OpKind.SPLIT, [get(node.args[0])], {"axis": _arg(node, 2, "dim", 0)}



def _slice(node, get, const) -> Converted:
    x = get(node.args[0])
    dim = _arg(node, 1, "dim", 0)
    start, end, step = _arg(node, 2, "start"), _arg(node, 3, "end"), _arg(node, 4, "step", 1)
    if any(isinstance(a, torch.fx.Node) for a in (start, end, step)):
        raise ValueError("symbolic slice bounds")
    return OpKind.SLICE, [x], {"axis": dim, "start": start, "end": end, "step": step}


def _select(node, get, const) -> Converted:
    return OpKind.SELECT, [get(node.args[0])], {"axis": node.args[1]}


def _sdpa(node, get, const) -> Converted:
    q, k, v = (get(a) for a in node.args[:3])
    mask = get(_arg(node, 3, "attn_mask"))
    gqa = bool(node.kwargs.get("enable_gqa", node.args[7] if len(node.args) > 7 else False))
    return OpKind.ATTENTION, [q, k, v, mask], {"gqa": gqa}


def _type_as(node, get, const) -> Converted:
    return OpKind.IDENTITY, [get(node.args[0])], {}


_EW = [
    "add.Tensor", "add.Scalar", "sub.Tensor", "sub.Scalar", "rsub.Scalar", "mul.Tensor",
    "mul.Scalar", "div.Tensor", "div.Scalar", "div.Tensor_mode", "pow.Tensor_Scalar",
    "pow.Tensor_Tensor", "pow.Scalar", "neg.default", "rsqrt.default", "sqrt.default",
    "exp.default", "log.default", "cos.default", "sin.default", "abs.default",
    "reciprocal.default", "eq.Tensor", "eq.Scalar", "ne.Tensor", "ne.Scalar", "lt.Tensor",
    "lt.Scalar", "le.Tensor", "le.Scalar", "gt.Tensor", "gt.Scalar", "ge.Tensor",
    "ge.Scalar", "where.self", "masked_fill.Scalar", "masked_fill.Tensor", "__and__.Tensor",
    "__or__.Tensor", "bitwise_and.Tensor", "bitwise_or.Tensor", "logical_not.default",
    "bitwise_not.default", "clamp.default", "clamp_min.default", "clamp_max.default",
    "minimum.default", "maximum.default", "erf.default", "floor.default", "ceil.default",
    "round.default", "sign.default", "square.default", "log1p.default", "expm1.default",
    "logical_and.default", "logical_or.default", "fmod.Scalar", "remainder.Scalar",
    "isnan.default", "isinf.default", "add_.Tensor", "mul_.Tensor", "masked_fill_.Scalar",
]
_ACT = [
    "silu.default", "silu_.default", "gelu.default", "gelu_.default", "relu.default",
    "relu_.default", "tanh.default", "sigmoid.default", "softplus.default", "mish.default",
    "elu.default", "leaky_relu.default", "hardtanh.default", "gelu_tanh.default",
    "relu6.default", "hardswish.default", "hardsigmoid.default", "selu.default",
]
_ID = [
    "to.dtype", "to.dtype_layout", "to.device", "to.other", "_to_copy.default",
    "contiguous.default", "clone.default", "dropout.default", "alias.default",
    "detach.default", "lift_fresh_copy.default",
    "feature_dropout.default", "detach_.default", "native_dropout.default",
]
_RESHAPE = [
    "view.default", "reshape.default", "_unsafe_view.default", "unsqueeze.default",
    "squeeze.dim", "squeeze.dims", "squeeze.default", "flatten.using_ints", "unflatten.int",
    "view_as.default", "reshape_as.default",
]
_SOURCE = [
    "arange.default", "arange.start", "arange.start_step", "full.default", "zeros.default",
    "ones.default", "new_ones.default", "new_zeros.default", "new_full.default",
    "scalar_tensor.default", "empty.memory_format", "zeros_like.default", "ones_like.default",
    "full_like.default", "empty_like.default", "tensor.default",
]
_NOOP = ["_assert_tensor_metadata.default", "sym_size.int", "_assert_scalar.default",
         "sym_constrain_range_for_size.default", "sym_numel.default", "_assert_async.msg"]

CONVERTERS: dict[str, Callable[..., Converted]] = {
    "aten.linear.default": _linear,
    "aten.mm.default": _mm,
    "aten.matmul.default": _mm,
    "aten.bmm.default": _mm,
    "aten.addmm.default": _addmm,
    "aten.transpose.int": _transpose,
    "aten.t.default": _t,
    "aten.numpy_T.default": _t,  # x.T: all dims reversed (Falcon: x @ W.T)
    "aten.permute.default": _permute,
    "aten.mean.dim": _reduction("mean"),
    "aten.sum.dim_IntList": _reduction("sum"),
    "aten.amax.default": _reduction("max"),
    "aten.var.correction": _reduction("var"),
    "aten.softmax.int": _softmax,
    "aten._softmax.default": _softmax,
    "aten.log_softmax.int": _softmax,
    "aten.layer_norm.default": _layer_norm,
    "aten.native_layer_norm.default": _layer_norm,
    "aten.rms_norm.default": _rms_norm,
    "aten.embedding.default": _embedding,
    "aten.cat.default": _cat,
    "aten.concat.default": _cat,
    "aten.stack.default": _stack,
    "aten.split.Tensor": _split,
    "aten.split_with_sizes.default": _split,
    "aten.chunk.default": _chunk,
    "aten.slice.Tensor": _slice,
    "aten.select.int": _select,
    "aten.scaled_dot_product_attention.default": _sdpa,
    "aten.type_as.default": _type_as,
    "aten.expand.default": _first_only(OpKind.EXPAND),
    "aten.expand_as.default": _first_only(OpKind.EXPAND),
    "aten.broadcast_to.default": _first_only(OpKind.EXPAND),
}
for _n in _EW:
    CONVERTERS[f"aten.{_n}"] = _elementwise(OpKind.ELEMENTWISE)
for _n in _ACT:
    CONVERTERS[f"aten.{_n}"] = _elementwise(OpKind.ACTIVATION)
for _n in _ID:
    CONVERTERS[f"aten.{_n}"] = _first_only(OpKind.IDENTITY)
for _n in _RESHAPE:
    CONVERTERS[f"aten.{_n}"] = _first_only(OpKind.RESHAPE)
for _n in _SOURCE:
    CONVERTERS[f"aten.{_n}"] = _simple(OpKind.SOURCE)
for _n in _NOOP:
    CONVERTERS[f"aten.{_n}"] = _simple(OpKind.NOOP)
