"""Import an ONNX model (external data included) into the IR.

The same analysis (``slimgraph.ir.dependency.analyze``) then yields the same channel
groups as the torch frontend. Each ONNX op is translated by an entry of ``CONVERTERS``
(keyed by ``(domain, op_type)``) into a normalized ``OpKind`` with normalized
attributes; an op without an entry, or one whose inputs do not fit the entry's
assumptions, becomes ``OpKind.UNKNOWN`` (a barrier), never a guess.

Weights. Initializers (and ``Constant`` nodes) that hold weights become parameters
whose handle writes back into the ``onnx_ir`` model, so a backend can save the pruned
model. Small constants (shape tensors, axes, scalars) become ``SOURCE`` nodes whose
output carries the value in ``Value.const``; a small numpy evaluator folds shape
arithmetic over such constants so that converters can read Slice bounds and the like.

Dynamic axes. Shape tensors computed at run time from symbolic dims (``Shape`` of a
``[batch, seq, 576]`` value, sliced and concatenated with constants) are folded into
entries that are ints or dim names (``Shape``, ``Slice``, ``Gather``, ``Concat``,
(un)squeeze, cast: ops that move dims; arithmetic on dims is not followed). Where the
file leaves a dim unknown (no shape recorded, or ONNX shape inference's ``unk__N``),
``Reshape`` / ``Expand`` / ``Transpose`` / ``MatMul`` / elementwise outputs are completed
from their inputs, with products of symbols (``4*batch``, ``slimgraph.ir.symdims``):
the opset-18 attention's keys, reshaped to ``[-1, seq, 64]`` and back, keep their heads.
``RotaryEmbedding`` (opset 23) is emitted as what it does to channels (the rotated
halves swapped and combined elementwise), so heads pass through it.

ONNX Runtime's fused ops (``onnxruntime.transformers.optimizer``, com.microsoft domain)
are emitted as what they compute on channels: ``Attention`` as a LINEAR with the packed
QKV weight ``[D, Hq + Hk + Hv]`` and bias, a SPLIT into the q / k / v sections
(``qkv_hidden_sizes``, else equal thirds), each viewed as ``[B, num_heads, S, d]``, and an
ATTENTION; ``MultiHeadAttention`` (3-D query / key / value, optional packed bias) and
``GroupQueryAttention`` (separate or packed QKV; ``kv_num_heads``; ``do_rotary`` rotates
q and k per head) likewise; ``SkipLayerNormalization`` / ``SkipSimplifiedLayerNormalization``
as the residual add (output 3, when used) and a norm; ``EmbedLayerNormalization`` as
embedding lookups, a sum and a layer norm; ``BiasGelu`` / ``FastGelu`` as an add and an
activation; com.microsoft ``RotaryEmbedding`` as the opset-23 one. Forms whose channels
are not described -- a past / present KV cache, a per-head ``attention_bias``, ``head_sink``,
4-D or packed key / value of ``MultiHeadAttention``, ``Attention`` with ``do_rotary`` --
are barriers; their output shapes are still recorded, so the rest of the graph is analyzed.

Provenance. ``torch.onnx.export(..., dynamo=True)`` runs the onnxscript optimizer,
which changes how weights are stored. Its metadata lets most of that be undone:

- the graph signature (``pkg.torch.export.ExportedProgram.graph_signature``) maps the
  exported placeholders (``p_model_layers_0_..._weight``) to module FQNs;
- a constant-folded weight records its sources (``pkg.onnxscript.optimizer.folded_from``)
  and the node that uses it records the FX op it came from (``pkg.torch.onnx.fx_node``):
  a ``[K, N]`` initializer folded from one parameter and consumed by ``aten.linear`` is
  the transposed ``[N, K]`` weight, so the IR parameter gets the FQN and the original
  layout, and the handle remembers the permutation (``OnnxParamHandle.targets``);
- identical initializers merged into one (all-ones norm weights, all-zero biases of a
  fresh model) are split again: each use whose FX op names a parameter that no longer
  exists in the file gets that parameter back as an IR parameter of its own (its
  handle detaches the use onto a new initializer when written);
- a weight stored twice (a tied embedding and its folded transpose) is one IR
  parameter with two targets, named after the module that uses it first.

What cannot be recovered stays what it is in the file: a table folded from a
parameter *and* other values (a position-embedding lookup precomputed for the
static sequence, rotary cos/sin tables) is a ``buffer`` parameter named after the
ONNX value, with ``folded_from`` in ``Graph.meta["onnx_provenance"]``.

Errors. A missing, unreadable, truncated or checker-rejected file raises
:class:`slimgraph.errors.OnnxImportError` with one line naming the file.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import onnx_ir as ir
import torch

from slimgraph.errors import OnnxImportError
from slimgraph.ir import symdims
from slimgraph.ir.graph import Graph, OpKind, Value
from slimgraph.ir.params import ArrayParamHandle

__all__ = ["CONVERTERS", "OnnxParamHandle", "import_onnx", "import_onnx_model"]

SIGNATURE_KEY = "pkg.torch.export.ExportedProgram.graph_signature"
INPUT_KIND_KEY = "pkg.torch.export.graph_signature.InputSpec.kind"
FOLDED_KEY = "pkg.onnxscript.optimizer.folded_from"
FX_NODE_KEY = "pkg.torch.onnx.fx_node"
SCOPES_KEY = "pkg.torch.onnx.name_scopes"
CLASSES_KEY = "pkg.torch.onnx.class_hierarchy"

CONST_MAX_ELEMENTS = 4096  # small constants are evaluated and kept as python values
# Leaf modules whose weight/bias attribute name is known: a use inside one of them names
# an alias of the parameter (a tied weight used by a second module).
_LEAF_MODULES = {
    "torch.nn.modules.sparse.Embedding",
    "torch.nn.modules.linear.Linear",
    "torch.nn.modules.normalization.LayerNorm",
    "transformers.pytorch_utils.Conv1D",
}
_FLOAT_TYPES = {
    ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16,
}


def import_onnx(path: str | Path) -> Graph:
    """Load ``path`` with ``onnx_ir`` and translate it to a :class:`Graph`."""
    path = Path(path)
    model = _load(path)
    return _Importer(model, path).run()


def import_onnx_model(model: ir.Model, path: str | Path) -> Graph:
    """Translate an ``onnx_ir`` model already in memory (e.g. one a pass modified; it was
    loaded from ``path``) to a :class:`Graph` whose handles write into ``model``."""
    return _Importer(model, Path(path)).run()


# -- loading and validation -------------------------------------------------------------


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0].strip() if text else type(e).__name__


def _load(path: Path) -> ir.Model:
    if not path.exists():
        raise OnnxImportError(f"{path}: no such file")
    if not path.is_file():
        raise OnnxImportError(f"{path}: not a file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf DecodeError and friends
        raise OnnxImportError(
            f"{path}: not a readable ONNX model (corrupt or truncated?): {_first_line(e)}"
        ) from e
    if not proto.HasField("graph") or len(proto.graph.node) == 0:
        raise OnnxImportError(f"{path}: not an ONNX model (no graph or an empty graph)")
    try:
        onnx.checker.check_model(str(path))  # by path: external data resolved next to it
    except Exception as e:
        raise OnnxImportError(f"{path}: rejected by onnx.checker: {_first_line(e)}") from e
    try:
        # What onnx_ir.load does, without parsing the file a second time.
        model = ir.serde.deserialize_model(proto)
        ir.external_data.set_base_dir(model.graph, str(path.parent))
    except Exception as e:
        raise OnnxImportError(f"{path}: onnx_ir cannot read the model: {_first_line(e)}") from e
    _check_external_data(model, path)
    if any(v.shape is None for n in model.graph for v in n.outputs if v.name):
        try:
            from onnx_ir.passes.common import ShapeInferencePass

            ShapeInferencePass(strict_mode=False)(model)
        except Exception:  # missing shapes turn the affected nodes into barriers
            pass
    return model


def _check_external_data(model: ir.Model, path: Path) -> None:
    for name, v in model.graph.initializers.items():
        t = v.const_value
        if not isinstance(t, ir.ExternalTensor):
            continue
        file = Path(t.base_dir or path.parent) / t.location
        if not file.is_file():
            raise OnnxImportError(
                f"{path}: external data file {t.location!r} of initializer {name!r} is missing"
            )
        need = (t.offset or 0) + (t.length if t.length is not None else t.nbytes)
        if file.stat().st_size < need:
            raise OnnxImportError(
                f"{path}: external data file {t.location!r} is truncated "
                f"(initializer {name!r} needs {need} bytes, file has {file.stat().st_size})"
            )


# -- small helpers -----------------------------------------------------------------------


def _dtype_str(dt: ir.DataType | None) -> str | None:
    if dt is None:
        return None
    try:
        return str(np.dtype(dt.numpy()))
    except Exception:
        return dt.name.lower()


def _identity(rank: int) -> tuple[int, ...]:
    return tuple(range(rank))


def _inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


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


_SIG_RE = re.compile(r"^\s*(\w+): (PARAMETER|BUFFER|CONSTANT_TENSOR)\b.*?target='([^']+)'", re.M)
_FX_ARGS_RE = re.compile(r"\]\((.*)\)\s*$", re.S)
_FX_TARGET_RE = re.compile(r"call_function\[target=([\w.]+)\]")
_PLACEHOLDER_RE = re.compile(r"%(\w+)")


def _signature(model: ir.Model) -> dict[str, tuple[str, str]]:
    """Placeholder name -> (FQN, PARAMETER | BUFFER | CONSTANT_TENSOR)."""
    text = _meta(model.graph).get(SIGNATURE_KEY) or _meta(model).get(SIGNATURE_KEY) or ""
    return {m.group(1): (m.group(3), m.group(2)) for m in _SIG_RE.finditer(text)}


# -- weights and their provenance --------------------------------------------------------


@dataclass(eq=False)
class _Storage:
    """A tensor stored in the file: an initializer, or the value of a Constant node."""

    value: ir.Value  # the initializer / the Constant's output
    node: ir.Node | None  # the Constant node, if any
    fqn: str | None = None  # the module FQN it stores directly (graph signature)
    sig_kind: str | None = None  # PARAMETER | BUFFER | CONSTANT_TENSOR
    folded_from: list[str] = field(default_factory=list)
    source_fqn: str | None = None  # the one parameter it was folded from, if only one

    @property
    def name(self) -> str:
        return self.value.name or ""

    @property
    def tensor(self):
        if self.node is not None:
            return self.node.attributes["value"].value
        return self.value.const_value

    @property
    def dtype(self) -> ir.DataType:
        return self.tensor.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.tensor.shape)

    def numel(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    def array(self) -> np.ndarray:
        return self.tensor.numpy()

    def uses(self) -> list[tuple[ir.Node, int]]:
        return [(u.node, u.idx) for u in self.value.uses()]

    def write(self, arr: np.ndarray) -> None:
        tensor = ir.Tensor(arr, name=self.name)
        if self.node is not None:
            self.node.attributes["value"] = ir.AttrTensor("value", tensor)
        else:
            self.value.const_value = tensor
        self.value.shape = ir.Shape(arr.shape)


@dataclass(eq=False)
class _Target:
    """One stored copy of an IR parameter: ``storage = param.transpose(perm)``."""

    storage: _Storage
    perm: tuple[int, ...]
    uses: list[tuple[ir.Node, int]]


class OnnxParamHandle(ArrayParamHandle):
    """An IR parameter backed by one or more ONNX tensors.

    ``shape`` is the parameter's original layout (the torch module's, when known).
    ``targets`` lists where it is stored: each target holds ``param.transpose(perm)``
    (``permuted`` is true when any target is stored transposed, e.g. a linear weight
    pre-transposed to ``[in, out]`` by the exporter). Writing updates every target; a
    target whose tensor is shared with other parameters (a merged initializer) is first
    detached onto a new initializer of its own.
    """

    def __init__(self, name: str, shape, dtype: str, targets: list[_Target], graph: ir.Graph,
                 kind: str, aliases: list[str], provenance: str = ""):
        super().__init__(name, None, shape, dtype, setter=self._write_back, kind=kind)
        self.targets = targets
        self.onnx_graph = graph
        self._aliases = aliases or [name]
        self.provenance = provenance

    @property
    def aliases(self) -> list[str]:
        return list(self._aliases)

    @property
    def permuted(self) -> bool:
        return any(t.perm != _identity(len(t.perm)) for t in self.targets)

    @property
    def onnx_names(self) -> list[str]:
        return [t.storage.name for t in self.targets]

    @property
    def has_data(self) -> bool:
        return self._array is not None or bool(self.targets)

    def _load(self) -> np.ndarray:
        if self._array is None:
            t = self.targets[0]
            self._array = np.transpose(t.storage.array(), _inverse(t.perm))
        return self._array

    def read(self) -> torch.Tensor:
        arr = np.array(self._load(), order="C")  # a copy: stored tensors may be read-only maps
        if arr.dtype.name == "bfloat16":
            return torch.from_numpy(arr.view(np.uint16).copy()).view(torch.bfloat16)
        return torch.from_numpy(arr)

    def write(self, tensor: torch.Tensor) -> None:
        old = self._load().dtype
        t = tensor.detach().cpu()
        if old.name == "bfloat16":
            arr = t.to(torch.bfloat16).view(torch.int16).numpy().view(old)
        else:
            arr = t.numpy().astype(old, copy=False)
        self._array = arr
        self.shape = tuple(arr.shape)
        self._write_back(arr)

    def _write_back(self, arr: np.ndarray) -> None:
        for t in self.targets:
            stored = np.ascontiguousarray(np.transpose(arr, t.perm))
            mine = {(id(n), i) for n, i in t.uses}
            if any((id(n), i) not in mine for n, i in t.storage.uses()):
                t.storage = self._detach(t, stored)
            else:
                t.storage.write(stored)

    def _detach(self, t: _Target, arr: np.ndarray) -> _Storage:
        taken = {v.name for v in self.onnx_graph.initializers.values()}
        taken |= {o.name for n in self.onnx_graph for o in n.outputs}
        base = self.name if not t.perm or t.perm == _identity(len(t.perm)) else f"{self.name}.T"
        name, k = base, 1
        while name in taken:
            k += 1
            name = f"{base}.{k}"
        value = ir.Value(name=name, shape=ir.Shape(arr.shape),
                         type=ir.TensorType(t.storage.dtype), const_value=ir.Tensor(arr, name=name))
        self.onnx_graph.register_initializer(value)
        for node, i in t.uses:
            node.replace_input_with(i, value)
        return _Storage(value, None, fqn=self.name)


# -- the importer ------------------------------------------------------------------------


class _Importer:
    def __init__(self, model: ir.Model, path: Path) -> None:
        self.model = model
        self.g = model.graph
        self.path = path
        self.opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
        self.graph = Graph(self.g.name or path.stem, source="onnx")
        self.env: dict[int, Value] = {}  # id(ir.Value) -> IR value
        self.consts: dict[int, np.ndarray] = {}  # id(ir.Value) -> small constant
        self.storages: dict[int, _Storage] = {}  # id(ir.Value) -> stored tensor
        self.use_map: dict[tuple[int, int], tuple[Value, tuple[int, ...]]] = {}
        self.views: dict[int, tuple[Value, tuple[int, ...]]] = {}  # id(IR value) -> param, perm
        self.view_cache: dict[tuple[int, tuple[int, ...]], Value] = {}
        self.param_of_storage: dict[int, Value] = {}  # default param for a storage
        self.provenance: dict[str, str] = {}
        self.seq_parts: dict[int, list[Value]] = {}  # id(sequence value) -> SPLIT outputs
        # id(ir.Value) -> a shape tensor computed at run time from symbolic dims: an object
        # array of ints and dim names (``Shape`` of a dynamic-axis value, sliced, concatenated)
        self.symbolic: dict[int, np.ndarray] = {}
        # id(ir.Value) -> shape completed by the importer where the file's is unknown
        self.inferred: dict[int, tuple] = {}
        self.sig = _signature(model)
        self._names: set[str] = set()
        self._node_names: set[str] = set()

    # naming -----------------------------------------------------------------------
    def _unique(self, base: str) -> str:
        name, k = base or "v", 1
        while name in self._names or name in self.graph.values:
            k += 1
            name = f"{base}.{k}"
        self._names.add(name)
        return name

    def _node_name(self, node: ir.Node, index: int) -> str:
        base = node.name or f"{node.op_type}_{index}"
        name, k = base, 1
        while name in self._node_names:
            k += 1
            name = f"{base}.{k}"
        self._node_names.add(name)
        return name

    # shapes -------------------------------------------------------------------------
    def shape(self, v: ir.Value | None):
        if v is not None and id(v) in self.inferred:
            return self.inferred[id(v)]
        if v is None or v.shape is None:
            return None
        dims = []
        for i, d in enumerate(v.shape):
            if isinstance(d, int):
                dims.append(int(d))
            elif getattr(d, "value", None) is not None:
                dims.append(str(d.value))
            else:
                dims.append(f"?{v.name}:{i}")
        return tuple(dims)

    # -- run -----------------------------------------------------------------------
    def run(self) -> Graph:
        try:
            self.g.sort()
        except Exception:
            pass
        self._collect_storages()
        self._make_params()
        init_names = set(self.g.initializers)
        for v in self.g.inputs:
            if v.name in init_names:
                continue  # keep_initializers_as_inputs: the initializer stands in
            self.env[id(v)] = self.graph.add_input(self._unique(v.name), self.shape(v),
                                                   _dtype_str(v.dtype))
        for index, node in enumerate(self.g):
            self._lower(node, index)
        outs = [self.value_of(v) for v in self.g.outputs]
        self.graph.set_outputs([v for v in outs if v is not None and v.is_tensor])
        self.graph.meta.update({
            "onnx_model": self.model,
            "onnx_path": str(self.path),
            "opset": self.opset,
            "producer": " ".join(x for x in (self.model.producer_name,
                                             self.model.producer_version) if x),
            "onnx_provenance": self.provenance,
            # ONNX value name -> IR value name (node outputs and graph inputs)
            "onnx_values": {v.name: self.env[id(v)].name
                            for v in [*self.g.inputs, *(o for n in self.g for o in n.outputs)]
                            if v.name and id(v) in self.env},
        })
        return self.graph

    # -- storages and parameters ---------------------------------------------------------
    def _collect_storages(self) -> None:
        fqn_kind = {fqn: kind for fqn, kind in self.sig.values()}
        for v in self.g.initializers.values():
            if v.const_value is not None:
                self.storages[id(v)] = _Storage(v, None)
        for node in self.g:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                attr = node.attributes.get("value")
                if attr is not None and attr.type == ir.AttributeType.TENSOR:
                    self.storages[id(node.outputs[0])] = _Storage(node.outputs[0], node)
                else:
                    arr = _constant_attr(node)
                    if arr is not None:
                        self.consts[id(node.outputs[0])] = arr
        for s in self.storages.values():
            md = _meta(s.value)
            if s.name in fqn_kind:
                s.fqn, s.sig_kind = s.name, fqn_kind[s.name]
            elif md.get(INPUT_KIND_KEY) in ("PARAMETER", "BUFFER", "CONSTANT_TENSOR"):
                s.fqn, s.sig_kind = s.name, md[INPUT_KIND_KEY]
            s.folded_from = [str(x) for x in _parse_list(md.get(FOLDED_KEY))]
            if s.fqn is None and len(s.folded_from) == 1 and s.folded_from[0] in fqn_kind:
                s.source_fqn = s.folded_from[0]
        self.fqn_kind = fqn_kind
        for s in self.storages.values():
            if not self._is_weight(s) and s.numel() <= CONST_MAX_ELEMENTS:
                self.consts[id(s.value)] = s.array()
        # FQNs still present in the file, directly or as a single-source fold
        self.present = {s.fqn for s in self.storages.values() if s.fqn}
        self.present |= {s.source_fqn for s in self.storages.values() if s.source_fqn}
        self.stored_shape = {s.fqn: s.shape for s in self.storages.values() if s.fqn}
        self.stored_dtype = {s.fqn: s.dtype for s in self.storages.values() if s.fqn}

    def _is_weight(self, s: _Storage) -> bool:
        if s.fqn or s.source_fqn:
            return True
        return s.dtype in _FLOAT_TYPES and s.numel() >= 2

    def _fx_info(self, node: ir.Node) -> tuple[str | None, list[str]]:
        """(FX op target, FQNs of the placeholders its arguments name)."""
        text = _meta(node).get(FX_NODE_KEY)
        if not text:
            return None, []
        t = _FX_TARGET_RE.search(text)
        a = _FX_ARGS_RE.search(text)
        names = _PLACEHOLDER_RE.findall(a.group(1)) if a else []
        fqns = [self.sig[n][0] for n in names if n in self.sig]
        return (t.group(1) if t else None), list(dict.fromkeys(fqns))

    def _module_alias(self, node: ir.Node, fqn: str) -> str | None:
        md = _meta(node)
        scopes, classes = _parse_list(md.get(SCOPES_KEY)), _parse_list(md.get(CLASSES_KEY))
        if len(scopes) < 2 or len(classes) < 2 or classes[-2] not in _LEAF_MODULES:
            return None
        module, attr = str(scopes[-2]), fqn.rsplit(".", 1)[-1]
        if not module or attr not in ("weight", "bias"):
            return None
        return f"{module}.{attr}"

    def _resolve_use(self, s: _Storage, node: ir.Node, idx: int):
        """(FQN or None, perm) for one use of a stored weight."""
        base = s.fqn or s.source_fqn
        target, fx_fqns = self._fx_info(node)
        fqn = base
        if base is not None and fx_fqns and base not in fx_fqns:
            absent = [f for f in fx_fqns if f not in self.present]
            leaf = base.rsplit(".", 1)[-1]
            pick = [f for f in absent if f.rsplit(".", 1)[-1] == leaf]
            if len(pick) == 1:
                fqn = pick[0]  # a merged (deduplicated) initializer: give the use its own
        rank = len(s.shape)
        if s.fqn is not None:
            return fqn, _identity(rank)
        if s.source_fqn is None:
            return None, _identity(rank)
        # folded from one parameter: which transform? Only what the FX op proves.
        known = self.stored_shape.get(s.source_fqn)
        if (rank == 2 and target == "torch.ops.aten.linear.default"
                and node.op_type in ("MatMul", "Gemm") and idx == 1
                and not (node.op_type == "Gemm" and _attr(node, "transB", 0))):
            perm = (1, 0)
            if known is None or known == (s.shape[1], s.shape[0]):
                return fqn, perm
        if (rank == 2 and target == "torch.ops.aten.linear.default" and node.op_type == "Gemm"
                and idx == 1 and _attr(node, "transB", 0)):
            if known is None or known == s.shape:
                return fqn, _identity(rank)
        if known is not None and known == s.shape and (
                s.dtype == self.stored_dtype.get(s.source_fqn)):
            return fqn, _identity(rank)  # e.g. an Identity folded away
        return None, _identity(rank)

    def _make_params(self) -> None:
        # FQN (or "onnx:<name>" when none is recovered) -> its stored copies, in order of use
        groups: dict[str, list[_Target]] = {}
        first_alias: dict[str, list[str]] = {}
        merged_note: dict[str, str] = {}
        for node in self.g:  # uses inside subgraphs are not imported
            for idx, v in enumerate(node.inputs):
                if v is None or id(v) not in self.storages:
                    continue
                s = self.storages[id(v)]
                if not self._is_weight(s):
                    continue
                fqn, perm = self._resolve_use(s, node, idx)
                key = fqn if fqn is not None else f"onnx:{s.name}"
                targets = groups.setdefault(key, [])
                for t in targets:
                    if t.storage is s and t.perm == perm:
                        t.uses.append((node, idx))
                        break
                else:
                    targets.append(_Target(s, perm, [(node, idx)]))
                if fqn is not None:
                    names = first_alias.setdefault(key, [])
                    alias = self._module_alias(node, fqn)
                    for a in (alias, fqn):
                        if a and a not in names:
                            names.append(a)
                    if fqn != (s.fqn or s.source_fqn):
                        merged_note[key] = f"merged into initializer {s.name!r} by the optimizer"
        # weights without uses (graph outputs, unused initializers)
        used = {id(t.storage) for ts in groups.values() for t in ts}
        for s in self.storages.values():
            if self._is_weight(s) and id(s) not in used:
                key = s.fqn or f"onnx:{s.name}"
                groups.setdefault(key, []).append(_Target(s, _identity(len(s.shape)), []))
        for key, targets in groups.items():
            self._add_param(key, targets, first_alias.get(key, []), merged_note.get(key))

    def _add_param(self, key: str, targets: list[_Target], aliases: list[str],
                   merged: str | None) -> None:
        # every target must describe the same original shape; split off those that do not
        def orig(t: _Target) -> tuple[int, ...]:
            return tuple(t.storage.shape[i] for i in _inverse(t.perm))

        shape = orig(targets[0])
        dtype = targets[0].storage.dtype
        same = [t for t in targets if orig(t) == shape and t.storage.dtype == dtype]
        rest = [t for t in targets if t not in same]
        for t in rest:
            self._add_param(f"onnx:{t.storage.name}", [t], [], None)
        recovered = not key.startswith("onnx:")
        s0 = same[0].storage
        if recovered:
            name = aliases[0] if aliases else key
            buffer = self.fqn_kind.get(key) in ("BUFFER", "CONSTANT_TENSOR")
            kind = "buffer" if buffer else "parameter"
        else:
            name = s0.name
            kind = self._unrecovered_kind(s0)
        notes = []
        if any(t.perm != _identity(len(t.perm)) for t in same):
            notes.append("stored transposed as " + ", ".join(
                f"{t.storage.name!r} (perm {list(t.perm)})" for t in same
                if t.perm != _identity(len(t.perm))))
        if merged:
            notes.append(merged)
        if not recovered and s0.folded_from:
            notes.append(f"constant folded by the exporter from {s0.folded_from}")
        if not recovered and s0.source_fqn:
            notes.append(f"derived from {s0.source_fqn!r} by an unknown transform")
        handle = OnnxParamHandle(self._unique(name), shape, _dtype_str(s0.dtype), same, self.g,
                                 kind, aliases if recovered else [], "; ".join(notes))
        value = self.graph.add_param(handle.name, handle)
        if notes:
            self.provenance[handle.name] = handle.provenance
        for t in same:
            self.param_of_storage.setdefault(id(t.storage.value), value)
            for node, idx in t.uses:
                self.use_map[(id(node), idx)] = (value, t.perm)

    def _unrecovered_kind(self, s: _Storage) -> str:
        """A weight without an FQN: a plain initializer is a parameter; a constant the
        exporter computed (folded from several values) or a Constant node is a buffer."""
        if s.source_fqn is not None:
            return "parameter" if self.fqn_kind.get(s.source_fqn) == "PARAMETER" else "buffer"
        if s.sig_kind is not None:
            return "parameter" if s.sig_kind == "PARAMETER" else "buffer"
        if s.folded_from or s.node is not None:
            return "buffer"
        return "parameter"

    # -- values ----------------------------------------------------------------------------
    def view(self, param: Value, perm: tuple[int, ...]) -> Value:
        """``param`` as stored (transposed by ``perm``), via a TRANSPOSE node."""
        if perm == _identity(len(perm)):
            return param
        key = (id(param), perm)
        if key not in self.view_cache:
            shape = tuple(param.shape[p] for p in perm)
            name = self._unique(f"{param.name}.T")
            node = self.graph.add_node(self._node_name_str(f"transpose:{param.name}"),
                                       OpKind.TRANSPOSE, "Transpose(stored)", [param],
                                       [(name, shape, param.dtype)], {"perm": list(perm)})
            self.views[id(node.outputs[0])] = (param, perm)
            self.view_cache[key] = node.outputs[0]
        return self.view_cache[key]

    def _node_name_str(self, base: str) -> str:
        name, k = base, 1
        while name in self._node_names:
            k += 1
            name = f"{base}.{k}"
        self._node_names.add(name)
        return name

    def value_of(self, v: ir.Value | None, use: tuple[int, int] | None = None) -> Value | None:
        if v is None or (not v.name and id(v) not in self.env):
            return None
        if use is not None and use in self.use_map:
            param, perm = self.use_map[use]
            return self.view(param, perm)
        if id(v) in self.env:
            return self.env[id(v)]
        if id(v) in self.param_of_storage:
            param = self.param_of_storage[id(v)]
            s = self.storages[id(v)]
            for t in param.param.targets:
                if t.storage is s:
                    return self.view(param, t.perm)
            return param
        if id(v) in self.consts or id(v) in self.storages:  # a stored non-weight constant
            arr = self.consts.get(id(v))
            if arr is None:
                arr = self.storages[id(v)].array()
            name = self._unique(v.name)
            node = self.graph.add_node(self._node_name_str(f"const:{v.name}"), OpKind.SOURCE,
                                       "Constant", [], [(name, tuple(arr.shape), str(arr.dtype))])
            out = node.outputs[0]
            if arr.size <= CONST_MAX_ELEMENTS:
                out.const = _pylist(arr)
            self.env[id(v)] = out
            return out
        return None

    def param_at(self, node: ir.Node, i: int) -> tuple[Value, tuple[int, ...]] | None:
        """The parameter behind input ``i`` and the perm it is seen through, if any."""
        if i >= len(node.inputs) or node.inputs[i] is None:
            return None
        key = (id(node), i)
        if key in self.use_map:
            return self.use_map[key]
        v = self.env.get(id(node.inputs[i]))
        if v is None:
            return None
        if v.param is not None:
            return v, _identity(v.rank)
        return self.views.get(id(v))

    def shape_tensor(self, v: ir.Value | None) -> list | None:
        """The entries of a 1-D shape tensor known at import time: ints, and dim names
        where they are only known at run time (a dynamic axis), else None."""
        if v is None:
            return None
        arr = self.consts.get(id(v))
        if arr is None:
            arr = self.symbolic.get(id(v))
        if arr is None or arr.ndim != 1:
            return None
        return [x if isinstance(x, str) else int(x) for x in arr.tolist()]

    def _complete_shapes(self, node: ir.Node) -> None:
        """Fill the unknown dims (``?``) of ``node``'s output from its inputs' shapes.

        The dynamo exporter records most shapes, but not those of values reshaped to
        targets computed at run time (``Reshape(k, Concat([-1], Shape(k)[2:]))`` of an
        opset-18 attention): ONNX shape inference cannot resolve a ``-1`` next to a
        symbolic dim. Here dims are products of symbols (``4*batch``), so it can."""
        if len(node.outputs) != 1 or _domain(node.domain) != "" or not node.outputs[0].name:
            return
        out = node.outputs[0]
        have = self.shape(out)
        if have is not None and not any(_unknown(d) for d in have):
            return
        try:
            got = _infer_shape(node, self)
        except (TypeError, ValueError, IndexError, KeyError):
            got = None
        if got is None or (have is not None and len(have) != len(got)):
            return
        if have is not None:
            got = tuple(g if _unknown(h) else h for h, g in zip(have, got))
        self.inferred[id(out)] = tuple(got)

    # -- nodes -----------------------------------------------------------------------------
    def _lower_sequence(self, node: ir.Node, index: int) -> bool:
        """SplitToSequence read back only by SequenceAt at constant positions: a SPLIT."""
        ctx = _Ctx(self, node)
        if node.op_type == "SequenceAt":
            parts = self.seq_parts.get(id(node.inputs[0]))
            pos = ctx.const(1)
            if parts is None or pos is None or pos.size != 1:
                return False
            part = parts[int(pos.reshape(-1)[0])]
            out = node.outputs[0]
            ir_node = self.graph.add_node(self._node_name(node, index), OpKind.IDENTITY,
                                          _op_name(node), [part],
                                          [(self._unique(out.name), part.shape, part.dtype)])
            self.env[id(out)] = ir_node.outputs[0]
            return True
        seq, shape = node.outputs[0], ctx.in_shape(0)
        if shape is None or any(u.node.op_type != "SequenceAt" or u.idx != 0 or
                                id(u.node.inputs[1]) not in self.consts for u in seq.uses()):
            return False
        axis = ctx.attr("axis", 0)
        axis = axis + len(shape) if axis < 0 else axis
        size = shape[axis]
        split = ctx.const(1) if len(node.inputs) > 1 and node.inputs[1] is not None else None
        if not isinstance(size, int) or (split is None and len(node.inputs) > 1
                                         and node.inputs[1] is not None):
            return False
        if split is None:
            if not ctx.attr("keepdims", 1):
                return False
            sizes = [1] * size
        elif split.ndim == 0:
            step = int(split)
            sizes = [min(step, size - lo) for lo in range(0, size, step)]
        else:
            sizes = [int(x) for x in split.reshape(-1)]
        if sum(sizes) != size:
            return False
        dtype = _dtype_str(node.inputs[0].dtype)
        outs = [(self._unique(f"{seq.name}.{i}"),
                 tuple(n if d == axis else shape[d] for d in range(len(shape))), dtype)
                for i, n in enumerate(sizes)]
        ir_node = self.graph.add_node(self._node_name(node, index), OpKind.SPLIT, _op_name(node),
                                      [ctx.inp(0)], outs, {"axis": axis, "sizes": sizes})
        self.seq_parts[id(seq)] = ir_node.outputs
        return True

    def _captured(self, node: ir.Node) -> list[Value]:
        seen: dict[int, Value] = {}
        bodies = []
        for a in node.attributes.values():
            if a.type == ir.AttributeType.GRAPH:
                bodies.append(a.value)
            elif a.type == ir.AttributeType.GRAPHS:
                bodies.extend(a.value)
        inner_nodes = [n for body in bodies for n in ir.traversal.RecursiveGraphIterator(body)]
        for inner in inner_nodes:
            for v in inner.inputs:
                if v is not None and id(v) not in seen and (
                        id(v) in self.env or id(v) in self.storages):
                    ir_value = self.value_of(v)
                    if ir_value is not None:
                        seen[id(v)] = ir_value
        return list(seen.values())

    def _lower(self, node: ir.Node, index: int) -> None:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            out = node.outputs[0]
            if id(out) in self.param_of_storage:
                return  # a weight: the parameter stands in for it
            if id(out) in self.consts or id(out) in self.storages:
                arr = self.consts.get(id(out))
                if arr is None:
                    arr = self.storages[id(out)].array()
                ir_node = self.graph.add_node(
                    self._node_name(node, index), OpKind.SOURCE, "Constant", [],
                    [(self._unique(out.name), tuple(arr.shape), str(arr.dtype))])
                if arr.size <= CONST_MAX_ELEMENTS:
                    ir_node.outputs[0].const = _pylist(arr)
                self.env[id(out)] = ir_node.outputs[0]
                return
        if node.op_type in ("SplitToSequence", "SequenceAt") and _domain(node.domain) == "":
            if self._lower_sequence(node, index):
                return
        folded = _evaluate(node, self.consts, self.shape)
        if folded is None:
            sym = _evaluate_symbolic(node, self.consts, self.symbolic, self.shape)
            if sym is not None:
                self.symbolic[id(node.outputs[0])] = sym
        self._complete_shapes(node)
        ctx = _Ctx(self, node)
        if folded is not None:
            kind, inputs, attrs = OpKind.SOURCE, [], {"folded": True}
        elif any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
                 for a in node.attributes.values()):
            # control flow: a barrier over its inputs and every outer value its bodies read
            kind, attrs = OpKind.UNKNOWN, {"why": "subgraphs are not imported"}
            inputs = ctx.all_inputs() + self._captured(node)
        else:
            if _domain(node.domain) == "com.microsoft" and node.outputs and node.outputs[0].name:
                shape = _contrib_out_shape(ctx)
                if shape is not None:
                    _set_shape(ctx, 0, shape)
            conv = CONVERTERS.get((_domain(node.domain), node.op_type))
            kind, inputs, attrs = OpKind.UNKNOWN, None, {}
            if conv is not None:
                try:
                    kind, inputs, attrs = conv(ctx)
                except (_Unsupported, TypeError, ValueError, IndexError, KeyError,
                        AttributeError) as e:
                    kind, inputs, attrs = OpKind.UNKNOWN, None, {"why": str(e)}
            if inputs is None:
                inputs = ctx.all_inputs()
        # an output that is one of the values the converter emitted (e.g. the residual sum
        # a SkipLayerNormalization also returns): its readers read that value
        aliases = attrs.pop("_aliases", {}) if isinstance(attrs, dict) else {}
        outs = [(self._unique(o.name or f"{node.name}.out{i}"),
                 self.shape(o) if o.name else None, _dtype_str(o.dtype) if o.name else None)
                for i, o in enumerate(node.outputs)]
        if kind not in (OpKind.SOURCE, OpKind.NOOP, OpKind.UNKNOWN) and (
                any(v is not None and v.shape is None for v in inputs)
                or (outs and outs[0][1] is None)):
            kind, attrs, aliases = OpKind.UNKNOWN, {"why": "shapes unknown"}, {}
        md = _meta(node)
        scopes = _parse_list(md.get(SCOPES_KEY))
        meta = {"module": str(scopes[-2]) if len(scopes) >= 2 else "", "domain": node.domain}
        ir_node = self.graph.add_node(self._node_name(node, index), kind,
                                      _op_name(node), inputs, outs, attrs, meta)
        for i, o in enumerate(node.outputs):
            self.env[id(o)] = aliases.get(i, ir_node.outputs[i])
            if folded is not None and i < len(folded) and folded[i] is not None:
                self.consts[id(o)] = folded[i]
                if folded[i].size <= CONST_MAX_ELEMENTS:
                    ir_node.outputs[i].const = _pylist(folded[i])
        if kind is OpKind.TRANSPOSE or kind is OpKind.IDENTITY:
            src = ctx.param_at(0)
            if src is not None and inputs and inputs[0] is not None:
                param, perm = src
                tperm = tuple(attrs.get("perm", _identity(len(perm))))
                self.views[id(ir_node.outputs[0])] = (param, tuple(perm[p] for p in tperm))


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


class _Unsupported(Exception):
    """A converter's assumptions do not hold: the node becomes UNKNOWN."""


