"""``sparsify``'s block walk, one for every model kind, the PyTorch model's linears as
sites of the per-linear step, the one permutation of the residual stream of a PyTorch
model (``permute=space``), and the check of what the pass claims.

:func:`prune_blocks` walks the decoder blocks on a block observer
(:class:`~slimgraph.structured.observer.BlockObserver`: hooks on a PyTorch model's block
modules, or one ONNX Runtime segment model per layer): per block it observes the inputs
of the block's linears (when the score or the reconstruction needs them), then prunes
every linear through the step all kinds share (:func:`slimgraph.sparsity.prune_step.
prune_linear`, on the observer's sites: a :class:`TorchLinear` here, a
:class:`~slimgraph.sparsity.onnx_permute.TargetSite` on ONNX input); a linear it does not
change is reported with ``skipped`` and the reason. :func:`unclaimed` and
:func:`nm_claim_failures` are the pass's ``ensures``: every block linear is either pruned
or skipped with a reason, and each one claimed pruned under ``pattern=N:M`` holds N:M in
the stored weight.
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

    def __init__(self, model: torch.nn.Module, name: str, lin: torch.nn.Module,
                 reads: str | None = None) -> None:
        self.model, self.label, self.lin = model, name, lin
        self.param = name + ".weight"
        self.stored_t = _is_conv1d(lin)
        self.in_features = lin.weight.shape[0 if self.stored_t else 1]
        self.reads = reads or name  # the activation it reads (gathers may be shared)

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


def torch_sites(model: torch.nn.Module, block, module: torch.nn.Module, opts: PruneOptions,
                reads: dict[str, str]) -> dict[str, Any]:
    """Per linear of ``block`` (``module``: its module), a :class:`TorchLinear`, or the
    report entry of a module left as it is: not an ``nn.Linear`` / ``Conv1D`` with a 2-D
    weight, or a ``Conv1D`` under a permutation that moves weights. ``reads``: weight
    name -> the activation its linear reads in the graph."""
    out: dict[str, Any] = {}
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
            out[name] = skipped(name, why, w.numel() if isinstance(w, torch.Tensor) else 0)
        else:
            out[name] = TorchLinear(model, name, mod, reads.get(name + ".weight"))
    return out


def prune_blocks(opts: PruneOptions, observer, result, by_layer: dict[int, float] | None = None,
                 *, progress: Callable[..., None] | None = None) -> list[dict]:
    """``sparsify``'s block walk, one for every model kind: on ``observer`` (a
    :class:`~slimgraph.structured.observer.BlockObserver`), per decoder block observe the
    inputs of its linears when the score or the reconstruction needs them (each block on
    the outputs of the blocks already pruned), then prune every linear through
    :func:`~slimgraph.sparsity.prune_step.prune_linear` at the block's sparsity
    (``by_layer``: a per-layer schedule, else ``opts.sparsity``). Without statistics no
    block is run. Returns per block ``{"layer", "layers": report entries}``."""
    blocks = observer.blocks
    observe = opts.needs_stats()
    inputs = observer.first_inputs() if observe else None
    reports = []
    for i, blk in enumerate(blocks):
        observer.enter(blk)
        entries = observer.sites(blk, opts)
        sites = {label: s for label, s in entries.items() if not isinstance(s, dict)}
        stats: dict = {}
        if observe and sites:
            stats, _ = observer.statistics(blk, inputs, [s.param for s in sites.values()],
                                           hessian=opts.needs_hessian())
        sparsity = by_layer[blk.layer] if by_layer is not None else opts.sparsity
        plans = plan_gathers(opts, result, sites, stats) if opts.permute == "gather" else {}
        done = {label: s if isinstance(s, dict) else
                prune_linear(opts, s, stats.get(s.param), sparsity, result, plans.get(label))
                for label, s in entries.items()}
        del stats
        reports.append({"layer": blk.layer, "layers": [done[label] for label in blk.linears]})
        if observe and i + 1 < len(blocks):
            inputs = observer.propagate(blk, inputs)
        observer.finished(blk)
        if progress:
            progress(i + 1, len(blocks), "blocks", observer.progress_note or "")
    return reports


def plan_gathers(opts: PruneOptions, result, sites: dict[str, Any], stats: dict) -> dict:
    """``permute=gather``: the permutation of each of a block's linears (by label), or
    with ``gather_share`` one per set of linears that read the same activation
    (:func:`~slimgraph.sparsity.prune_step.gather_plans`); linears folded for free
    (:func:`~slimgraph.sparsity.deploy.free_fold_group`), those the pattern cannot divide
    and those no gather can be put in front of are left out."""
    from slimgraph.sparsity.deploy import free_fold_group

    m = opts.nm[1]
    input_of = {label: s.reads for label, s in sites.items()
                if s.in_features % m == 0 and s.gather_blocker() is None
                and free_fold_group(result, s.param, m, dim=s.w_in) is None}
    return gather_plans(opts, input_of,
                        lambda label: linear_scores(opts, sites[label].read(),
                                                    stats.get(sites[label].param)))


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


def claim_error(pattern: str, failures: list[str], missing: list[str]
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
    return SparsityClaimError("" + "; ".join(parts))


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
