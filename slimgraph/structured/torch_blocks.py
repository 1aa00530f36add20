"""The PyTorch side of calibrated structured removal: :class:`TorchBlocks`, the block
observer (:mod:`slimgraph.structured.observer`) of a PyTorch model -- block 0's inputs
captured by a hook, each block run as its module, the linears' inputs seen by forward
hooks (the calibration of ``sparsify``, :mod:`slimgraph.sparsity.calibration`) -- and
:func:`observe_pair`, the dense and pruned streams side by side for ``refit_to=dense`` /
``residual``.
"""

from __future__ import annotations

from typing import Any

import torch

from slimgraph.ir.blocks import Block, find_blocks
from slimgraph.ir.graph import OpKind
from slimgraph.memory import release_free_heap
from slimgraph.sparsity.block_prune import torch_sites
from slimgraph.sparsity.calibration import (capture_block_inputs, next_inputs, observe_block,
                                            run_block)
from slimgraph.structured.observer import BlockObserver, PairSums


class TorchBlocks(BlockObserver):
    """The decoder blocks of ``model`` (``result``: its analysis) on the calibration
    ``windows`` (token ids ``[samples, seqlen]``, run ``batch`` at a time; None when no
    block is run); ``lazy`` (compile --offload, :class:`~slimgraph.sparsity.offload.
    Offload`) keeps one block in memory at a time."""

    pairs = True

    def __init__(self, model: torch.nn.Module, result, windows: torch.Tensor | None = None,
                 *, batch: int = 8, lazy=None) -> None:
        super().__init__(result)
        self.model = model
        self.windows = windows
        self.batch = batch
        self.lazy = lazy
        if lazy is not None:
            self.progress_note = "offloaded"
        self.blocks = find_blocks(result)
        self.reads: dict[str, str] | None = None  # weight -> the activation it reads

    def module(self, block: Block) -> torch.nn.Module:
        return self.model.get_submodule(block.module_name)

    def linears(self, block: Block, params) -> dict[str, torch.nn.Module]:
        """Linear name -> its module, for the weights ``params`` of ``block`` (in their
        order)."""
        module = self.module(block)
        names = {p: p[: -len(".weight")] for p in params}
        return {names[p]: module.get_submodule(names[p][len(block.module_name) + 1:])
                for p in params}

    def first_inputs(self) -> list:
        return capture_block_inputs(self.model, self.model.get_submodule(
            self.blocks[0].module_name), self.windows, self.batch)

    def statistics(self, block: Block, inputs: list, params: list[str], *, hessian: bool,
                   advance: bool = False) -> tuple[dict, Any]:
        accs, nxt = observe_block(self.module(block), self.linears(block, params), inputs,
                                  hessian=hessian, outputs=advance)
        return {p: accs[p[: -len(".weight")]] for p in params}, nxt

    def propagate(self, block: Block, inputs: list) -> list:
        return run_block(self.module(block), inputs)

    def enter(self, block: Block) -> None:
        """With --offload, bring the block's weights into memory."""
        if self.lazy is not None:
            self.lazy.materialize(block.module_name)

    def finished(self, block: Block, *, changed: bool = True) -> None:
        """With --offload, store the block's weights (when ``changed``) and put it back
        on the meta device; else free the block's old weights and activations."""
        if self.lazy is None:
            release_free_heap()
        elif changed:
            self.lazy.release(block.module_name)  # stores, evicts and trims the heap
        else:
            self.lazy.evict(block.module_name)

    def sites(self, block: Block, opts) -> dict[str, Any]:
        """The block's modules: ``nn.Linear`` and ``Conv1D`` pruned in place (a gather
        replaces the module), anything else reported as skipped."""
        if self.reads is None:
            self.reads = {nd.inputs[1].name: nd.inputs[0].name for nd in self.result.graph.nodes
                          if nd.kind is OpKind.LINEAR and nd.inputs[1] is not None
                          and nd.inputs[0] is not None}
        return torch_sites(self.model, block, self.module(block), opts, self.reads)

    def observe_pair(self, block: Block, dense_inputs: list, inputs: list, params: set[str],
                     residual: str | None) -> dict[str, dict]:
        """:func:`observe_pair` on ``block``, by weight name (``residual``: a weight name)."""
        sums = observe_pair(self.module(block), self.linears(block, params), dense_inputs,
                            inputs, residual=residual[: -len(".weight")] if residual else None)
        return {p: sums[p[: -len(".weight")]] for p in params}


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
    sums = PairSums()
    residual_ok = residual is not None
    try:
        with torch.no_grad():
            for j, ((dargs, dkw), (args, kw)) in enumerate(zip(dense_inputs, inputs)):
                seen.clear()
                out_d = module(*dargs, **dkw)
                dense_inputs[j] = next_inputs(out_d, dargs, dkw)
                xd = dict(seen)
                seen.clear()
                out_p = block_output(module(*args, **kw))
                xps = dict(seen)
                for n, xp in xps.items():
                    sums.add(n, xd[n], xp)
                if xps:
                    x = next(iter(xps.values()))
                    sums.tokens += x.reshape(-1, x.shape[-1]).shape[0]
                if residual_ok:
                    y = out_of["y"]
                    if j == 0:
                        residual_ok = adds_to_output(module, linears[residual], args, kw,
                                                      out_p, y)
                    if residual_ok:
                        sums.add_residual(residual, block_output(out_d) - out_p + y,
                                          xps[residual])
    finally:
        for h in hooks:
            h.remove()
    return sums.result(residual, residual_ok)


def block_output(y) -> torch.Tensor:
    """A decoder block's hidden-state output (blocks may return a tuple)."""
    return (y[0] if isinstance(y, (tuple, list)) else y).detach()


def adds_to_output(module, linear, args, kw, out, y) -> bool:
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