class _Ctx:
    """What a converter sees: the ONNX node and the IR values of its inputs."""

    def __init__(self, imp: _Importer, node: ir.Node) -> None:
        self.imp = imp
        self.node = node

    @property
    def n_inputs(self) -> int:
        return len(self.node.inputs)

    def inp(self, i: int) -> Value | None:
        if i >= len(self.node.inputs):
            return None
        return self.imp.value_of(self.node.inputs[i], (id(self.node), i))

    def all_inputs(self) -> list[Value | None]:
        return [self.inp(i) for i in range(len(self.node.inputs))]

    def param_at(self, i: int):
        return self.imp.param_at(self.node, i)

    def const(self, i: int) -> np.ndarray | None:
        if i >= len(self.node.inputs) or self.node.inputs[i] is None:
            return None
        return self.imp.consts.get(id(self.node.inputs[i]))

    def attr(self, name: str, default=None):
        return _attr(self.node, name, default)

    def rank(self, i: int) -> int | None:
        v = self.node.inputs[i] if i < len(self.node.inputs) else None
        s = self.imp.shape(v)
        return None if s is None else len(s)

    def in_shape(self, i: int):
        return self.imp.shape(self.node.inputs[i]) if i < len(self.node.inputs) else None

    def out_shape(self, i: int = 0):
        return self.imp.shape(self.node.outputs[i])

    def emit(self, kind: OpKind, inputs: list, shape, dtype, attrs=None) -> Value:
        """An extra IR node before this one (e.g. the LINEAR part of a Gemm with a 2-D C)."""
        base = self.node.name or self.node.op_type
        name = self.imp._unique(f"{base}.{kind.value}")
        n = self.imp.graph.add_node(self.imp._node_name_str(f"{base}:{kind.value}"), kind,
                                    _op_name(self.node), inputs, [(name, shape, dtype)],
                                    attrs or {})
        return n.outputs[0]


