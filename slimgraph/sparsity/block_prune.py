"""Pruning the linears of one decoder block (``sparsify``'s PyTorch path), the one
permutation of the residual stream (``permute=space``), and the check of what the pass
claims.

:class:`BlockPruner` is ``calibration.block_sequential``'s ``prune_block``: it observes the
block's linear inputs (when the score or the reconstruction needs them), then prunes
every linear of the block (:func:`slimgraph.ir.blocks.find_blocks`) through the step both
paths share (:func:`slimgraph.sparsity.prune_step.prune_linear`, on a
:class:`TorchLinear`); a linear it does not change is reported with ``skipped`` and the
reason. :func:`unclaimed` and :func:`nm_claim_failures` are the pass's ``ensures``: every
block linear is either pruned or skipped with a reason, and each one claimed pruned under
``pattern=N:M`` holds N:M in the stored weight.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch

from slimgraph.errors import PipelineError
from slimgraph.sparsity.prune_step import gather_plans, linear_scores, prune_linear, skipped

if TYPE_CHECKING:
    from slimgraph.sparsity.options import PruneOptions

MOVING_PERMUTES = ("fold", "space", "gather")  # realised by moving weights, not by the mask


class SparsityClaimError(PipelineError):
    """``sparsify`` reported a linear pruned (or N:M) that is not, or left one out."""


def _is_conv1d(mod: torch.nn.Module) -> bool:
    return type(mod).__name__ == "Conv1D"  # transformers' GPT-2 linear, weight [in, out]


class TorchLinear:
    """A module's linear as :func:`~slimgraph.sparsity.prune_step.prune_linear` sees it
    (a :class:`~slimgraph.sparsity.prune_step.LinearSite`): a ``Conv1D`` (weight
    ``[in, out]``) is pruned as its transpose; a gather replaces the module by a
    :class:`~slimgraph.sparsity.deploy.GatherLinear`."""

    w_in = 1

    def __init__(self, model: torch.nn.Module, name: str, lin: torch.nn.Module) -> None:
        self.model, self.label, self.lin = model, name, lin
        self.param = name + ".weight"
        self.stored_t = _is_conv1d(lin)

    def read(self) -> torch.Tensor:
        w = self.lin.weight.detach().float()
        return w.T if self.stored_t else w

    def write(self, new: torch.Tensor) -> int:
        with torch.no_grad():
            self.lin.weight.copy_((new.T if self.stored_t else new).to(self.lin.weight.dtype))
        return int((self.lin.weight == 0).sum())

    def gather(self, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        from slimgraph.sparsity.deploy import install_gather

        self.lin = install_gather(self.model, self.label, idx)
        return self.lin.weight.detach().float()

    def gather_blocker(self) -> str | None:
        return None


class BlockPruner:
    """Observe a block's linear inputs, then prune every linear of the block (at the
    block's own sparsity when a per-layer schedule is given)."""

    def __init__(self, opts: PruneOptions, model, result,
                 by_layer: dict[int, float] | None = None) -> None:
        self.opts = opts
        self.model = model
        self.result = result
        self.by_layer = by_layer
        self.gather_plans: dict = {}
        self._reads: dict[str, str] | None = None  # weight -> activation, for gather plans

    def __call__(self, block, module: torch.nn.Module, inputs: list) -> dict:
        from slimgraph.sparsity.calibration import observe_block

        opts = self.opts
        linears, reports = {}, {}
        for name in block.linears:
            mod = module.get_submodule(name[len(block.module_name) + 1:])
            w = getattr(mod, "weight", None)
            why = None
            if not (isinstance(mod, torch.nn.Linear) or _is_conv1d(mod)) \
                    or not isinstance(w, torch.Tensor) or w.dim() != 2:
                why = f"a {type(mod).__name__}, not a linear module with a 2-D weight"
            elif _is_conv1d(mod) and opts.permute in MOVING_PERMUTES:
                why = f"a Conv1D (weight [in, out]): permute={opts.permute} needs an nn.Linear"
            if why is not None:
                numel = w.numel() if isinstance(w, torch.Tensor) else 0
                reports[name] = skipped(name, why, numel)
            else:
                linears[name] = mod
        stats: dict = {}
        if opts.needs_stats() and linears:
            stats, _ = observe_block(module, linears, inputs, hessian=opts.needs_hessian())
        sparsity = self.by_layer[block.layer] if self.by_layer is not None else opts.sparsity
        if opts.permute == "gather":
            self.gather_plans = self.plan_gathers(linears, stats)
        for name, lin in linears.items():
            reports[name] = prune_linear(opts, TorchLinear(self.model, name, lin),
                                         stats.get(name), sparsity, self.result,
                                         self.gather_plans.get(name))
        return {"layer": block.layer, "layers": [reports[name] for name in block.linears]}

    def plan_gathers(self, linears: dict, stats: dict) -> dict:
        """``permute=gather``: the permutation of each of this block's linears, or with
        ``gather_share`` one per set of linears that read the same activation
        (:func:`~slimgraph.sparsity.prune_step.gather_plans`); linears folded for free
        (:func:`~slimgraph.sparsity.deploy.free_fold_group`) and those the pattern cannot
        divide are left out."""
        from slimgraph.ir.graph import OpKind
        from slimgraph.sparsity.deploy import free_fold_group

        m = self.opts.nm[1]
        if self._reads is None:
            self._reads = {nd.inputs[1].name: nd.inputs[0].name for nd in self.result.graph.nodes
                           if nd.kind is OpKind.LINEAR and nd.inputs[1] is not None
                           and nd.inputs[0] is not None}
        input_of = {name: self._reads.get(name + ".weight", name)
                    for name, lin in linears.items()
                    if lin.in_features % m == 0
                    and free_fold_group(self.result, name + ".weight", m) is None}
        return gather_plans(self.opts, input_of,
                            lambda name: linear_scores(self.opts,
                                                       linears[name].weight.detach().float(),
                                                       stats.get(name)))


