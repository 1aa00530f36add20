"""What calibrated structured removal asks of a model kind: a *block observer*.

The block walk of :mod:`slimgraph.structured.recovery` (choose, mask and refit the units
of one decoder block at a time, each block seen on the outputs of the blocks already
pruned) is written once, against this small interface; each model kind implements it:

- :class:`~slimgraph.structured.torch_blocks.TorchBlocks` -- a PyTorch model: the inputs
  of block 0 captured by a hook, the blocks run as modules, the linears' inputs seen by
  forward hooks (``sparsity/calibration.py``);
- :class:`~slimgraph.structured.onnx_observer.OnnxBlocks` -- an ONNX model: the graph cut
  into one segment model per layer and run in ONNX Runtime (``sparsity/onnx_blocks.py``).

*Inputs* are whatever the kind carries from block to block (the hidden states of every
calibration batch); the walk only hands them back. Weights are read and written through
the graph's parameter handles, which both kinds have, as ``[out, in]`` matrices.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import torch

from slimgraph.errors import PipelineError
from slimgraph.ir.graph import OpKind

if TYPE_CHECKING:
    from slimgraph.ir.blocks import Block
    from slimgraph.ir.dependency import DependencyResult
    from slimgraph.sparsity.options import PruneOptions
    from slimgraph.sparsity.reconstruct import GramAccumulator


class ObserverError(PipelineError):
    """The model's decoder blocks cannot be observed one at a time (say, an ONNX graph
    that cannot be cut into layers)."""


def linear_inputs(result: DependencyResult) -> dict[str, int]:
    """Weight name -> the dim of that weight that is the linear's input."""
    return {n.inputs[1].name: n.attrs["w_in"] for n in result.graph.nodes
            if n.kind is OpKind.LINEAR}


class PairSums:
    """What ``refit_to=dense|residual`` needs of one block, accumulated batch by batch
    from both streams: per linear (any key) ``Σ x_p x_pᵀ`` ("H"), ``Σ x_d x_pᵀ`` ("C"),
    ``Σ x_d x_dᵀ`` ("H_dense") of its inputs on the pruned (``x_p``) and dense (``x_d``)
    model; for the residual writer also ``Σ e x_pᵀ`` ("T") and ``Σ ‖e‖²`` ("E"), ``e`` what
    it must write so that the pruned block's output equals the dense one. Float32 products
    per batch, float64 sums; :meth:`result` scales by 2/N like
    :meth:`~slimgraph.sparsity.reconstruct.GramAccumulator.hessian`."""

    def __init__(self) -> None:
        self.sums: dict[Any, dict] = {}
        self.tokens = 0

    def add(self, key, xd: torch.Tensor, xp: torch.Tensor) -> None:
        """One batch of a linear's inputs, ``[tokens, in]`` on each stream."""
        xd, xp = xd.reshape(-1, xd.shape[-1]).float(), xp.reshape(-1, xp.shape[-1]).float()
        acc = self.sums.setdefault(key, {"H": 0, "C": 0, "H_dense": 0})
        acc["H"] = acc["H"] + (xp.T @ xp).double()
        acc["C"] = acc["C"] + (xd.T @ xp).double()
        acc["H_dense"] = acc["H_dense"] + (xd.T @ xd).double()

    def add_residual(self, key, e: torch.Tensor, xp: torch.Tensor) -> None:
        """One batch of the residual writer's target ``e`` and its pruned inputs."""
        e, xp = e.reshape(-1, e.shape[-1]).float(), xp.reshape(-1, xp.shape[-1]).float()
        acc = self.sums[key]
        acc["T"] = acc.get("T", 0) + (e.T @ xp).double()
        acc["E"] = acc.get("E", 0.0) + float((e.double() ** 2).sum())

    def result(self, residual=None, residual_ok: bool = False) -> dict[Any, dict]:
        """Per key the scaled sums (``residual``'s entry with ``residual_ok``)."""
        if not self.tokens:
            raise ValueError("the block's linears saw no calibration tokens")
        scale = 2.0 / self.tokens
        out = {k: {n: v * scale for n, v in acc.items()} for k, acc in self.sums.items()}
        if residual is not None:
            out[residual]["residual_ok"] = residual_ok
        return out