# -- converters --------------------------------------------------------------------------

Converted = tuple[OpKind, list[Any] | None, dict[str, Any]]


def _all(kind: OpKind) -> Callable[[_Ctx], Converted]:
    def conv(ctx: _Ctx) -> Converted:
        return kind, ctx.all_inputs(), {}

    return conv


def _first(kind: OpKind) -> Callable[[_Ctx], Converted]:
    def conv(ctx: _Ctx) -> Converted:
        return kind, [ctx.inp(0)], {}

    return conv


def _with_const(kind: OpKind, attr: str) -> Callable[[_Ctx], Converted]:
    """``kind`` on input 0; the constant input 1 (a target shape, axes) kept as ``attr``."""

    def conv(ctx: _Ctx) -> Converted:
        c = ctx.const(1) if ctx.n_inputs > 1 else None
        if c is None and ctx.attr(attr) is not None:  # older opsets: an attribute
            c = np.asarray(ctx.attr(attr))
        return kind, [ctx.inp(0)], ({attr: _pylist(c)} if c is not None else {})

    return conv


def _linear_attrs(w: Value, perm: tuple[int, ...], transposed: bool) -> dict[str, int]:
    """dims of the original ``w`` that hold input (K) and output (N) channels."""
    k, n = (1, 0) if transposed else (0, 1)
    return {"w_in": perm[k], "w_out": perm[n]}


