"""Structured removal with calibration, block by block (``prune-structured{reconstruct=true}``,
``importance=obs``, ``allocation=global``).

The walk is the one `sparsify` uses (:func:`slimgraph.sparsity.calibration.block_sequential`):
block 0's inputs are captured, then for each decoder block, in order:

1. observe the block on the outputs of the blocks already pruned, accumulating the Gram
   matrix ``Σ x xᵀ`` of every linear that *reads* a unit's channels (the linears whose
   input dim is a member of the layer's heads / qheads / mlp groups: o_proj for heads,
   KV-groups and query-head slots, down_proj for MLP channels);
2. choose the block's units (``l1``/``l2``: weights; ``act``: ``Σ_j ‖X_j‖² ‖W[:, j]‖²``
   from the observed statistics; ``obs``: SlimGPT's greedy OBS selection);
3. zero every weight the units own (the masked model) and, with ``reconstruct``, refit the
   kept input columns of every reader (:func:`slimgraph.structured.refit.refit_columns`);
4. re-run the block to produce the next block's inputs.

The model stays in masked form (same shapes) until the pass slices the zeros away, so the
slim model equals the masked model with the same refitted weights. Hidden channels (one
group over all layers) are chosen before the walk and only masked: their readers (q/k/v,
gate/up of every layer, lm_head) are not refitted.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from slimgraph.ir.dependency import ChannelGroup, DependencyResult, Member
from slimgraph.ir.graph import OpKind
from slimgraph.sparsity.calibration import (Block, capture_block_inputs, find_blocks,
                                            next_inputs, observe_block, run_block)
from slimgraph.structured.importance import activation_importance, group_importance
from slimgraph.structured.refit import (Reader, obs_costs, obs_select, refit_columns,
                                        refit_columns_to)
from slimgraph.structured.removal import mask_units
from slimgraph.structured.selection import choose

BLOCK_KINDS = ("heads", "qheads", "mlp")  # one layer each: chosen and refitted block by block


def linear_inputs(result: DependencyResult) -> dict[str, int]:
    """Weight name -> the dim of that weight that is the linear's input."""
    return {n.inputs[1].name: n.attrs["w_in"] for n in result.graph.nodes
            if n.kind is OpKind.LINEAR}


def readers(group: ChannelGroup, inputs: dict[str, int]) -> list[Member]:
    """The members of ``group`` that are a linear's input dim (the linears that read the
    group's channels), weights named ``*.weight`` only."""
    return [m for m in group.members
            if inputs.get(m.param) == m.dim and m.param.endswith(".weight")]


class _Stats:
    """Per reader weight of one block: the weight as ``[C_out, C_in]`` (float64, before
    any change) and the Gram matrix of its inputs (``(2/N) Σ x xᵀ``)."""

    def __init__(self, result, block: Block, module, inputs, params: set[str],
                 w_in: dict[str, int], data: bool) -> None:
        graph = result.graph
        names = {p: p[: -len(".weight")] for p in params}
        self.W = {}
        for p in params:
            w = graph.params[p].param.read().to(torch.float64)
            self.W[p] = w.T.clone() if w_in[p] == 0 else w.clone()
        self.H: dict[str, torch.Tensor] = {}
        if data and params:
            mods = {names[p]: module.get_submodule(names[p][len(block.module_name) + 1:])
                    for p in params}
            accs, _ = observe_block(module, mods, inputs, hessian=True)
            self.H = {p: accs[names[p]].hessian().to(torch.float64) for p in params}
        self.C: dict[str, torch.Tensor] = {}
        self.H_dense: dict[str, torch.Tensor] = {}


