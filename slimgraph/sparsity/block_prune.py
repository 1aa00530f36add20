"""Pruning the linears of one decoder block (``sparsify``'s PyTorch path), the masks both
paths share, and the check of what the pass claims.

:class:`BlockPruner` is ``calibration.block_sequential``'s ``prune_block``: it observes the
block's linear inputs (when the score or the reconstruction needs them), then prunes
every linear of the block (:func:`slimgraph.ir.blocks.find_blocks`); a linear it does
not change is reported with ``skipped`` and the reason. :func:`masked_weight` is the
pruned weight of both paths (``sparsity/onnx_path.py`` calls it too).
:func:`unclaimed` and :func:`nm_claim_failures` are the pass's ``ensures``: every block
linear is either pruned or skipped with a reason, and each one claimed pruned under
``pattern=N:M`` holds N:M in the stored weight.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch

from slimgraph.errors import PipelineError

if TYPE_CHECKING:
    from slimgraph.passes.sparsify import Sparsify

MOVING_PERMUTES = ("fold", "space", "gather")  # realised by moving weights, not by the mask


class SparsityClaimError(PipelineError):
    """``sparsify`` reported a linear pruned (or N:M) that is not, or left one out."""


def masked_weight(opts: Sparsify, w: torch.Tensor, s: torch.Tensor, hess: torch.Tensor | None,
                  sparsity: float | None, fixed_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The pruned ``[out, in]`` weight: the mask from the scores ``s`` (N:M, or
    unstructured at ``sparsity`` per row or layer), or ``fixed_mask`` (mask-only
    permutations); with a Hessian (reconstruct / sparsegpt), SparseGPT's update."""
    from slimgraph.sparsity.masks import nm_mask, unstructured_mask
    from slimgraph.sparsity.reconstruct import sparsegpt_prune

    nm = opts.nm()
    if fixed_mask is not None:  # mask-only: the permuted choice, in the original order
        if hess is not None:
            return sparsegpt_prune(w, hess, mask=fixed_mask)[0]
        return w * fixed_mask
    if opts.score == "sparsegpt":
        return sparsegpt_prune(w, hess, sparsity=sparsity, pattern=nm)[0]
    if opts.reconstruct:
        return sparsegpt_prune(w, hess, sparsity=sparsity, pattern=nm, scores=s)[0]
    if nm is not None:
        keep = nm_mask(s, *nm)
    else:
        keep = unstructured_mask(s, sparsity, opts.scope or ("row" if opts.score == "wanda"
                                                             else "layer"))
    return w * keep


def skip_reason(opts: Sparsify, in_features: int) -> str | None:
    """Why a linear with ``in_features`` inputs cannot take the pass's mask, else None."""
    nm = opts.nm()
    if nm is not None and in_features % nm[1]:
        return f"input size {in_features} is not divisible by {nm[1]}"
    return None


def skipped(name: str, why: str, numel: int) -> dict:
    """The report entry of a block linear the pass leaves as it is."""
    return {"name": name, "skipped": why, "numel": numel, "zeros": 0}


def _is_conv1d(mod: torch.nn.Module) -> bool:
    return type(mod).__name__ == "Conv1D"  # transformers' GPT-2 linear, weight [in, out]