def _matmul(ctx: _Ctx) -> Converted:
    a = ctx.inp(0)
    p = ctx.param_at(1)
    if p is not None and p[0].rank == 2 and (ctx.rank(0) or 0) >= 1:
        w, perm = p
        return OpKind.LINEAR, [a, w], _linear_attrs(w, perm, False)
    return OpKind.MATMUL, [a, ctx.inp(1)], {}


def _gemm(ctx: _Ctx) -> Converted:
    if ctx.attr("transA", 0):
        raise _Unsupported("Gemm with transA")
    trans_b = bool(ctx.attr("transB", 0))
    a = ctx.inp(0)
    c = ctx.inp(2) if ctx.n_inputs > 2 else None
    p = ctx.param_at(1)
    if p is None or p[0].rank != 2:
        if trans_b or c is not None:
            raise _Unsupported("Gemm without a weight parameter")
        return OpKind.MATMUL, [a, ctx.inp(1)], {}
    w, perm = p
    attrs = _linear_attrs(w, perm, trans_b)
    if c is None or c.rank == 1:
        return OpKind.LINEAR, [a, w, c], attrs
    out = ctx.node.outputs[0]
    y = ctx.emit(OpKind.LINEAR, [a, w], ctx.out_shape(0), _dtype_str(out.dtype), attrs)
    return OpKind.ELEMENTWISE, [y, c], {}


