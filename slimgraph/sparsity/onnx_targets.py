"""The weights ``sparsify`` prunes in an imported ONNX graph: :class:`Target` (one
decoder-block linear's IR parameter, its input dim and the activations that feed it),
:func:`find_targets` (every decoder-block linear, :func:`slimgraph.ir.blocks.block_linears`:
``LINEAR`` nodes whose weight is named inside a numbered block, whatever the channel
groups say; one that is not a stored 2-D constant is reported skipped with the reason;
embeddings and ``lm_head`` are never targets) and :func:`claimed_weights` (the stored
weights the pass's ``ensures`` checks). Calibration, pruning and permutations of the
targets are ``onnx_path.py``, ``onnx_blocks.py`` and ``onnx_permute.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class Target:
    """One weight to prune: its IR parameter, input dim, and the ONNX activations
    (value names) that feed it, one per LINEAR use."""

    name: str
    handle: Any  # OnnxParamHandle
    w_in: int
    inputs: list[str] = field(default_factory=list)
    in_features: int = 0
    label: str = ""  # for reports: the module name, without an export wrapper's prefix
    layer: int = -1  # its decoder block

    def weight(self) -> torch.Tensor:
        """The stored weight as ``[out, in]`` float32."""
        raw = self.handle.read().float()
        return raw if self.w_in == 1 else raw.T


def find_targets(result, *, blocks_only: bool = True) -> tuple[list[Target], list[dict]]:
    """The decoder-block linears of an imported ONNX graph
    (:func:`slimgraph.ir.blocks.block_linears`), in graph order, and the report entries
    (``skipped``: why) of block linears that cannot be targeted. With ``blocks_only=False``
    every linear with a stored weight (the LM head too; layer -1 outside the blocks)."""
    from slimgraph.frontends.onnx_import import OnnxParamHandle
    from slimgraph.ir.blocks import block_linears
    from slimgraph.ir.graph import OpKind
    from slimgraph.sparsity.check_onnx import wrapper_prefix
    from slimgraph.sparsity.prune_step import skipped as skip_entry

    layer = {lin.weight: lin.layer for lin in block_linears(result.graph)}
    targets: dict[str, Target] = {}
    skipped: dict[str, str] = {}
    for node in result.graph.nodes:
        if node.kind is not OpKind.LINEAR:
            continue
        w = node.inputs[1]
        if w is None or (blocks_only and w.name not in layer):
            continue
        handle = w.param
        if not isinstance(handle, OnnxParamHandle) or not handle.targets or w.rank != 2:
            skipped[w.name] = "not a stored 2-D constant weight"
            continue
        w_in = int(node.attrs["w_in"])
        t = targets.setdefault(w.name, Target(w.name, handle, w_in,
                                              in_features=int(handle.shape[w_in]),
                                              layer=layer.get(w.name, -1)))
        if t.w_in != w_in:
            skipped[w.name] = "used with different input dims by different nodes"
            continue
        x = node.inputs[0]
        if x is not None and x.name not in t.inputs:
            t.inputs.append(x.name)
    for name in skipped:
        targets.pop(name, None)
    prefix = wrapper_prefix({n for n in result.graph.params if "." in n})

    def label(name: str) -> str:
        return name.removeprefix(prefix).removesuffix(".weight")

    for t in targets.values():
        t.label = label(t.name)

    def numel(name: str) -> int:
        shape = getattr(result.graph.params.get(name), "shape", None) or ()
        return int(np.prod(shape)) if all(isinstance(d, int) for d in shape) else 0

    return list(targets.values()), [skip_entry(label(n), why, numel(n))
                                    for n, why in skipped.items()]


def claimed_weights(result) -> tuple[list[str], Callable[[str], torch.Tensor]]:
    """The ONNX path's block linears in the analysis ``result`` (report labels) and a
    reader of a target's stored weight as ``[out, in]`` (``sparsify``'s ``ensures``)."""
    targets, skipped = find_targets(result)
    by_label = {t.label or t.name: t for t in targets}

    def weight_of(label: str) -> torch.Tensor:
        t = by_label[label]
        raw = t.handle.read()
        return raw if t.w_in == 1 else raw.T

    return [*by_label, *(r["name"] for r in skipped)], weight_of
