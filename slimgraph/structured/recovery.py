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
        self.T: dict[str, torch.Tensor] = {}  # refit targets (target=dense/residual)
        self.E: dict[str, float] = {}
        self.target_of: dict[str, str] = {}


def observe_pair(module: torch.nn.Module, linears: dict[str, torch.nn.Module],
                 dense_inputs: list, inputs: list, residual: str | None = None) -> dict[str, dict]:
    """Run the (not yet changed) block on the dense model's inputs and on the pruned
    model's, batch by batch in step, and return per linear name ``{"H", "C", "H_dense"}``:
    ``Σ x_p x_pᵀ``, ``Σ x_d x_pᵀ``, ``Σ x_d x_dᵀ`` (float64 sums of float32 products per
    batch, scaled by 2/N like :meth:`GramAccumulator.hessian`). ``dense_inputs`` is
    overwritten with the block's dense outputs (the next block's dense inputs).

    ``residual``: a linear whose output is added straight to the block's output (the
    last writer to the residual stream, e.g. down_proj). For it also ``"T"`` = ``Σ e x_pᵀ``
    and ``"E"`` = ``Σ ‖e‖²`` with ``e = out_d - (out_p - y_p)``: what the linear must
    write so that the pruned block's output equals the dense block's. Whether the block
    really is ``rest + y`` is checked on the first batch (the block run once more with
    the linear's output doubled must move by exactly ``y``); ``"residual_ok"`` says so."""
    seen: dict[str, torch.Tensor] = {}
    out_of: dict[str, torch.Tensor] = {}
    hooks = [lin.register_forward_pre_hook(
        lambda _m, a, name=name: seen.__setitem__(name, a[0].detach()))
        for name, lin in linears.items()]
    if residual is not None:
        hooks.append(linears[residual].register_forward_hook(
            lambda _m, _a, y: out_of.__setitem__("y", y.detach())))
    sums: dict[str, dict] = {}
    tokens, residual_ok = 0, residual is not None
    try:
        with torch.no_grad():
            for j, ((dargs, dkw), (args, kw)) in enumerate(zip(dense_inputs, inputs)):
                seen.clear()
                out_d = module(*dargs, **dkw)
                dense_inputs[j] = next_inputs(out_d, dargs, dkw)
                xd = {n: x.reshape(-1, x.shape[-1]).float() for n, x in seen.items()}
                seen.clear()
                out_p = block_output(module(*args, **kw))
                xps = {n: x.reshape(-1, x.shape[-1]).float() for n, x in seen.items()}
                for n, xp in xps.items():  # float32 products per batch, float64 sums
                    acc = sums.setdefault(n, {"H": 0, "C": 0, "H_dense": 0})
                    acc["H"] = acc["H"] + (xp.T @ xp).double()
                    acc["C"] = acc["C"] + (xd[n].T @ xp).double()
                    acc["H_dense"] = acc["H_dense"] + (xd[n].T @ xd[n]).double()
                tokens += next(iter(xps.values())).shape[0] if xps else 0
                if residual_ok:
                    y = out_of["y"]
                    if j == 0:
                        residual_ok = _adds_to_output(module, linears[residual], args, kw,
                                                      out_p, y)
                    if residual_ok:
                        e = (block_output(out_d) - out_p + y).reshape(-1, y.shape[-1]).float()
                        acc = sums[residual]
                        acc["T"] = acc.get("T", 0) + (e.T @ xps[residual]).double()
                        acc["E"] = acc.get("E", 0.0) + float((e.double() ** 2).sum())
    finally:
        for h in hooks:
            h.remove()
    if not tokens:
        raise ValueError("the block's linears saw no calibration tokens")
    scale = 2.0 / tokens
    out = {n: {k: v * scale for k, v in acc.items()} for n, acc in sums.items()}
    if residual is not None:
        out[residual]["residual_ok"] = residual_ok
    return out


def block_output(y) -> torch.Tensor:
    """A decoder block's hidden-state output (blocks may return a tuple)."""
    return (y[0] if isinstance(y, (tuple, list)) else y).detach()


def _adds_to_output(module, linear, args, kw, out, y) -> bool:
    """Whether the block's output is ``rest + y`` in the linear's output ``y``: run the
    block with ``y`` doubled; the output must move by exactly ``y``."""
    handle = linear.register_forward_hook(lambda _m, _a, o: o * 2)
    try:
        moved = module(*args, **kw)
    finally:
        handle.remove()
    moved = block_output(moved)
    if moved.shape != out.shape or y.shape != out.shape:
        return False
    return bool(torch.allclose(moved - out, y, rtol=1e-3, atol=1e-4 * float(y.abs().max())))


class BlockRemover:
    """``prune_block`` for :func:`block_sequential`: choose, mask and refit one block's
    units. ``counts``: group id -> units to remove. After the walk, ``selection`` holds the
    units of every block and ``refitted`` one record per refitted linear."""

    def __init__(self, result: DependencyResult, counts: dict[int, int], importance: str, *,
                 reconstruct: bool, damp: float = 0.01, obs_steps: int = 8,
                 target: str = "pruned") -> None:
        if target not in ("pruned", "dense", "residual"):
            raise ValueError(f"target must be 'pruned', 'dense' or 'residual', got {target!r}")
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
        dense = self.reconstruct and self.target in ("dense", "residual")
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
        """target=dense/residual: the Gram matrices of the pruned inputs and the refit
        targets of every reader (dense outputs; with residual, the last writer's target is
        what brings the block's output back to the dense one); advances the dense stream."""
        names = {p: p[: -len(".weight")] for p in params}
        mods = {names[p]: module.get_submodule(names[p][len(block.module_name) + 1:])
                for p in params}
        last = None
        if self.target == "residual":
            writers = [p for p in params if p.endswith("down_proj.weight")]
            last = names[writers[0]] if len(writers) == 1 else None
        sums = observe_pair(module, mods, self.dense_inputs, inputs, residual=last)
        for p in params:
            got = sums[names[p]]
            stats.H[p] = got["H"]
            W = stats.W[p]
            if names[p] == last and got["residual_ok"]:
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
        handle = self.result.graph.params[param].param
        current = handle.read()
        new = new.T if self.w_in[param] == 0 else new
        handle.write(new.to(dtype=current.dtype, device=current.device).contiguous())
        energy = info["energy"] or 1.0
        self.refitted.append({
            "linear": param[: -len(".weight")], "columns_removed": info["removed"],
            "columns_kept": info["kept"], "target": stats.target_of.get(param, "pruned"),
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
    all_blocks = find_blocks(result)
    # the walk starts at the first block (not at the first with groups: protect=0)
    inputs = capture_block_inputs(model, model.get_submodule(all_blocks[0].module_name),
                                  windows, batch)
    out: dict[int, torch.Tensor] = {}
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