def _norm(stat: str, n_params: int) -> Callable[[_Ctx], Converted]:
    def conv(ctx: _Ctx) -> Converted:
        rank = ctx.rank(0)
        if rank is None:
            raise _Unsupported("input rank unknown")
        axis = ctx.attr("axis", -1)
        axis = axis + rank if axis < 0 else axis
        axes = list(range(axis - rank, 0))
        ins = [ctx.inp(0)] + [ctx.inp(i) for i in range(1, 1 + n_params)]
        return OpKind.NORM, ins, {"axes": axes, "stat": stat}

    return conv


def _reduction(op: str) -> Callable[[_Ctx], Converted]:
    def conv(ctx: _Ctx) -> Converted:
        keep = bool(ctx.attr("keepdims", 1))
        axes = ctx.attr("axes")
        if axes is None and ctx.n_inputs > 1 and ctx.node.inputs[1] is not None:
            c = ctx.const(1)
            if c is None:
                raise _Unsupported("reduction axes are not constant")
            axes = c.reshape(-1).tolist()
        axes = list(axes) if axes is not None else []
        if not axes:
            if ctx.attr("noop_with_empty_axes", 0):
                return OpKind.IDENTITY, [ctx.inp(0)], {}
            axes = None
        return OpKind.REDUCTION, [ctx.inp(0)], {"axes": axes, "keepdim": keep, "op": op}

    return conv


def _arg_reduction(op: str) -> Callable[[_Ctx], Converted]:
    def conv(ctx: _Ctx) -> Converted:
        keep = bool(ctx.attr("keepdims", 1))
        return OpKind.REDUCTION, [ctx.inp(0)], {"axes": [ctx.attr("axis", 0)], "keepdim": keep,
                                                "op": op}

    return conv


def _softmax(ctx: _Ctx) -> Converted:
    rank = ctx.rank(0)
    axis = ctx.attr("axis", -1 if ctx.imp.opset >= 13 else 1)
    if ctx.imp.opset < 13 and rank is not None and (axis % max(rank, 1)) != rank - 1:
        raise _Unsupported("opset < 13 softmax flattens to 2-D")
    return OpKind.SOFTMAX, [ctx.inp(0)], {"axis": axis}


def _gather(ctx: _Ctx) -> Converted:
    axis = ctx.attr("axis", 0)
    p = ctx.param_at(0)
    rank_idx = ctx.rank(1)
    if p is not None and axis % 2 == 0 and p[0].rank == 2 and p[1] == (0, 1):
        return OpKind.EMBEDDING, [p[0], ctx.inp(1)], {}
    c = ctx.const(1)
    if rank_idx == 0 and c is not None:
        return OpKind.SELECT, [ctx.inp(0)], {"axis": axis}
    raise _Unsupported("gather with non-scalar indices")


def _transpose(ctx: _Ctx) -> Converted:
    rank = ctx.rank(0)
    perm = ctx.attr("perm")
    if perm is None:
        if rank is None:
            raise _Unsupported("rank unknown")
        perm = list(range(rank))[::-1]
    return OpKind.TRANSPOSE, [ctx.inp(0)], {"perm": [int(p) for p in perm]}


def _concat(ctx: _Ctx) -> Converted:
    return OpKind.CONCAT, ctx.all_inputs(), {"axis": ctx.attr("axis")}


def _split(ctx: _Ctx) -> Converted:
    axis = ctx.attr("axis", 0)
    shape = ctx.in_shape(0)
    if shape is None:
        raise _Unsupported("shape unknown")
    sizes = None
    c = ctx.const(1) if ctx.n_inputs > 1 and ctx.node.inputs[1] is not None else None
    if c is not None:
        sizes = [int(x) for x in c.reshape(-1)]
    elif ctx.attr("split") is not None:
        sizes = [int(x) for x in ctx.attr("split")]
    else:
        outs = [ctx.out_shape(i) for i in range(len(ctx.node.outputs))]
        if all(o is not None and isinstance(o[axis], int) for o in outs):
            sizes = [o[axis] for o in outs]
    if sizes is None or len(sizes) != len(ctx.node.outputs):
        raise _Unsupported("split sizes unknown")
    return OpKind.SPLIT, [ctx.inp(0)], {"axis": axis, "sizes": sizes}


def _slice(ctx: _Ctx) -> Converted:
    shape = ctx.in_shape(0)
    if shape is None:
        raise _Unsupported("shape unknown")
    if ctx.imp.opset < 10:
        starts, ends, axes = ctx.attr("starts"), ctx.attr("ends"), ctx.attr("axes")
        steps = None
    else:
        starts, ends = ctx.const(1), ctx.const(2)
        axes = ctx.const(3) if ctx.n_inputs > 3 and ctx.node.inputs[3] is not None else None
        steps = ctx.const(4) if ctx.n_inputs > 4 and ctx.node.inputs[4] is not None else None
        if starts is None or ends is None or (
                ctx.n_inputs > 3 and ctx.node.inputs[3] is not None and axes is None) or (
                ctx.n_inputs > 4 and ctx.node.inputs[4] is not None and steps is None):
            raise _Unsupported("slice bounds are not constant")
    starts = [int(x) for x in np.reshape(starts, -1)]
    ends = [int(x) for x in np.reshape(ends, -1)]
    axes = [int(x) for x in np.reshape(axes, -1)] if axes is not None else list(range(len(starts)))
    steps = [int(x) for x in np.reshape(steps, -1)] if steps is not None else [1] * len(starts)
    rank = len(shape)
    real = []
    for ax, st, en, sp in zip(axes, starts, ends, steps, strict=True):
        ax = ax + rank if ax < 0 else ax
        size = shape[ax]
        full = sp == 1 and (st == 0 or (isinstance(size, int) and st <= -size)) and (
            isinstance(size, int) and en >= size)
        if not full:
            real.append((ax, st, en, sp))
    if not real:
        return OpKind.IDENTITY, [ctx.inp(0)], {}
    if len(real) > 1:
        raise _Unsupported("slice along several axes")
    ax, st, en, sp = real[0]
    if sp < 1:
        raise _Unsupported("slice with a negative step")
    size = shape[ax]
    if isinstance(size, int):
        en = min(en, size)
        st = max(st, -size)
    return OpKind.SLICE, [ctx.inp(0)], {"axis": ax, "start": st, "end": en, "step": sp}


def _attention(ctx: _Ctx) -> Converted:
    ranks = [ctx.rank(i) for i in range(3)]
    if ranks != [4, 4, 4]:
        raise _Unsupported("attention inputs are not [B, H, L, E]")
    if any(i < ctx.n_inputs and ctx.node.inputs[i] is not None for i in (4, 5, 6)):
        raise _Unsupported("attention with a KV cache or padding lengths")
    q, k = ctx.in_shape(0), ctx.in_shape(1)
    mask = ctx.inp(3) if ctx.n_inputs > 3 else None
    return OpKind.ATTENTION, [ctx.inp(0), ctx.inp(1), ctx.inp(2), mask], {"gqa": q[1] != k[1]}