def permute_residual_space(opts: PruneOptions, model: torch.nn.Module, result,
                           windows: torch.Tensor) -> dict:
    """One permutation of the residual stream, chosen for all its decoder-block readers.

    The readers' scores (with activation norms from one dense pass over the calibration
    windows) are stacked; the permutation that maximises the N:M score they keep is
    applied to the whole hidden group (embedding, norms, readers' columns, writers' rows,
    tied lm_head): an exact reordering, before block 0 is calibrated.
    """
    from slimgraph.ir.blocks import block_linears
    from slimgraph.sparsity.deploy import permute_hidden_space, unit_positions
    from slimgraph.structured.importance import consumer_input_norms

    def readers_of(group):
        names = [lin.weight for lin in block_linears(result.graph)
                 if lin.w_in == 1 and unit_positions(group, lin.weight, 1) is not None]
        norms = consumer_input_norms(model, result.graph, windows[: min(len(windows), 16)]) \
            if opts.score in ("wanda", "ria") and names else {}
        return [(name, 1, result.graph.params[name].param.read().float(),
                 norms[name].sqrt().float() if norms else None) for name in names]

    return permute_hidden_space(opts, result, readers_of)


# --------------------------------------------------------------------------- ensures


def unclaimed(expected: Iterable[str], layers: list[dict]) -> list[str]:
    """The block linears (``expected`` names) the report neither prunes nor skips."""
    reported = {r["name"] for r in layers}
    return [name for name in expected if name not in reported]


def nm_claim_failures(layers: list[dict], nm: tuple[int, int],
                      weight_of: Callable[[str], Any]) -> list[str]:
    """``"name (bad of total groups)"`` for each linear the report claims pruned (not
    ``skipped``) whose stored weight (``weight_of(name)``: ``[out, in]``) does not hold
    ``nm`` along its input dim (under ``permute=mask-only``: in the permuted order the
    report gives, the stored weight is not N:M by design)."""
    from slimgraph.sparsity.masks import nm_violations

    bad = []
    for r in layers:
        if r.get("skipped"):
            continue
        w = weight_of(r["name"])
        perm = r.get("permutation", {})
        if perm.get("realised") == "mask-only":
            w = w[:, torch.as_tensor(perm["perm"], dtype=torch.long)]
        if w.shape[1] % nm[1]:
            bad.append(f"{r['name']} (input size {w.shape[1]} is not a multiple of {nm[1]})")
            continue
        n_bad, total = nm_violations(w, nm[0], nm[1], 1)
        if n_bad:
            bad.append(f"{r['name']} ({n_bad} of {total} groups)")
    return bad


def claim_error(pass_name: str, pattern: str, failures: list[str], missing: list[str]
                ) -> SparsityClaimError:
    """The one-line error of a broken claim (``failures``: N:M does not hold; ``missing``:
    block linears not in the report)."""
    parts = []
    if failures:
        parts.append(f"{pattern} does not hold on {len(failures)} linear(s) it reports pruned: "
                     + ", ".join(failures[:5]) + (f" and {len(failures) - 5} more"
                                                  if len(failures) > 5 else ""))
    if missing:
        parts.append(f"{len(missing)} decoder-block linear(s) neither pruned nor skipped: "
                     + ", ".join(missing[:5]) + (f" and {len(missing) - 5} more"
                                                 if len(missing) > 5 else ""))
    return SparsityClaimError(f"pass '{pass_name}': " + "; ".join(parts))


def torch_claims(graph, model: torch.nn.Module, stored: dict | None = None
                 ) -> tuple[list[str], Callable[[str], torch.Tensor]]:
    """The PyTorch path's block linears (module names) and a reader of a linear's stored
    ``[out, in]`` weight: the module's, or under ``--offload`` (blocks back on the meta
    device) the one in the offload store (``stored``: block module name -> safetensors
    file, the store's ``Offload.stored``)."""
    from slimgraph.ir.blocks import find_blocks

    blocks = find_blocks(graph)
    block_of = {name: b.module_name for b in blocks for name in b.linears}

    def weight_of(name: str) -> torch.Tensor:
        mod = model.get_submodule(name)
        w = mod.weight.detach()
        if w.is_meta and stored is not None:
            from safetensors import safe_open

            path = stored.get(block_of.get(name, ""))
            if path is None:
                raise SparsityClaimError(f"{name}: its pruned weight is not in the offload store")
            with safe_open(str(path), framework="pt") as f:
                w = f.get_tensor(name + ".weight")
        return w.T if _is_conv1d(mod) else w

    return [name for b in blocks for name in b.linears], weight_of
