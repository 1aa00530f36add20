"""N:M channel permutations on ONNX input (``sparsify{...,permute=MODE}`` on a .onnx).

The permutation search is the PyTorch path's (:func:`~slimgraph.sparsity.permutation.
search_permutation` on the layer's scores); what differs is how it is made real in the
ONNX model (the per-linear step itself is the PyTorch path's,
:func:`~slimgraph.sparsity.prune_step.prune_linear`, on a :class:`TargetSite`):

- ``mask-only``: the N:M mask chosen in permuted order, applied in the stored order (the
  stored weight is not N:M; RIA's "mask only" use).
- ``fold``: the permutation is folded into the producers of the linear's input channels
  through the channel group that covers them unit by unit (MLP channels: ``down_proj``
  columns with ``gate``/``up`` rows; a layer's v head_dim: ``o_proj`` columns with
  ``v_proj`` rows), every member written back through its ONNX initializer
  (:func:`~slimgraph.sparsity.deploy.permute_group`): the same function, the stored weight
  N:M, no extra node.
- ``gather``: the weight stores ``W[:, pi]`` and a gather in front of each MatMul/Gemm
  that reads it reorders the activation (``GatherElements`` form,
  :mod:`~slimgraph.sparsity.onnx_gathers`): exact for any linear. A target whose input
  channels are one group's units one by one (down_proj) is folded instead; with
  ``gather_share`` targets that read the same activations share one permutation and one
  gather (:func:`~slimgraph.sparsity.block_prune.plan_gathers`).

- ``space``: one permutation of the residual stream for all its readers
  (:func:`permute_space`, before calibration: the hidden group's members -- embedding,
  norm gains, readers' columns, writers' rows, ``lm_head`` -- reordered through their
  initializers), then ``fold`` for the linears that read per-layer spaces.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from slimgraph.sparsity.onnx_targets import Target
    from slimgraph.sparsity.options import PruneOptions


class TargetSite:
    """A target as :func:`~slimgraph.sparsity.prune_step.prune_linear` sees it (a
    :class:`~slimgraph.sparsity.prune_step.LinearSite`): read and written through its
    handle, a gather installed in front of every MatMul/Gemm that reads it."""

    def __init__(self, t: Target) -> None:
        self.t = t
        self.label = t.label or t.name
        self.param = t.name
        self.w_in = t.w_in
        self.in_features = t.in_features
        self.reads = "\n".join(t.inputs)  # the activations it reads (gathers may be shared)

    def read(self) -> torch.Tensor:
        return self.t.weight()

    def write(self, new: torch.Tensor) -> int:
        self.t.handle.write((new if self.w_in == 1 else new.T).contiguous())
        return int((self.t.handle.read() == 0).sum())

    def gather(self, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        install_gathers(self.t, _activation_inputs(self.t), idx)
        return w[:, idx]

    def gather_blocker(self) -> str | None:
        uses = _activation_inputs(self.t)
        return uses if isinstance(uses, str) else None


def _activation_inputs(t: Target) -> list[tuple[object, int]] | str:
    """``(node, input index)`` of the activation of every MatMul/Gemm that reads ``t``'s
    weight directly, or why a gather cannot be placed."""
    out = []
    for stored in t.handle.targets:
        for node, i in stored.uses:
            if node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and i == 1:
                out.append((node, 0))
            elif node.op_type == "Gemm" and node.domain in ("", "ai.onnx") and i == 1:
                attr = node.attributes.get("transA")
                if attr is not None and attr.as_int():
                    return f"Gemm '{node.name}' has transA=1"
                out.append((node, 0))
            else:
                return (f"its weight is read by {node.op_type} '{node.name}' (input {i}), not "
                        "directly as a MatMul/Gemm B")
    return out or "no MatMul/Gemm reads its weight"


def install_gathers(t: Target, uses, perm: torch.Tensor) -> None:
    """Feed every use ``x[..., perm]`` (:func:`~slimgraph.sparsity.onnx_gathers.
    gather_input`: one shared ``GatherElements`` per activation and permutation); the
    weight is written permuted by the caller."""
    from slimgraph.sparsity.onnx_gathers import gather_input

    graph = t.handle.onnx_graph
    label = (t.label or t.name).replace(".", "_").replace("/", "_")
    for node, i in uses:
        node.replace_input_with(i, gather_input(graph, node.inputs[i], np.asarray(perm),
                                                node, label))


def permute_space(opts: PruneOptions, result, targets: list[Target], stats: dict | None
                  ) -> dict:
    """One permutation of the hidden (residual) space for every target that reads it
    (:func:`~slimgraph.sparsity.deploy.permute_hidden_space`; ``stats``: dense input
    statistics by target name, for Wanda / RIA), applied to the whole hidden group."""
    from slimgraph.sparsity.deploy import permute_hidden_space, unit_positions

    def readers_of(group):
        return [(t.name, t.w_in, t.weight(), stats[t.name].act_norm() if stats else None)
                for t in targets if unit_positions(group, t.name, t.w_in) is not None]

    return permute_hidden_space(opts, result, readers_of)