def _rotary(ctx: _Ctx) -> Converted:
    """``RotaryEmbedding`` (opset 23): elementwise over its input, but rotating pairs of
    channels within each head (``i`` with ``i + r/2``, or ``2i`` with ``2i + 1`` when
    interleaved). Emitted as what it computes on channels -- slices, the swapped halves
    concatenated, an elementwise op -- so the analysis couples the rotated channels as it
    does on the opset-18 decomposition. A 3-D input ``[B, S, H*D]`` is viewed as
    ``[B, S, H, D]`` (``num_heads``). The cos/sin caches and position ids index
    positions, not channels, and are left out."""
    shape = ctx.in_shape(0)
    if shape is None or len(shape) not in (3, 4):
        raise _Unsupported("rotary input is not [B, H, S, D] or [B, S, H*D]")
    dtype = _dtype_str(ctx.node.inputs[0].dtype)
    x = ctx.inp(0)
    if len(shape) == 3:
        heads, hidden = ctx.attr("num_heads", 0), shape[2]
        if not heads or not isinstance(hidden, int) or hidden % heads:
            raise _Unsupported(f"3-D rotary input of size {hidden} with num_heads={heads}")
        lead = (shape[0], shape[1], heads)
        d = hidden // heads
        x = ctx.emit(OpKind.RESHAPE, [x], (*lead, d), dtype)
    else:
        lead, d = tuple(shape[:3]), shape[3]
    if not isinstance(d, int):
        raise _Unsupported("head size unknown")
    r = ctx.attr("rotary_embedding_dim", 0) or d
    _set_shape(ctx, 0, shape)
    y = _rotate(ctx, x, lead, d, r, bool(ctx.attr("interleaved", 0)), dtype)
    return (OpKind.RESHAPE if len(shape) == 3 else OpKind.IDENTITY), [y], {}


