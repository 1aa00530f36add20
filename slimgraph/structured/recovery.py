"""Structured removal with calibration, block by block (``prune-structured{reconstruct=true}``,
``importance=act|obs``, ``allocation=global``), for every model kind.

The walk (:func:`walk_blocks`) is the one `sparsify` uses: block 0's inputs are captured,
then for each decoder block, in order:

1. observe the block on the outputs of the blocks already pruned, accumulating the Gram
   matrix ``Σ x xᵀ`` of every linear that *reads* a unit's channels (the linears whose
   input dim is a member of the layer's heads / qheads / mlp groups: o_proj for heads,
   KV-groups and query-head slots, down_proj for MLP channels);
2. choose the block's units (``l1``/``l2``: weights; ``act``: ``Σ_j ‖X_j‖² ‖W[:, j]‖²``
   from the observed statistics; ``obs``: SlimGPT's greedy OBS selection);
3. zero every weight the units own (the masked model) and, with ``reconstruct``, refit the
   kept input columns of every reader (:func:`slimgraph.structured.refit.refit_columns`);
4. re-run the block to produce the next block's inputs.

What differs between a PyTorch model and an ONNX model -- how a block is run and how a
linear's inputs are seen -- is behind a block observer
(:class:`~slimgraph.structured.observer.BlockObserver`); everything above is written once.
The model stays in masked form (same shapes) until the pass slices the zeros away, so the
slim model equals the masked model with the same refitted weights. Hidden channels (one
group over all layers) are chosen before the walk and only masked: their readers (q/k/v,
gate/up of every layer, lm_head) are not refitted.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from slimgraph.errors import SlimgraphError
from slimgraph.ir.blocks import Block
from slimgraph.ir.dependency import ChannelGroup, DependencyResult, Member
from slimgraph.structured.importance import activation_importance, group_importance
from slimgraph.structured.observer import BlockObserver, linear_inputs
from slimgraph.structured.refit import (Reader, obs_costs, obs_select, refit_columns,
                                        refit_columns_to)
from slimgraph.structured.unit_slicing import mask_units
from slimgraph.structured.selection import choose

BLOCK_KINDS = ("heads", "qheads", "mlp")  # one layer each: chosen and refitted block by block

__all__ = ["BLOCK_KINDS", "BlockRemover", "dense_unit_scores", "linear_inputs", "readers",
           "walk_blocks"]


def readers(group: ChannelGroup, inputs: dict[str, int]) -> list[Member]:
    """The members of ``group`` that are a linear's input dim (the linears that read the
    group's channels), weights named ``*.weight`` only."""
    return [m for m in group.members
            if inputs.get(m.param) == m.dim and m.param.endswith(".weight")]


def walk_blocks(observer: BlockObserver, visit: Callable[[Block, object], None], *,
                progress: Callable[..., None] | None = None) -> None:
    """Capture the first block's inputs; per block ``visit(block, inputs)`` (observe,
    choose, change its weights), then run the block as it is now to make the next block's
    inputs."""
    blocks = observer.blocks
    if not blocks:
        raise SlimgraphError("no decoder blocks with prunable linears were found")
    inputs = observer.first_inputs()
    for i, blk in enumerate(blocks):
        observer.enter(blk)
        visit(blk, inputs)
        if i + 1 < len(blocks):
            inputs = observer.propagate(blk, inputs)
        observer.finished(blk)
        if progress:
            progress(i + 1, len(blocks))


class _Stats:
    """Per reader weight of one block: the weight as ``[C_out, C_in]`` (float64, before
    any change) and the Gram matrix of its inputs (``(2/N) Σ x xᵀ``)."""

    def __init__(self, observer: BlockObserver, block: Block, inputs, params: set[str],
                 data: bool) -> None:
        self.W = {p: observer.read(p) for p in params}
        self.H: dict[str, torch.Tensor] = {}
        if data and params:
            self.H, _ = observer.grams(block, inputs, params)
        self.T: dict[str, torch.Tensor] = {}  # refit targets (target=dense/residual)
        self.E: dict[str, float] = {}
        self.target_of: dict[str, str] = {}


