"""Recovering the torch parameters behind the weights of a dynamo-exported ONNX model.

``torch.onnx.export(..., dynamo=True)`` runs the onnxscript optimizer,
which changes how weights are stored. Its metadata lets most of that be undone:

- the graph signature (``pkg.torch.export.ExportedProgram.graph_signature``) maps the
  exported placeholders (``p_model_layers_0_..._weight``) to module FQNs;
- a constant-folded weight records its sources (``pkg.onnxscript.optimizer.folded_from``)
  and the node that uses it records the FX op it came from (``pkg.torch.onnx.fx_node``):
  a ``[K, N]`` initializer folded from one parameter and consumed by ``aten.linear`` is
  the transposed ``[N, K]`` weight, so the IR parameter gets the FQN and the original
  layout, and the handle remembers the permutation (``OnnxParamHandle.targets``); so is
  a ``*.weight`` folded into the constant of an FX permute node (``permute_N``: Falcon's
  ``x @ W.T``) that an ``aten.matmul`` MatMul reads as its right operand;
- identical initializers merged into one (all-ones norm weights, all-zero biases of a
  fresh model) are split again: each use whose FX op names a parameter that no longer
  exists in the file gets that parameter back as an IR parameter of its own (its
  handle detaches the use onto a new initializer when written);
- a weight stored twice (a tied embedding and its folded transpose) is one IR
  parameter with two targets, named after the module that uses it first.

What cannot be recovered stays what it is in the file: a table folded from a
parameter *and* other values (a position-embedding lookup precomputed for the
static sequence, rotary cos/sin tables) is a ``buffer`` parameter named after the
ONNX value, with ``folded_from`` in ``Graph.meta["onnx_provenance"]``. Small stored
constants that are not weights (shape tensors, axes, scalars) are kept as values for
the importer to fold.
"""

from __future__ import annotations

import re

import onnx_ir as ir

from slimgraph.frontends.onnx.nodes import (
    CONST_MAX_ELEMENTS, attr_value, constant_attr_value, dtype_name, metadata_of,
    parse_list_literal,
)
from slimgraph.frontends.onnx.weights import (
    OnnxParamHandle, ParamTarget, StoredTensor, identity_perm, inverse_perm,
)

SIGNATURE_KEY = "pkg.torch.export.ExportedProgram.graph_signature"
INPUT_KIND_KEY = "pkg.torch.export.graph_signature.InputSpec.kind"
FOLDED_KEY = "pkg.onnxscript.optimizer.folded_from"
FX_NODE_KEY = "pkg.torch.onnx.fx_node"
SCOPES_KEY = "pkg.torch.onnx.name_scopes"
CLASSES_KEY = "pkg.torch.onnx.class_hierarchy"

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



_SIG_RE = re.compile(r"^\s*(\w+): (PARAMETER|BUFFER|CONSTANT_TENSOR)\b.*?target='([^']+)'", re.M)
_FX_ARGS_RE = re.compile(r"\]\((.*)\)\s*$", re.S)
_FX_TARGET_RE = re.compile(r"call_function\[target=([\w.]+)\]")
_PLACEHOLDER_RE = re.compile(r"%(\w+)")
# the names torch.export gives the FX node of a permutation (``aten.permute`` of a
# ``W.T``, ``aten.t``, ``aten.transpose``); a constant folded from such a node keeps its name
_PERMUTE_NODE_RE = re.compile(r"^(?:permute|t|transpose|numpy_T)(?:_\d+)?$")


def _fx_arg_names(text: str) -> list[str]:
    """The FX node names an ``fx_node`` record's arguments name, in order."""
    a = _FX_ARGS_RE.search(text)
    return _PLACEHOLDER_RE.findall(a.group(1)) if a else []


def parse_graph_signature(model: ir.Model) -> dict[str, tuple[str, str]]:
    """Placeholder name -> (FQN, PARAMETER | BUFFER | CONSTANT_TENSOR)."""
    text = (metadata_of(model.graph).get(SIGNATURE_KEY)
            or metadata_of(model).get(SIGNATURE_KEY) or "")
    return {m.group(1): (m.group(3), m.group(2)) for m in _SIG_RE.finditer(text)}