def observe_pair(module: torch.nn.Module, linears: dict[str, torch.nn.Module],
                 dense_inputs: list, inputs: list) -> dict[str, tuple]:
    """Run the (not yet changed) block on the dense model's inputs and on the pruned
    model's, batch by batch in step, and return per linear name ``(H, C, H_dense)``:
    ``Σ x_p x_pᵀ``, ``Σ x_d x_pᵀ``, ``Σ x_d x_dᵀ`` (float64, scaled by 2/N like
    :meth:`GramAccumulator.hessian`). ``dense_inputs`` is overwritten with the block's
    dense outputs (the next block's dense inputs)."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [lin.register_forward_pre_hook(
        lambda _m, a, name=name: seen.__setitem__(name, a[0].detach()))
        for name, lin in linears.items()]
    sums: dict[str, list[torch.Tensor]] = {}
    tokens = 0
    try:
        with torch.no_grad():
            for j, ((dargs, dkw), (args, kw)) in enumerate(zip(dense_inputs, inputs)):
                seen.clear()
                dense_inputs[j] = next_inputs(module(*dargs, **dkw), dargs, dkw)
                xd = {n: x.reshape(-1, x.shape[-1]).to(torch.float64) for n, x in seen.items()}
                seen.clear()
                module(*args, **kw)
                for n, x in seen.items():
                    xp = x.reshape(-1, x.shape[-1]).to(torch.float64)
                    acc = sums.setdefault(n, [0, 0, 0])
                    acc[0] = acc[0] + xp.T @ xp
                    acc[1] = acc[1] + xd[n].T @ xp
                    acc[2] = acc[2] + xd[n].T @ xd[n]
                    rows = xp.shape[0]
                tokens += rows
    finally:
        for h in hooks:
            h.remove()
    return {n: tuple(m * (2.0 / tokens) for m in acc) for n, acc in sums.items()}


class BlockRemover:
    """``prune_block`` for :func:`block_sequential`: choose, mask and refit one block's
    units. ``counts``: group id -> units to remove. After the walk, ``selection`` holds the
    units of every block and ``refitted`` one record per refitted linear."""

    def __init__(self, result: DependencyResult, counts: dict[int, int], importance: str, *,
                 reconstruct: bool, damp: float = 0.01, obs_steps: int = 8,
                 target: str = "pruned") -> None:
        if target not in ("pruned", "dense"):
            raise ValueError(f"target must be 'pruned' or 'dense', got {target!r}")
        self.result = result
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

    def __call__(self, block: Block, module: torch.nn.Module, inputs: list) -> dict:
        groups = self.by_layer.get(block.layer, [])
        dense = self.reconstruct and self.target == "dense"
        if dense and self.dense_inputs is None:  # block 0: both models see the same inputs
            self.dense_inputs = list(inputs)
        if not groups:
            if dense:
                self.dense_inputs = run_block(module, self.dense_inputs)
            return {"layer": block.layer}
        params = {m.param for g in groups for m in readers(g, self.w_in)}
        data = (self.importance in ("act", "obs") or self.reconstruct) and not dense
        stats = _Stats(self.result, block, module, inputs, params, self.w_in, data)
        if dense:
            self.observe_dense(block, module, inputs, params, stats)
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
        return {"layer": block.layer}

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

    def observe_dense(self, block: Block, module, inputs: list, params: set[str],
                      stats: _Stats) -> None:
        """target=dense: the Gram matrices of the pruned inputs, the dense-pruned cross
        sums and the dense Gram matrices of every reader; advances the dense stream."""
        names = {p: p[: -len(".weight")] for p in params}
        mods = {names[p]: module.get_submodule(names[p][len(block.module_name) + 1:])
                for p in params}
        sums = observe_pair(module, mods, self.dense_inputs, inputs)
        for p in params:
            stats.H[p], stats.C[p], stats.H_dense[p] = sums[names[p]]

    def refit(self, param: str, stats: _Stats, removed: set[int]) -> None:
        if param in stats.C:
            new, info = refit_columns_to(stats.W[param], stats.H[param], stats.C[param],
                                         stats.H_dense[param], sorted(removed), damp=self.damp)
        else:
            new, info = refit_columns(stats.W[param], stats.H[param], sorted(removed),
                                      damp=self.damp)
        handle = self.result.graph.params[param].param
        current = handle.read()
        new = new.T if self.w_in[param] == 0 else new
        handle.write(new.to(dtype=current.dtype, device=current.device).contiguous())
        energy = info["energy"] or 1.0
        self.refitted.append({
            "linear": param[: -len(".weight")], "columns_removed": info["removed"],
            "columns_kept": info["kept"],
            "rel_error_no_update": round(info["error_no_update"] / energy, 6),
            "rel_error_refit": round(info["error_refit"] / energy, 6)})


def dense_unit_scores(model, result: DependencyResult, groups: list[ChannelGroup],
                      importance: str, windows: torch.Tensor, *, batch: int = 8,
                      damp: float = 0.01, progress: Callable[..., None] | None = None
                      ) -> dict[int, torch.Tensor]:
    """Per group id, every unit's score on the dense model (for ``allocation=global``):
    ``l1``/``l2`` from the weights; ``act`` / ``obs`` (single-unit OBS cost) from one dense
    block-sequential pass (each block observed once, its outputs feed the next; no weight
    changes)."""
    if importance in ("l1", "l2"):
        return {g.id: group_importance(result.graph, g, importance) for g in groups}
    w_in = linear_inputs(result)
    ids = {g.id for g in groups}
    blocks = [b for b in find_blocks(result)
              if any(g.layer == b.layer and g.id in ids for g in groups)]
    inputs = capture_block_inputs(model, model.get_submodule(blocks[0].module_name), windows,
                                  batch)
    out: dict[int, torch.Tensor] = {}
    all_blocks = find_blocks(result)
    last = max(all_blocks.index(b) for b in blocks)
    for i, blk in enumerate(all_blocks[: last + 1]):
        module = model.get_submodule(blk.module_name)
        here = [g for g in groups if g.layer == blk.layer]
        params = {m.param for g in here for m in readers(g, w_in)}
        mods = {p[: -len(".weight")]: module.get_submodule(
            p[len(blk.module_name) + 1: -len(".weight")]) for p in params}
        accs, inputs = observe_block(module, mods, inputs, hessian=True, outputs=True)
        H = {p: accs[p[: -len(".weight")]].hessian().to(torch.float64) for p in params}
        for g in here:
            if importance == "act":
                norms = {p: h.diagonal().clone() for p, h in H.items()}
                out[g.id] = activation_importance(result.graph, g, norms, w_in)
            else:
                rs = []
                for m in readers(g, w_in):
                    w = result.graph.params[m.param].param.read().to(torch.float64)
                    rs.append(Reader(w.T if w_in[m.param] == 0 else w, H[m.param],
                                     [m.indices(u) for u in range(g.units)]))
                out[g.id] = obs_costs(rs, damp=damp)
        if progress:
            progress(i + 1, last + 1, "blocks", "global allocation: dense pass")
    return out
