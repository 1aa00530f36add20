"""N:M channel permutations on ONNX input (``sparsify{...,permute=MODE}`` on a .onnx).

The permutation search is the PyTorch path's (:func:`~slimgraph.sparsity.permutation.
search_permutation` on the layer's scores); what differs is how it is made real in the
ONNX model:

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
  gather (:func:`plan_gathers`).

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
    from slimgraph.passes.sparsify import Sparsify
    from slimgraph.sparsity.onnx_path import Target

ONNX_MODES = ("none", "mask-only", "fold", "gather")


def plan_gathers(opts: Sparsify, result, targets: list[Target], score_of) -> dict:
    """``permute=gather``: the permutation of each target a gather can serve, or with
    ``gather_share`` one per set of targets that read the same activations
    (:func:`~slimgraph.sparsity.deploy.search_shared`, ``score_of(target)`` their
    ``[out, in]`` scores); targets folded at no cost
    (:func:`~slimgraph.sparsity.deploy.free_fold_group`) are left out."""
    from slimgraph.sparsity.deploy import free_fold_group, input_sets, search_shared

    n, m = opts.nm()
    by_name = {t.name: t for t in targets}
    input_of = {t.name: "\n".join(t.inputs) for t in targets
                if t.in_features % m == 0 and not isinstance(_activation_inputs(t), str)
                and free_fold_group(result, t.name, m, dim=t.w_in) is None}
    return search_shared(input_sets(input_of, opts.gather_share),
                         lambda name: score_of(by_name[name]), n, m, opts.search)


def permute_target(opts: Sparsify, result, t: Target, w: torch.Tensor, s: torch.Tensor,
                   act: torch.Tensor | None, hess: torch.Tensor | None, nm: tuple[int, int],
                   plan: tuple | None = None):
    """Search and realise a permutation of ``t``'s input channels (``w``, ``s`` are
    ``[out, in]``; ``plan``: its entry of :func:`plan_gathers` under ``gather``). Returns
    ``(w, s, act, hess, fixed_mask, info)``: the weight, scores and statistics in the new
    stored column order, or a mask in the original order for mask-only."""
    from slimgraph.sparsity.deploy import fold_group, permute_group, stacked_scores, unit_positions
    from slimgraph.sparsity.permutation import permuted_nm_mask, search_permutation

    n, m = nm
    info: dict = {"realised": "none"}
    if opts.permute == "mask-only":
        res = search_permutation(s, n, m, mode=opts.search)
        info.update(realised="mask-only", kept_before=res.kept_before,
                    kept_after=res.kept_after, seconds=round(res.seconds, 3),
                    perm=res.perm.tolist())  # the order in which the stored weight is N:M
        return w, s, act, hess, permuted_nm_mask(s, res.perm, n, m), info
    if opts.permute == "gather" and plan is not None:
        idx, shared = plan
        install_gathers(t, _activation_inputs(t), idx)
        w = w[:, idx]
        info.update(realised="gather", **shared)
    else:  # fold / space, or gather folded at no cost
        group, why = fold_group(result, t.name, m, dim=t.w_in)
        if group is None:
            if opts.permute == "space" and "shared by every layer" in why:
                info.update(realised="space")  # its input space was permuted up front
            else:
                uses = _activation_inputs(t)
                info["why"] = uses if opts.permute == "gather" and isinstance(uses, str) else why
            return w, s, act, hess, None, info
        pos = unit_positions(group, t.name, t.w_in)
        res = search_permutation(stacked_scores(s, pos), n, m, mode=opts.search)
        idx = permute_group(result, group, res.perm)[(t.name, t.w_in)]
        raw = t.handle.read().float()
        w = raw if t.w_in == 1 else raw.T
        info.update(realised="fold", group=group.id, group_kind=group.kind,
                    perm=res.perm.tolist(), kept_before=res.kept_before,
                    kept_after=res.kept_after, seconds=round(res.seconds, 3))
    return (w, s[:, idx], act[idx] if act is not None else None,
            hess[idx][:, idx] if hess is not None else None, None, info)


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


def permute_space(opts: Sparsify, result, targets: list[Target], stats: dict | None) -> dict:
    """One permutation of the hidden (residual) space for every target that reads it
    (:func:`~slimgraph.sparsity.deploy.permute_hidden_space`; ``stats``: dense input
    statistics by target name, for Wanda / RIA), applied to the whole hidden group."""
    from slimgraph.sparsity.deploy import permute_hidden_space, unit_positions

    def readers_of(group):
        out = []
        for t in targets:
            if unit_positions(group, t.name, t.w_in) is None:
                continue
            raw = t.handle.read().float()
            out.append((t.name, t.w_in, raw if t.w_in == 1 else raw.T,
                        stats[t.name].act_norm() if stats else None))
        return out

    return permute_hidden_space(opts, result, readers_of)