class BlockObserver(ABC):
    """One model's decoder blocks on calibration data (see the module docstring).

    A subclass sets ``blocks`` (the decoder blocks in the order of the residual stream)
    and implements :meth:`first_inputs`, :meth:`statistics` and :meth:`propagate` (and
    :meth:`sites` for ``sparsify``);
    ``pairs`` is True when it also implements :meth:`observe_pair` (``refit_to=dense`` and
    ``residual``)."""

    pairs = False
    #: shown beside the block count in progress lines (say, "offloaded")
    progress_note: str | None = None
    #: ``sparsify``: report entries of block linears outside every block's sites
    untargeted: list[dict] = []

    def __init__(self, result: DependencyResult) -> None:
        self.result = result
        self.w_in = linear_inputs(result)
        self.blocks: list[Block] = []

    # -- calibration --------------------------------------------------------------------

    @abstractmethod
    def first_inputs(self) -> Any:
        """The inputs of the first block, for every calibration batch."""

    @abstractmethod
    def statistics(self, block: Block, inputs: Any, params: list[str], *, hessian: bool,
                   advance: bool = False) -> tuple[dict[str, GramAccumulator], Any]:
        """Run ``block`` on ``inputs`` and return, per weight name in ``params`` (linears
        of the block), the statistics of that linear's inputs (a
        :class:`~slimgraph.sparsity.reconstruct.GramAccumulator`: channel norms, and with
        ``hessian`` the Gram matrix; linears that read the same activations share one)
        -- and with ``advance`` the block's outputs as the next block's inputs (from the
        same weights), else None."""

    def grams(self, block: Block, inputs: Any, params: set[str], *, advance: bool = False
              ) -> tuple[dict[str, torch.Tensor], Any]:
        """Per weight name in ``params``, the Gram matrix of that linear's inputs
        ``(2/N) Σ x xᵀ`` (float64, sums of float32 products) from :meth:`statistics`;
        with ``advance`` also the next block's inputs."""
        accs, nxt = self.statistics(block, inputs, sorted(params), hessian=True,
                                    advance=advance)
        return {p: accs[p].hessian().to(torch.float64) for p in params}, nxt

    @abstractmethod
    def propagate(self, block: Block, inputs: Any) -> Any:
        """The next block's inputs: ``block`` run (with its weights as they are now) on
        ``inputs``; ``inputs`` may be reused for them."""

    def observe_pair(self, block: Block, dense_inputs: Any, inputs: Any, params: set[str],
                     residual: str | None) -> dict[str, dict]:
        """``refit_to=dense|residual``: the statistics of :func:`~slimgraph.structured.
        torch_blocks.observe_pair` by weight name; ``dense_inputs`` is advanced past the
        block."""
        raise ObserverError("this model kind does not observe dense and pruned streams side "
                            "by side (refit_to=dense|residual)")

    def fork(self, inputs: Any) -> Any:
        """A second stream with the same inputs, which :meth:`observe_pair` may advance
        without touching ``inputs``."""
        return list(inputs)

    def enter(self, block: Block) -> None:
        """Called before the walk reads or changes ``block`` (nothing to do by default)."""
        return None

    def finished(self, block: Block, *, changed: bool = True) -> None:
        """Called once the walk is past ``block`` (``changed``: its weights may have been
        rewritten); nothing to do by default."""
        return None

    def sites(self, block: Block, opts: PruneOptions) -> dict[str, Any]:
        """``sparsify``: per linear of ``block`` (by its name in ``block.linears``, in
        that order), its :class:`~slimgraph.sparsity.prune_step.LinearSite`, or the
        report entry of a linear left as it is (a dict with ``skipped``)."""
        raise ObserverError("this model kind does not prune block linears one by one")

    def close(self) -> None:
        """Free what the observer holds (temporary files; nothing by default)."""
        return None

    # -- weights ------------------------------------------------------------------------

    def read(self, param: str) -> torch.Tensor:
        """The weight ``param`` as ``[out, in]`` float64 (a new tensor)."""
        w = self.result.graph.params[param].param.read().to(torch.float64)
        return w.T.clone() if self.w_in[param] == 0 else w.clone()

    def write(self, param: str, weight: torch.Tensor) -> None:
        """Store ``weight`` (``[out, in]``) as ``param``, in the weight's own layout,
        dtype and device."""
        handle = self.result.graph.params[param].param
        current = handle.read()
        new = weight.T if self.w_in[param] == 0 else weight
        handle.write(new.to(dtype=current.dtype, device=current.device).contiguous())

    def label(self, param: str) -> str:
        """The linear's name for reports (the weight's name without ``.weight``)."""
        return param[: -len(".weight")]