class BlockRemover:
    """Choose, mask and refit one block's units at a time: ``visit(block, inputs)`` for
    :func:`walk_blocks` on ``observer``. ``counts``: group id -> units to remove. After
    the walk, ``selection`` holds the units of every block and ``refitted`` one record per
    refitted linear."""

    def __init__(self, result: DependencyResult, counts: dict[int, int], importance: str, *,
                 reconstruct: bool, damp: float = 0.01, obs_steps: int = 8,
                 target: str = "pruned", observer: BlockObserver) -> None:
        if target not in ("pruned", "dense", "residual"):
            raise ValueError(f"target must be 'pruned', 'dense' or 'residual', got {target!r}")
        if target != "pruned" and not observer.pairs:
            raise ValueError(f"target={target!r} needs an observer of dense and pruned streams")
        self.result = result
        self.observer = observer
        self.target = target
        self.dense_inputs: list | None = None  # target=dense: the dense model's block inputs
        self.importance = importance
        self.reconstruct = reconstruct
        self.damp = damp
        self.obs_steps = obs_steps
        self.counts = counts
        self.w_in = linear_inputs(result)
        order = {k: i for i, k in enumerate(BLOCK_KINDS)}
        self.by_layer: dict[int, list[ChannelGroup]] = {}
        for g in sorted((g for g in result.groups if g.id in counts and g.kind in BLOCK_KINDS),
                        key=lambda g: (order[g.kind], g.id)):
            self.by_layer.setdefault(g.layer, []).append(g)
        self.selection: dict[int, list[int]] = {}
        self.refitted: list[dict] = []

    def visit(self, block: Block, inputs) -> None:
        """Choose, mask and (with ``reconstruct``) refit the units of ``block``, observed
        on ``inputs``."""
        observer = self.observer
        groups = self.by_layer.get(block.layer, [])
        dense = self.reconstruct and self.target in ("dense", "residual")
        if dense and self.dense_inputs is None:  # block 0: both models see the same inputs
            self.dense_inputs = observer.fork(inputs)
        if not groups:
            if dense:
                self.dense_inputs = observer.propagate(block, self.dense_inputs)
            return
        params = {m.param for g in groups for m in readers(g, self.w_in)}
        data = (self.importance in ("act", "obs") or self.reconstruct) and not dense
        stats = _Stats(observer, block, inputs, params, data)
        if dense:
            self.observe_dense(block, inputs, params, stats)
        gone: dict[str, set[int]] = {p: set() for p in params}
        selection = {}
        for g in groups:
            units = self.choose(g, stats, gone)
            selection[g.id] = units
            for m in readers(g, self.w_in):
                for u in units:
                    gone[m.param].update(m.indices(u))
        mask_units(self.result, selection)
        if self.reconstruct:
            for p in sorted(params):
                if gone[p]:
                    self.refit(p, stats, gone[p])
        self.selection.update(selection)

    def choose(self, g: ChannelGroup, stats: _Stats, gone: dict[str, set[int]]) -> list[int]:
        n = self.counts[g.id]
        mem = readers(g, self.w_in)
        if self.importance == "obs":
            rs = [Reader(stats.W[m.param], stats.H[m.param],
                         [m.indices(u) for u in range(g.units)]) for m in mem]
            return obs_select(rs, n, steps=self.obs_steps, damp=self.damp,
                              removed_before=[sorted(gone[m.param]) for m in mem])
        if self.importance == "act":
            norms = {p: h.diagonal().clone() for p, h in stats.H.items()}
            return choose(activation_importance(self.result.graph, g, norms, self.w_in), n)
        return choose(group_importance(self.result.graph, g, self.importance), n)

    def observe_dense(self, block: Block, inputs, params: set[str], stats: _Stats) -> None:
        """target=dense/residual: the Gram matrices of the pruned inputs and the refit
        targets of every reader (dense outputs; with residual, the last writer's target is
        what brings the block's output back to the dense one); advances the dense stream."""
        last = None
        if self.target == "residual":
            writers = [p for p in params if p.endswith("down_proj.weight")]
            last = writers[0] if len(writers) == 1 else None
        sums = self.observer.observe_pair(block, self.dense_inputs, inputs, params, last)
        for p in params:
            got = sums[p]
            stats.H[p] = got["H"]
            W = stats.W[p]
            if p == last and got["residual_ok"]:
                stats.T[p], stats.E[p], stats.target_of[p] = got["T"], got["E"], "residual"
            else:
                stats.T[p] = W @ got["C"]
                stats.E[p] = float(((W @ got["H_dense"]) * W).sum())
                stats.target_of[p] = "dense"

    def refit(self, param: str, stats: _Stats, removed: set[int]) -> None:
        if param in stats.T:
            new, info = refit_columns_to(stats.W[param], stats.H[param], stats.T[param],
                                         stats.E[param], sorted(removed), damp=self.damp)
        else:
            new, info = refit_columns(stats.W[param], stats.H[param], sorted(removed),
                                      damp=self.damp)
        self.observer.write(param, new)
        energy = info["energy"] or 1.0
        self.refitted.append({
            "linear": self.observer.label(param), "columns_removed": info["removed"],
            "columns_kept": info["kept"], "target": stats.target_of.get(param, "pruned"),
            "rel_error_no_update": round(info["error_no_update"] / energy, 6),
            "rel_error_refit": round(info["error_refit"] / energy, 6)})


def dense_unit_scores(observer: BlockObserver, groups: list[ChannelGroup], importance: str,
                      *, damp: float = 0.01, progress: Callable[..., None] | None = None
                      ) -> dict[int, torch.Tensor]:
    """Per group id, every unit's score on the dense model (for ``allocation=global``):
    ``l1``/``l2`` from the weights; ``act`` / ``obs`` (single-unit OBS cost) from one dense
    block-sequential pass on ``observer`` (each block observed once, its outputs feed the
    next; no weight changes)."""
    result = observer.result
    if importance in ("l1", "l2"):
        return {g.id: group_importance(result.graph, g, importance) for g in groups}
    w_in = observer.w_in
    ids = {g.id for g in groups}
    all_blocks = observer.blocks
    last = max(i for i, b in enumerate(all_blocks)
               if any(g.layer == b.layer and g.id in ids for g in groups))
    # the walk starts at the first block (not at the first with groups: protect=0)
    inputs = observer.first_inputs()
    out: dict[int, torch.Tensor] = {}
    for i, blk in enumerate(all_blocks[: last + 1]):
        here = [g for g in groups if g.layer == blk.layer]
        params = {m.param for g in here for m in readers(g, w_in)}
        H, inputs = observer.grams(blk, inputs, params, advance=True)
        for g in here:
            if importance == "act":
                norms = {p: h.diagonal().clone() for p, h in H.items()}
                out[g.id] = activation_importance(result.graph, g, norms, w_in)
            else:
                rs = [Reader(observer.read(m.param), H[m.param],
                             [m.indices(u) for u in range(g.units)])
                      for m in readers(g, w_in)]
                out[g.id] = obs_costs(rs, damp=damp)
        if progress:
            progress(i + 1, last + 1, "blocks", "global allocation: dense pass")
    return out