class BlockPruner:
    """Observe a block's linear inputs, then prune every linear of the block (at the
    block's own sparsity when a per-layer schedule is given)."""

    def __init__(self, opts: Sparsify, model, result, by_layer: dict[int, float] | None = None
                 ) -> None:
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
            reports[name] = self.prune_linear(name, lin, stats.get(name), sparsity)
        return {"layer": block.layer, "layers": [reports[name] for name in block.linears]}

    def scores(self, w: torch.Tensor, acc) -> torch.Tensor:
        """The pruning scores of an ``[out, in]`` weight (SparseGPT ranks by magnitude)."""
        from slimgraph.sparsity.scores import score

        opts = self.opts
        return score(w, "magnitude" if opts.score == "sparsegpt" else opts.score,
                     act_norm=acc.act_norm() if acc is not None else None, a=opts.a)

    def plan_gathers(self, linears: dict, stats: dict) -> dict:
        """``permute=gather``: the permutation of each of this block's linears, or with
        ``gather_share`` one per set of linears that read the same activation
        (:func:`~slimgraph.sparsity.deploy.search_shared`); linears folded for free
        (:func:`~slimgraph.sparsity.deploy.free_fold_group`) and those the pattern cannot
        divide are left out."""
        from slimgraph.ir.graph import OpKind
        from slimgraph.sparsity.deploy import free_fold_group, input_sets, search_shared

        n, m = self.opts.nm()
        if self._reads is None:
            self._reads = {nd.inputs[1].name: nd.inputs[0].name for nd in self.result.graph.nodes
                           if nd.kind is OpKind.LINEAR and nd.inputs[1] is not None
                           and nd.inputs[0] is not None}
        input_of = {name: self._reads.get(name + ".weight", name)
                    for name, lin in linears.items()
                    if lin.in_features % m == 0
                    and free_fold_group(self.result, name + ".weight", m) is None}
        return search_shared(input_sets(input_of, self.opts.gather_share),
                             lambda name: self.scores(linears[name].weight.detach().float(),
                                                      stats.get(name)),
                             n, m, self.opts.search)

    def prune_linear(self, name: str, lin: torch.nn.Module, acc, sparsity: float | None) -> dict:
        opts = self.opts
        stored_t = _is_conv1d(lin)  # Conv1D stores [in, out]: pruned as its transpose
        w = lin.weight.detach().float()
        w = w.T if stored_t else w
        why = skip_reason(opts, w.shape[1])
        if why is not None:
            return skipped(name, why, w.numel())
        nm = opts.nm()
        act = acc.act_norm() if acc is not None else None
        hess = acc.hessian() if acc is not None and opts.needs_hessian() else None
        s = self.scores(w, acc)
        fixed_mask, perm_info = None, None
        if opts.permute != "none":
            lin, w, s, act, hess, fixed_mask, perm_info = self.permute(name, lin, w, s, act, hess, nm)
        new = masked_weight(opts, w, s, hess, sparsity, fixed_mask)
        with torch.no_grad():
            lin.weight.copy_((new.T if stored_t else new).to(lin.weight.dtype))
        zeros = int((lin.weight == 0).sum())
        out = {"name": name, "shape": list(w.shape), "numel": w.numel(), "zeros": zeros,
               "sparsity": round(zeros / w.numel(), 6)}
        if perm_info is not None:
            out["permutation"] = perm_info
        return out

    def permute(self, name, lin, w, s, act, hess, nm):
        """Search a permutation for this linear and realise it as the mode says."""
        from slimgraph.sparsity.deploy import (fold_group, install_gather, permute_group,
                                               stacked_scores, unit_positions)
        from slimgraph.sparsity.permutation import permuted_nm_mask, search_permutation

        opts = self.opts
        n, m = nm
        info = {"realised": "none"}
        if opts.permute == "mask-only":
            res = search_permutation(s, n, m, mode=opts.search)
            info.update(realised="mask-only", kept_before=res.kept_before, kept_after=res.kept_after,
                        seconds=round(res.seconds, 3),
                        perm=res.perm.tolist())  # the order in which the weight is N:M
            return lin, w, s, act, hess, permuted_nm_mask(s, res.perm, n, m), info
        plan = self.gather_plans.get(name) if opts.permute == "gather" else None
        if plan is None:  # fold / space, or gather folded at no cost
            group, why = fold_group(self.result, name + ".weight", m)
            if group is None:
                if opts.permute == "space" and "shared by every layer" in why:
                    info.update(realised="space")  # its input space was permuted up front
                else:
                    info["why"] = why
                return lin, w, s, act, hess, None, info
            pos = unit_positions(group, name + ".weight", 1)
            res = search_permutation(stacked_scores(s, pos), n, m, mode=opts.search)
            idx = permute_group(self.result, group, res.perm)[(name + ".weight", 1)]
            info.update(realised="fold", group=group.id, group_kind=group.kind,
                        perm=res.perm.tolist())
            info.update(kept_before=res.kept_before, kept_after=res.kept_after,
                        seconds=round(res.seconds, 3))
        else:  # gather, with the permutation searched for the linears sharing the input
            idx, shared = plan
            lin = install_gather(self.model, name, idx)
            info.update(realised="gather", **shared)
        w = lin.weight.detach().float()
        s = s[:, idx]
        act = act[idx] if act is not None else None
        hess = hess[idx][:, idx] if hess is not None else None
        return lin, w, s, act, hess, None, info


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


def torch_claims(state) -> tuple[list[str], Callable[[str], torch.Tensor]]:
    """The PyTorch path's block linears (module names) and a reader of a linear's stored
    ``[out, in]`` weight: the module's, or under ``--offload`` (blocks back on the meta
    device) the one in the offload store."""
    from slimgraph.ir.blocks import find_blocks

    blocks = find_blocks(state.graph)
    block_of = {name: b.module_name for b in blocks for name in b.linears}

    def weight_of(name: str) -> torch.Tensor:
        mod = state.model.get_submodule(name)
        w = mod.weight.detach()
        if w.is_meta and state.offload is not None:
            from safetensors import safe_open

            path = state.offload.stored.get(block_of.get(name, ""))
            if path is None:
                raise SparsityClaimError(f"{name}: its pruned weight is not in the offload store")
            with safe_open(str(path), framework="pt") as f:
                w = f.get_tensor(name + ".weight")
        return w.T if _is_conv1d(mod) else w

    return [name for b in blocks for name in b.linears], weight_of