def _rotate(ctx: _Ctx, x: Value, lead: tuple, d: int, r: int, interleaved: bool,
            dtype) -> Value:
    """What a rotary embedding does to the channels of ``x`` (``[*lead, d]``, the last
    dim one head): the first ``r`` channels are rotated in pairs (``i`` with ``i + r/2``,
    or ``2i`` with ``2i + 1`` when interleaved), the rest pass through."""
    if r % 2 or r > d:
        raise _Unsupported(f"rotary dim {r} with head size {d}")
    k = len(lead)

    def part(v, axis, lo, hi, shp):
        return ctx.emit(OpKind.SLICE, [v], shp, dtype,
                        {"axis": axis, "start": lo, "end": hi, "step": 1})

    xr = x if r == d else part(x, k, 0, r, (*lead, r))
    if interleaved:
        pairs = ctx.emit(OpKind.RESHAPE, [xr], (*lead, r // 2, 2), dtype)
        a = part(pairs, k + 1, 0, 1, (*lead, r // 2, 1))
        b = part(pairs, k + 1, 1, 2, (*lead, r // 2, 1))
        swapped = ctx.emit(OpKind.CONCAT, [b, a], (*lead, r // 2, 2), dtype, {"axis": k + 1})
        rot = ctx.emit(OpKind.RESHAPE, [swapped], (*lead, r), dtype)
    else:
        a = part(xr, k, 0, r // 2, (*lead, r // 2))
        b = part(xr, k, r // 2, r, (*lead, r // 2))
        rot = ctx.emit(OpKind.CONCAT, [b, a], (*lead, r), dtype, {"axis": k})
    y = ctx.emit(OpKind.ELEMENTWISE, [xr, rot], (*lead, r), dtype)
    if r < d:
        y = ctx.emit(OpKind.CONCAT, [y, part(x, k, r, d, (*lead, d - r))], (*lead, d), dtype,
                     {"axis": k})
    return y


# -- com.microsoft ops written by ONNX Runtime's transformer optimizer ----------------------


def _present(ctx: _Ctx, i: int) -> bool:
    return i < ctx.n_inputs and ctx.node.inputs[i] is not None


def _output_used(ctx: _Ctx, i: int) -> bool:
    if i >= len(ctx.node.outputs):
        return False
    o = ctx.node.outputs[i]
    return bool(o.name) and (bool(o.uses()) or o in ctx.imp.g.outputs)


def _set_shape(ctx: _Ctx, i: int, shape: tuple) -> None:
    """Record the shape of output ``i`` where the file leaves it (partly) unknown: ONNX
    shape inference does not know com.microsoft ops."""
    out = ctx.node.outputs[i]
    have = ctx.imp.shape(out)
    if have is None or len(have) != len(shape) or any(_unknown(d) for d in have):
        ctx.imp.inferred[id(out)] = tuple(shape)


def _contrib_out_shape(ctx: _Ctx) -> tuple | None:
    """Output 0's shape of a com.microsoft attention / fused-norm op, from its inputs and
    attributes (ONNX shape inference does not know these ops). Recorded even when the
    converter refuses the node, so the graph after a barrier keeps its shapes (its MLPs
    stay prunable)."""
    op, x = ctx.node.op_type, ctx.in_shape(0)
    if x is None:
        return None
    if op in ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "BiasGelu",
              "FastGelu"):
        return x
    if len(x) != 3:
        return None
    if op == "Attention":
        w = ctx.in_shape(1)
        sizes = ctx.attr("qkv_hidden_sizes")
        v = int(sizes[2]) if sizes else (w[1] // 3 if w and isinstance(w[1], int) else None)
        return None if v is None else (x[0], x[1], v)
    if op == "MultiHeadAttention":
        v = ctx.in_shape(2) if _present(ctx, 2) else None
        if v is not None and len(v) == 3:
            return (x[0], x[1], v[2])
        if v is not None and len(v) == 4 and isinstance(v[1], int) and isinstance(v[3], int):
            return (x[0], x[1], v[1] * v[3])
        return None
    if op == "GroupQueryAttention":
        n, kv = ctx.attr("num_heads", 0), ctx.attr("kv_num_heads", 0)
        k = ctx.in_shape(1) if _present(ctx, 1) else None
        if k is not None and len(k) == 3 and isinstance(k[2], int) and kv:
            return (x[0], x[1], n * (k[2] // kv))
        if k is None and isinstance(x[2], int) and n + 2 * kv:
            return (x[0], x[1], n * (x[2] // (n + 2 * kv)))
    return None


def _skip_norm(stat: str) -> Callable[[_Ctx], Converted]:
    """``SkipLayerNormalization`` (inputs ``x, skip, gamma, beta?, bias?``) and
    ``SkipSimplifiedLayerNormalization`` (``x, skip, gamma, bias?``): the residual add
    ``x + skip + bias`` (an ELEMENTWISE, which output 3 returns when it is used), then
    the norm over the last dim (outputs 1 and 2, mean and inverse std, are statistics)."""

    def conv(ctx: _Ctx) -> Converted:
        shapes = [ctx.in_shape(0), ctx.in_shape(1)]
        if any(s is None for s in shapes):
            raise _Unsupported("input shapes unknown")
        bias_at = 4 if stat == "layer" else 3
        adds = [ctx.inp(0), ctx.inp(1)] + ([ctx.inp(bias_at)] if _present(ctx, bias_at) else [])
        shape = _broadcast_dims(shapes)
        if shape is None:
            raise _Unsupported(f"input and skip shapes {shapes[0]} / {shapes[1]} do not broadcast")
        dtype = _dtype_str(ctx.node.inputs[0].dtype)
        total = ctx.emit(OpKind.ELEMENTWISE, adds, shape, dtype)
        _set_shape(ctx, 0, shape)
        params = [ctx.inp(2)] + ([ctx.inp(3)] if stat == "layer" and _present(ctx, 3) else [])
        aliases = {}
        if _output_used(ctx, 3):
            aliases[3] = total
            _set_shape(ctx, 3, shape)
        if _output_used(ctx, 1) or _output_used(ctx, 2):
            raise _Unsupported("the mean / inverse std outputs are used")
        return OpKind.NORM, [total, *params], {"axes": [-1], "stat": stat, "_aliases": aliases}

    return conv


def _embed_layer_norm(ctx: _Ctx) -> Converted:
    """com.microsoft ``EmbedLayerNormalization``: word + position (+ segment) embedding
    lookups summed (output 2, when used) and layer-normed (output 0). The lookups are
    EMBEDDINGs (positions index their table as ids do); output 1, the mask index, is
    positions only."""
    ids = ctx.in_shape(0)
    word, pos = ctx.param_at(2), ctx.param_at(3)
    if ids is None or len(ids) != 2 or word is None or pos is None:
        raise _Unsupported("input_ids are not [B, S] or the tables are not initializers")
    if word[1] != (0, 1) or pos[1] != (0, 1):
        raise _Unsupported("embedding tables stored transposed")
    hidden = word[0].shape[1]
    shape = (ids[0], ids[1], hidden)
    dtype = word[0].dtype
    looked = [ctx.emit(OpKind.EMBEDDING, [word[0], ctx.inp(0)], shape, dtype),
              ctx.emit(OpKind.EMBEDDING, [pos[0], ctx.inp(8) if _present(ctx, 8) else ctx.inp(0)],
                       shape, dtype)]
    if _present(ctx, 1) and _present(ctx, 4):
        seg = ctx.param_at(4)
        if seg is None or seg[1] != (0, 1):
            raise _Unsupported("the segment table is not an initializer")
        looked.append(ctx.emit(OpKind.EMBEDDING, [seg[0], ctx.inp(1)], shape, dtype))
    total = ctx.emit(OpKind.ELEMENTWISE, looked, shape, dtype)
    _set_shape(ctx, 0, shape)
    aliases = {}
    if _output_used(ctx, 2):
        aliases[2] = total
        _set_shape(ctx, 2, shape)
    if _output_used(ctx, 1):
        _set_shape(ctx, 1, (ids[0],))
    return OpKind.NORM, [total, ctx.inp(5), ctx.inp(6)], {"axes": [-1], "stat": "layer",
                                                          "_aliases": aliases}


def _bias_gelu(ctx: _Ctx) -> Converted:
    """``BiasGelu`` / ``FastGelu`` with a bias: ``gelu(x + bias)``."""
    if not _present(ctx, 1):
        return OpKind.ACTIVATION, [ctx.inp(0)], {}
    shape = ctx.in_shape(0)
    if shape is None:
        raise _Unsupported("input shape unknown")
    _set_shape(ctx, 0, shape)
    dtype = _dtype_str(ctx.node.inputs[0].dtype)
    x = ctx.emit(OpKind.ELEMENTWISE, [ctx.inp(0), ctx.inp(1)], shape, dtype)
    return OpKind.ACTIVATION, [x], {}


def _head_size(size, heads: int, what: str) -> int:
    if not heads or not isinstance(size, int) or size % heads:
        raise _Unsupported(f"{what} size {size} is not a multiple of {heads} heads")
    return size // heads


def _multi_head(ctx: _Ctx, q: Value, k: Value, v: Value, n_q: int, n_kv: int,
                rotary: tuple[int, bool] | None = None) -> Converted:
    """Attention over 3-D ``q`` ``[B, S, n_q*d]`` and ``k`` / ``v`` ``[B, L, n_kv*d]``:
    each viewed as ``[B, heads, S, d]`` (reshape, transpose), ATTENTION (``gqa`` when
    ``n_kv < n_q``), back to ``[B, S, n_q*dv]`` -- the node's output. ``rotary`` =
    ``(rotary dim, interleaved)`` rotates the heads of ``q`` and ``k`` first."""
    b, s = q.shape[0], q.shape[1]
    length = k.shape[1]
    dq = _head_size(q.shape[2], n_q, "query")
    dk = _head_size(k.shape[2], n_kv, "key")
    dv = _head_size(v.shape[2], n_kv, "value")
    if dq != dk:
        raise _Unsupported(f"query head size {dq} != key head size {dk}")
    if n_q % n_kv:
        raise _Unsupported(f"{n_q} query heads are not a multiple of {n_kv} KV heads")
    dtype = q.dtype
    perm = [0, 2, 1, 3]

    def heads(x, n, d, seq, rotate):
        x = ctx.emit(OpKind.RESHAPE, [x], (b, seq, n, d), dtype)
        if rotate and rotary is not None:
            x = _rotate(ctx, x, (b, seq, n), d, rotary[0] or d, rotary[1], dtype)
        return ctx.emit(OpKind.TRANSPOSE, [x], (b, n, seq, d), dtype, {"perm": perm})

    qh, kh, vh = heads(q, n_q, dq, s, True), heads(k, n_kv, dk, length, True), \
        heads(v, n_kv, dv, length, False)
    att = ctx.emit(OpKind.ATTENTION, [qh, kh, vh, None], (b, n_q, s, dv), dtype,
                   {"gqa": n_q != n_kv})
    back = ctx.emit(OpKind.TRANSPOSE, [att], (b, s, n_q, dv), dtype, {"perm": perm})
    _set_shape(ctx, 0, (b, s, n_q * dv))
    return OpKind.RESHAPE, [back], {}


def _split_last(ctx: _Ctx, x: Value, sizes: list[int]) -> list[Value]:
    """``x`` ``[B, S, sum(sizes)]`` split along its last dim (a packed QKV projection)."""
    outs = [(ctx.imp._unique(f"{ctx.node.name or ctx.node.op_type}.qkv{i}"),
             (*x.shape[:-1], n), x.dtype) for i, n in enumerate(sizes)]
    node = ctx.imp.graph.add_node(ctx.imp._node_name_str(f"{ctx.node.name}:split"),
                                  OpKind.SPLIT, _op_name(ctx.node), [x], outs,
                                  {"axis": x.rank - 1, "sizes": list(sizes)})
    return list(node.outputs)


def _no_head_bias(ctx: _Ctx, i: int, what: str) -> None:
    """An additive attention bias ``[B or 1, N or 1, S, L]``: per head unless dim 1 is 1."""
    if not _present(ctx, i):
        return
    shape = ctx.in_shape(i)
    if shape is None or len(shape) != 4 or shape[1] != 1:
        raise _Unsupported(f"{what} {list(shape) if shape else '?'} is per head")


def _ms_attention(ctx: _Ctx) -> Converted:
    """com.microsoft ``Attention``: ``x`` ``[B, S, D]`` times the packed QKV weight
    ``[D, Hq + Hk + Hv]`` (``qkv_hidden_sizes``, else three equal sections) plus the bias,
    split into the q / k / v sections of ``num_heads`` heads each: a LINEAR, a SPLIT and
    :func:`_multi_head`. The mask (``mask_index``, positions only) is left out. Refused
    (a barrier): a past / present KV cache, ``attention_bias`` per head, ``do_rotary``,
    a weight that is not an initializer, input that is not 3-D."""
    n = ctx.attr("num_heads", 0)
    if _present(ctx, 4) or _present(ctx, 6) or _output_used(ctx, 1):
        raise _Unsupported("Attention with a past / present KV cache")
    _no_head_bias(ctx, 5, "attention_bias")
    if ctx.attr("do_rotary", 0):
        raise _Unsupported("Attention with do_rotary")
    shape = ctx.in_shape(0)
    p = ctx.param_at(1)
    if shape is None or len(shape) != 3:
        raise _Unsupported("input is not [B, S, D]")
    if p is None or p[0].rank != 2:
        raise _Unsupported("the QKV weight is not an initializer")
    w, perm = p
    total = int(w.shape[perm[1]])
    sizes = [int(x) for x in (ctx.attr("qkv_hidden_sizes") or [])] or [total // 3] * 3
    if len(sizes) != 3 or sum(sizes) != total or sizes[0] != sizes[1]:
        raise _Unsupported(f"qkv sections {sizes} of a {total}-wide weight")
    bias = ctx.inp(2) if _present(ctx, 2) else None
    qkv = ctx.emit(OpKind.LINEAR, [ctx.inp(0), w, bias], (shape[0], shape[1], total),
                   _dtype_str(ctx.node.inputs[0].dtype), _linear_attrs(w, perm, False))
    q, k, v = _split_last(ctx, qkv, sizes)
    return _multi_head(ctx, q, k, v, n, n)


def _mha(ctx: _Ctx) -> Converted:
    """com.microsoft ``MultiHeadAttention`` with 3-D ``query`` / ``key`` / ``value``
    ``[B, S, N*H]`` and an optional packed bias ``[Hq + Hk + Hv]`` (added to each before
    the heads are formed). The padding mask is left out. Refused (a barrier): packed or
    4-D key / value, a per-head ``attention_bias``, past / present KV."""
    n = ctx.attr("num_heads", 0)
    if not all(_present(ctx, i) and ctx.rank(i) == 3 for i in range(3)):
        raise _Unsupported("query, key and value are not all [B, S, N*H]")
    if _present(ctx, 6) or _present(ctx, 7) or _output_used(ctx, 1) or _output_used(ctx, 2) \
            or _output_used(ctx, 3):
        raise _Unsupported("MultiHeadAttention with a past / present KV cache or qk output")
    if any(_present(ctx, i) for i in range(8, ctx.n_inputs)):
        raise _Unsupported("MultiHeadAttention with cache indirection / past sequence length")
    _no_head_bias(ctx, 5, "attention_bias")
    q, k, v = ctx.inp(0), ctx.inp(1), ctx.inp(2)
    if _present(ctx, 3):
        sizes = [int(q.shape[2]), int(k.shape[2]), int(v.shape[2])]
        b = ctx.inp(3)
        if b.rank != 1 or b.shape[0] != sum(sizes):
            raise _Unsupported(f"bias {list(b.shape)} for q / k / v of {sizes}")
        parts = _split_last(ctx, b, sizes)
        q, k, v = (ctx.emit(OpKind.ELEMENTWISE, [x, part], x.shape, x.dtype)
                   for x, part in zip((q, k, v), parts))
    return _multi_head(ctx, q, k, v, n, n)


def _gqa(ctx: _Ctx) -> Converted:
    """com.microsoft ``GroupQueryAttention``: ``query`` ``[B, S, num_heads*H]`` with
    ``key`` / ``value`` ``[B, S, kv_num_heads*H]``, or packed QKV in ``query`` (no key
    and value): a SPLIT, then :func:`_multi_head` with GQA. ``do_rotary`` rotates q and
    k per head (rotary dim from the cos cache). ``seqlens_k`` / ``total_sequence_length``
    are positions. Refused (a barrier): a past KV cache given, present outputs used,
    ``attention_bias`` per head, ``head_sink``, ``position_ids`` of packed batching."""
    n, n_kv = ctx.attr("num_heads", 0), ctx.attr("kv_num_heads", 0)
    if _present(ctx, 3) or _present(ctx, 4) or _output_used(ctx, 1) or _output_used(ctx, 2) \
            or _output_used(ctx, 3):
        raise _Unsupported("GroupQueryAttention with a past / present KV cache")
    _no_head_bias(ctx, 10, "attention_bias")
    if _present(ctx, 11):
        raise _Unsupported("GroupQueryAttention with head_sink (one value per head)")
    shape = ctx.in_shape(0)
    if shape is None or len(shape) != 3 or not isinstance(shape[2], int):
        raise _Unsupported("query is not [B, S, N*H]")
    if _present(ctx, 1) != _present(ctx, 2):
        raise _Unsupported("only one of key / value given")
    if _present(ctx, 1):
        if ctx.rank(1) != 3 or ctx.rank(2) != 3:
            raise _Unsupported("key / value are not [B, S, N*H]")
        q, k, v = ctx.inp(0), ctx.inp(1), ctx.inp(2)
    else:
        if not n or not n_kv or shape[2] % (n + 2 * n_kv):
            raise _Unsupported(f"packed QKV of size {shape[2]} for {n} + 2 x {n_kv} heads")
        d = shape[2] // (n + 2 * n_kv)
        q, k, v = _split_last(ctx, ctx.inp(0), [n * d, n_kv * d, n_kv * d])
    rotary = None
    if ctx.attr("do_rotary", 0):
        cos = ctx.in_shape(7)
        if cos is None or len(cos) != 2 or not isinstance(cos[1], int):
            raise _Unsupported("do_rotary without a [max_seq, rotary_dim / 2] cos cache")
        rotary = (2 * int(cos[1]), bool(ctx.attr("rotary_interleaved", 0)))
    return _multi_head(ctx, q, k, v, n, n_kv, rotary)


def _dropout(ctx: _Ctx) -> Converted:
    return OpKind.IDENTITY, [ctx.inp(0)], {}


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


# -- folding small constants -------------------------------------------------------------


def _np_slice(x, starts, ends, axes=None, steps=None):
    axes = list(range(len(starts))) if axes is None else [int(a) for a in axes]
    steps = [1] * len(starts) if steps is None else [int(s) for s in steps]
    index = [slice(None)] * x.ndim
    for a, s, e, st in zip(axes, starts, ends, steps, strict=True):
        index[a] = slice(int(s), int(e), st)
    return x[tuple(index)]


def _np_squeeze(x, axes=None):
    return np.squeeze(x, axis=tuple(int(a) for a in axes)) if axes is not None else np.squeeze(x)


def _np_unsqueeze(x, axes):
    out = x
    rank = x.ndim + len(axes)
    for a in sorted(int(a) % rank for a in axes):
        out = np.expand_dims(out, a)
    return out


def _np_reshape(x, shape, allowzero=0):
    shape = [int(s) for s in shape]
    if not allowzero:
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


_NP_BINARY = {
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Equal": np.equal,
    "Less": np.less, "Greater": np.greater, "LessOrEqual": np.less_equal,
    "GreaterOrEqual": np.greater_equal, "And": np.logical_and, "Or": np.logical_or,
    "Max": np.maximum, "Min": np.minimum, "Mod": np.mod,
}


def _evaluate(node: ir.Node, consts: dict[int, np.ndarray], shape_of) -> list | None:
    """Outputs of ``node`` when it only computes on small constants (shape arithmetic)."""
    if _domain(node.domain) != "" or len(node.outputs) != 1:
        return None
    op = node.op_type
    ins = node.inputs
    if op == "Shape":
        s = shape_of(ins[0]) if ins else None
        if s is None or not all(isinstance(d, int) for d in s):
            return None
        start, end = _attr(node, "start", 0), _attr(node, "end", None)
        return [np.asarray(s[start:end], dtype=np.int64)]
    if op == "Size":
        s = shape_of(ins[0]) if ins else None
        if s is None or not all(isinstance(d, int) for d in s):
            return None
        return [np.asarray(int(np.prod(s)), dtype=np.int64)]
    vals = []
    for v in ins:
        if v is None:
            vals.append(None)
        elif id(v) in consts:
            vals.append(consts[id(v)])
        else:
            return None
    if not vals or vals[0] is None:
        return None
    try:
        x = vals[0]
        if op in ("Identity",):
            out = x
        elif op == "Cast":
            out = x.astype(ir.DataType(_attr(node, "to")).numpy())
        elif op == "CastLike":
            out = x.astype(vals[1].dtype)
        elif op == "Reshape":
            out = _np_reshape(x, vals[1], _attr(node, "allowzero", 0))
        elif op == "Unsqueeze":
            out = _np_unsqueeze(x, vals[1] if len(vals) > 1 else _attr(node, "axes"))
        elif op == "Squeeze":
            axes = vals[1] if len(vals) > 1 else _attr(node, "axes")
            out = _np_squeeze(x, axes)
        elif op == "Concat":
            out = np.concatenate([np.asarray(v) for v in vals], axis=_attr(node, "axis"))
        elif op == "Gather":
            out = np.take(x, vals[1], axis=_attr(node, "axis", 0))
        elif op == "Slice":
            out = _np_slice(x, *vals[1:])
        elif op in _NP_BINARY:
            out = _NP_BINARY[op](x, vals[1])
            if op in ("Max", "Min") and len(vals) > 2:
                for v in vals[2:]:
                    out = _NP_BINARY[op](out, v)
        elif op == "Div":
            out = x // vals[1] if np.issubdtype(x.dtype, np.integer) else x / vals[1]
        elif op == "Neg":
            out = -x
        elif op == "Not":
            out = np.logical_not(x)
        elif op == "Where":
            out = np.where(x, vals[1], vals[2])
        elif op == "Range":
            out = np.arange(x, vals[1], vals[2]).astype(x.dtype)
        elif op == "Expand":
            out = x * np.ones([int(d) for d in vals[1]], dtype=x.dtype)
        elif op == "ConstantOfShape":
            a = node.attributes.get("value")
            fill = a.value.numpy().reshape(-1)[0] if a is not None else np.float32(0)
            out = np.full([int(d) for d in x], fill, dtype=np.asarray(fill).dtype)
        else:
            return None
    except Exception:
        return None
    out = np.asarray(out)
    if out.size > CONST_MAX_ELEMENTS:
        return None
    return [out]



# -- shape tensors with symbolic entries, and shapes the file leaves unknown -------------

_SYMBOLIC_OPS = {"Shape", "Identity", "Cast", "Reshape", "Unsqueeze", "Squeeze", "Concat",
                 "Gather", "Slice"}


_FRESH_DIM_RE = re.compile(r"unk__\d+")  # the names ONNX shape inference invents


def _unknown(d) -> bool:
    """A dim whose size nothing tells: none in the file (``?value:i``), or a fresh name
    from ONNX shape inference, which names every dim it cannot compute."""
    return isinstance(d, str) and (d.startswith("?") or bool(_FRESH_DIM_RE.fullmatch(d)))


def _evaluate_symbolic(node: ir.Node, consts: dict[int, np.ndarray],
                       symbolic: dict[int, np.ndarray], shape_of) -> np.ndarray | None:
    """A shape tensor computed from dynamic dims: ``Shape`` of a value with symbolic
    dims, and the ops that only move its entries (slice, gather, concat, (un)squeeze,
    reshape, cast). Entries are ints and dim names (an object array). Arithmetic on
    dims (``Mul(batch, 4)``) is not followed: such a value stays unknown."""
    if _domain(node.domain) != "" or len(node.outputs) != 1 or node.op_type not in _SYMBOLIC_OPS:
        return None
    op, ins = node.op_type, node.inputs
    if op == "Shape":
        s = shape_of(ins[0]) if ins else None
        if s is None:
            return None
        start, end = _attr(node, "start", 0), _attr(node, "end", None)
        return np.asarray(list(s)[start:end], dtype=object)
    vals, any_symbolic = [], False
    for k, v in enumerate(ins):
        if v is None:
            vals.append(None)
        elif id(v) in symbolic and (k == 0 or op == "Concat"):  # data, not indices / axes
            vals.append(symbolic[id(v)])
            any_symbolic = True
        elif id(v) in consts:
            vals.append(consts[id(v)].astype(object) if op == "Concat" else consts[id(v)])
        else:
            return None
    if not any_symbolic:
        return None
    x = vals[0]
    try:
        if op == "Identity":
            out = x
        elif op == "Cast":
            if not np.issubdtype(ir.DataType(_attr(node, "to")).numpy(), np.integer):
                return None
            out = x
        elif op == "Reshape":
            out = x.reshape([int(s) for s in vals[1]])  # 0-D <-> 1-D; no 0 entries here
        elif op == "Unsqueeze":
            out = _np_unsqueeze(x, vals[1] if len(vals) > 1 else _attr(node, "axes"))
        elif op == "Squeeze":
            out = _np_squeeze(x, vals[1] if len(vals) > 1 else _attr(node, "axes"))
        elif op == "Concat":
            out = np.concatenate([np.asarray(v, dtype=object) for v in vals],
                                 axis=_attr(node, "axis"))
        elif op == "Gather":
            out = np.take(x, vals[1], axis=_attr(node, "axis", 0))
        else:  # Slice
            out = _np_slice(x, *vals[1:])
    except Exception:
        return None
    out = np.asarray(out, dtype=object)
    return out if out.ndim <= 1 else None


def _broadcast_dims(shapes: list) -> tuple | None:
    rank = max(len(s) for s in shapes)
    out = []
    for d in range(rank):
        sizes = {s[d - rank + len(s)] for s in shapes if d - rank + len(s) >= 0}
        sizes.discard(1)
        known = {x for x in sizes if not _unknown(x)}
        if len(known) > 1:
            return None  # e.g. two different symbols: the broadcast size is not known
        out.append(known.pop() if known else (sizes.pop() if sizes else 1))
    return tuple(out)


def _infer_shape(node: ir.Node, imp: "_Importer") -> tuple | None:
    """The output shape of a shape-preserving, broadcasting, transposing, reshaping or
    matmul node from its inputs (``None`` where it cannot be told)."""
    op = node.op_type
    shapes = [imp.shape(v) if v is not None else None for v in node.inputs]
    if op == "Reshape":
        x, target = shapes[0], imp.shape_tensor(node.inputs[1])
        if x is None or target is None:
            return None
        allowzero = bool(_attr(node, "allowzero", 0))
        dims = [x[k] if t == 0 and not allowzero else t for k, t in enumerate(target)]
        if dims.count(-1) > 1:
            return None
        if -1 in dims:
            k = dims.index(-1)
            dims[k] = symdims.divide(symdims.product(x),
                                     symdims.product(d for d in dims if d != -1))
            if dims[k] is None:
                return None
        return tuple(dims)
    if op == "Expand":
        target = imp.shape_tensor(node.inputs[1])
        if shapes[0] is None or target is None:
            return None
        return _broadcast_dims([shapes[0], tuple(target)])
    if op in ("Unsqueeze", "Squeeze") and shapes[0] is not None:
        axes = imp.consts.get(id(node.inputs[1])) if len(node.inputs) > 1 else _attr(node, "axes")
        if axes is None:
            return None
        rank = len(shapes[0])
        axes = [int(a) for a in np.reshape(axes, -1)]
        if op == "Squeeze":
            axes = [a + rank if a < 0 else a for a in axes]
            if any(shapes[0][a] != 1 for a in axes):
                return None
            return tuple(d for k, d in enumerate(shapes[0]) if k not in axes)
        out = list(shapes[0])
        for a in sorted(a + rank + len(axes) if a < 0 else a for a in axes):
            out.insert(a, 1)
        return tuple(out)
    if op == "Transpose":
        x = shapes[0]
        if x is None:
            return None
        perm = _attr(node, "perm") or list(range(len(x)))[::-1]
        return tuple(x[p] for p in perm)
    if op == "MatMul":
        a, b = shapes[0], shapes[1]
        if a is None or b is None or len(a) < 2 or len(b) < 2:
            return None
        batch = _broadcast_dims([a[:-2], b[:-2]]) if len(a) > 2 or len(b) > 2 else ()
        return None if batch is None else (*batch, a[-2], b[-1])
    if op in _SAME_SHAPE:
        return shapes[0]
    if op in _EW or op in _ACT:
        known = [s for s in shapes if s is not None]
        if len(known) != len([v for v in node.inputs if v is not None]) or not known:
            return None
        return _broadcast_dims(known)
    return None


_SAME_SHAPE = {"Softmax", "LogSoftmax", "Cast", "CastLike", "Identity", "Dropout"}