class WeightProvenance:
    """The importer's part that finds the stored weights and turns them into IR
    parameters (mixed into :class:`slimgraph.frontends.onnx.importer.OnnxImporter`, whose
    state -- ``g``, ``sig``, ``storages``, ``consts``, ``use_map``, ... -- it fills)."""

    def collect_storages(self) -> None:
        fqn_kind = {fqn: kind for fqn, kind in self.sig.values()}
        for v in self.g.initializers.values():
            if v.const_value is not None:
                self.storages[id(v)] = StoredTensor(v, None)
        for node in self.g:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                attr = node.attributes.get("value")
                if attr is not None and attr.type == ir.AttributeType.TENSOR:
                    self.storages[id(node.outputs[0])] = StoredTensor(node.outputs[0], node)
                else:
                    arr = constant_attr_value(node)
                    if arr is not None:
                        self.consts[id(node.outputs[0])] = arr
        for s in self.storages.values():
            md = metadata_of(s.value)
            if s.name in fqn_kind:
                s.fqn, s.sig_kind = s.name, fqn_kind[s.name]
            elif md.get(INPUT_KIND_KEY) in ("PARAMETER", "BUFFER", "CONSTANT_TENSOR"):
                s.fqn, s.sig_kind = s.name, md[INPUT_KIND_KEY]
            s.folded_from = [str(x) for x in parse_list_literal(md.get(FOLDED_KEY))]
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

    def _is_weight(self, s: StoredTensor) -> bool:
        if s.fqn or s.source_fqn:
            return True
        return s.dtype in _FLOAT_TYPES and s.numel() >= 2

    def _fx_info(self, node: ir.Node) -> tuple[str | None, list[str]]:
        """(FX op target, FQNs of the placeholders its arguments name)."""
        text = metadata_of(node).get(FX_NODE_KEY)
        if not text:
            return None, []
        t = _FX_TARGET_RE.search(text)
        fqns = [self.sig[n][0] for n in _fx_arg_names(text) if n in self.sig]
        return (t.group(1) if t else None), list(dict.fromkeys(fqns))

    def _module_alias(self, node: ir.Node, fqn: str) -> str | None:
        md = metadata_of(node)
        scopes = parse_list_literal(md.get(SCOPES_KEY))
        classes = parse_list_literal(md.get(CLASSES_KEY))
        if len(scopes) < 2 or len(classes) < 2 or classes[-2] not in _LEAF_MODULES:
            return None
        module, attr = str(scopes[-2]), fqn.rsplit(".", 1)[-1]
        if not module or attr not in ("weight", "bias"):
            return None
        return f"{module}.{attr}"

    def _resolve_use(self, s: StoredTensor, node: ir.Node, idx: int):
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
            return fqn, identity_perm(rank)
        if s.source_fqn is None:
            return None, identity_perm(rank)
        # folded from one parameter: which transform? Only what the FX op proves.
        known = self.stored_shape.get(s.source_fqn)
        if (rank == 2 and target == "torch.ops.aten.linear.default"
                and node.op_type in ("MatMul", "Gemm") and idx == 1
                and not (node.op_type == "Gemm" and attr_value(node, "transB", 0))):
            perm = (1, 0)
            if known is None or known == (s.shape[1], s.shape[0]):
                return fqn, perm
        if (rank == 2 and target == "torch.ops.aten.linear.default" and node.op_type == "Gemm"
                and idx == 1 and attr_value(node, "transB", 0)):
            if known is None or known == s.shape:
                return fqn, identity_perm(rank)
        if rank == 2 and self._folded_transpose(s, node, idx, target):
            if known is None or known == (s.shape[1], s.shape[0]):
                return fqn, (1, 0)  # Falcon's ``x @ W.T``: W.T folded into ``permute_N``
        if known is not None and known == s.shape and (
                s.dtype == self.stored_dtype.get(s.source_fqn)):
            return fqn, identity_perm(rank)  # e.g. an Identity folded away
        return None, identity_perm(rank)

    def _folded_transpose(self, s: StoredTensor, node: ir.Node, idx: int,
                          target: str | None) -> bool:
        """True when ``s`` is a linear's weight transposed (``W.T``, stored ``[in, out]``)
        and folded into a constant: the right operand of a ``MatMul`` from
        ``aten.matmul``, where that argument of the FX op is the stored constant itself
        (same name), an FX permutation node, folded from one parameter ``*.weight``
        and nothing else. (A 2-D permutation that is not the identity is ``[1, 0]``;
        ``aten.matmul`` of an activation by a ``Linear``'s ``[out, in]`` weight reduces
        its ``in``.)"""
        if (target != "torch.ops.aten.matmul.default" or node.op_type != "MatMul"
                or idx != 1 or s.source_fqn is None or not s.source_fqn.endswith(".weight")
                or not _PERMUTE_NODE_RE.match(s.name)):
            return False
        args = _fx_arg_names(metadata_of(node).get(FX_NODE_KEY) or "")
        return len(args) == 2 and args[1] == s.name

    def make_params(self) -> None:
        # FQN (or "onnx:<name>" when none is recovered) -> its stored copies, in order of use
        groups: dict[str, list[ParamTarget]] = {}
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
                    targets.append(ParamTarget(s, perm, [(node, idx)]))
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
                groups.setdefault(key, []).append(ParamTarget(s, identity_perm(len(s.shape)), []))
        for key, targets in groups.items():
            self._add_param(key, targets, first_alias.get(key, []), merged_note.get(key))

    def _add_param(self, key: str, targets: list[ParamTarget], aliases: list[str],
                   merged: str | None) -> None:
        # every target must describe the same original shape; split off those that do not
        def orig(t: ParamTarget) -> tuple[int, ...]:
            return tuple(t.storage.shape[i] for i in inverse_perm(t.perm))

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
        if any(t.perm != identity_perm(len(t.perm)) for t in same):
            notes.append("stored transposed as " + ", ".join(
                f"{t.storage.name!r} (perm {list(t.perm)})" for t in same
                if t.perm != identity_perm(len(t.perm))))
        if merged:
            notes.append(merged)
        if not recovered and s0.folded_from:
            notes.append(f"constant folded by the exporter from {s0.folded_from}")
        if not recovered and s0.source_fqn:
            notes.append(f"derived from {s0.source_fqn!r} by an unknown transform")
        handle = OnnxParamHandle(self.unique_name(name), shape, dtype_name(s0.dtype), same, self.g,
                                 kind, aliases if recovered else [], "; ".join(notes))
        value = self.graph.add_param(handle.name, handle)
        if notes:
            self.provenance[handle.name] = handle.provenance
        for t in same:
            self.param_of_storage.setdefault(id(t.storage.value), value)
            for node, idx in t.uses:
                self.use_map[(id(node), idx)] = (value, t.perm)

    def _unrecovered_kind(self, s: StoredTensor) -> str:
        """A weight without an FQN: a plain initializer is a parameter; a constant the
        exporter computed (folded from several values) or a Constant node is a buffer."""
        if s.source_fqn is not None:
            return "parameter" if self.fqn_kind.get(s.source_fqn) == "PARAMETER" else "buffer"
        if s.sig_kind is not None:
            return "parameter" if s.sig_kind == "PARAMETER" else "buffer"
        if s.folded_from or s.node is not None:
            return "buffer"
        return "parameter"
