"""The per-linear step of ``sparsify``, one implementation for both paths: the PyTorch
path (``block_prune.py``, a module's weight) and the ONNX path (``onnx_path.py``, an
initializer behind an ``OnnxParamHandle``). :func:`prune_linear` scores a weight
(``[out, in]``), searches and realises a channel permutation (:func:`permute_linear`:
mask-only, fold through a channel group, the hidden space permuted up front, or a
gather), applies the mask or SparseGPT's update (:func:`masked_weight`), writes the
weight back and returns the report entry. What differs between the paths is behind a
:class:`LinearSite`: how the weight is read and written as ``[out, in]`` and how a
gather is put in front of it. Also the report entries both paths share
(:func:`skipped`, :func:`permutation_summary`) and the gather plan search
(:func:`gather_plans`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from slimgraph.ir.dependency import DependencyResult
    from slimgraph.sparsity.options import PruneOptions
    from slimgraph.sparsity.reconstruct import GramAccumulator


class LinearSite(Protocol):
    """One linear as :func:`prune_linear` sees it."""

    label: str  # its name in the report
    param: str  # its weight's name in the IR (channel groups)
    w_in: int  # the input dim of the stored weight

    def read(self) -> torch.Tensor:
        """The stored weight as ``[out, in]`` float32."""

    def write(self, new: torch.Tensor) -> int:
        """Store ``new`` (``[out, in]``); the number of zeros now stored."""

    def gather(self, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Store the columns in the order ``idx`` and gather the input to match; the
        weight ``w`` in the new column order."""

    def gather_blocker(self) -> str | None:
        """Why no gather can be put in front of this linear, else None."""


def skip_reason(opts: PruneOptions, in_features: int) -> str | None:
    """Why a linear with ``in_features`` inputs cannot take the mask, else None."""
    if opts.nm is not None and in_features % opts.nm[1]:
        return f"input size {in_features} is not divisible by {opts.nm[1]}"
    return None


def skipped(name: str, why: str, numel: int) -> dict:
    """The report entry of a block linear the pass leaves as it is."""
    return {"name": name, "skipped": why, "numel": numel, "zeros": 0}


def linear_scores(opts: PruneOptions, w: torch.Tensor, acc: GramAccumulator | None
                  ) -> torch.Tensor:
    """The pruning scores of an ``[out, in]`` weight (``acc``: its input statistics;
    SparseGPT ranks by magnitude)."""
    from slimgraph.sparsity.scores import score

    return score(w, opts.ranking_score, act_norm=acc.act_norm() if acc is not None else None,
                 a=opts.a)


def masked_weight(opts: PruneOptions, w: torch.Tensor, s: torch.Tensor,
                  hess: torch.Tensor | None, sparsity: float | None,
                  fixed_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The pruned ``[out, in]`` weight: the mask from the scores ``s`` (N:M, or
    unstructured at ``sparsity`` per row or layer), or ``fixed_mask`` (mask-only
    permutations); with a Hessian (reconstruct / sparsegpt), SparseGPT's update."""
    from slimgraph.sparsity.masks import nm_mask, unstructured_mask
    from slimgraph.sparsity.reconstruct import sparsegpt_prune

    nm = opts.nm
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


def prune_linear(opts: PruneOptions, site: LinearSite, acc: GramAccumulator | None,
                 sparsity: float | None, result: DependencyResult | None = None,
                 plan: tuple | None = None) -> dict:
    """Prune one linear: score its weight, permute its input channels when
    ``opts.permute`` says so (``result``: the analysis, for fold; ``plan``: its entry of
    :func:`gather_plans` under gather), mask it (or SparseGPT's update with the Hessian
    of ``acc``) at ``sparsity``, write it back. Returns the report entry."""
    w = site.read()
    why = skip_reason(opts, w.shape[1])
    if why is not None:
        return skipped(site.label, why, w.numel())
    hess = acc.hessian() if acc is not None and opts.needs_hessian() else None
    s = linear_scores(opts, w, acc)
    fixed, info = None, None
    if opts.permute != "none":
        w, s, hess, fixed, info = permute_linear(opts, result, site, w, s, hess, plan)
    new = masked_weight(opts, w, s, hess, sparsity, fixed)
    zeros = site.write(new)
    out = {"name": site.label, "shape": list(w.shape), "numel": w.numel(), "zeros": zeros,
           "sparsity": round(zeros / w.numel(), 6)}
    if info is not None:
        out["permutation"] = info
    return out


def permute_linear(opts: PruneOptions, result: DependencyResult | None, site: LinearSite,
                   w: torch.Tensor, s: torch.Tensor, hess: torch.Tensor | None,
                   plan: tuple | None = None):
    """Search a permutation of ``site``'s input channels and realise it as
    ``opts.permute`` says (``w``, ``s``: ``[out, in]``). Returns ``(w, s, hess,
    fixed_mask, info)``: the weight, scores and Hessian in the new stored column order,
    or, for mask-only, a mask in the original order; ``info`` is the report's entry."""
    from slimgraph.sparsity.deploy import (SHARED_SPACE, fold_choice, permute_group,
                                           stacked_scores, unit_positions)
    from slimgraph.sparsity.permutation import permuted_nm_mask, search_permutation

    n, m = opts.nm
    info: dict = {"realised": "none"}
    if opts.permute == "mask-only":
        res = search_permutation(s, n, m, mode=opts.search)
        info.update(realised="mask-only", kept_before=res.kept_before,
                    kept_after=res.kept_after, seconds=round(res.seconds, 3),
                    perm=res.perm.tolist())  # the order in which the weight is N:M
        return w, s, hess, permuted_nm_mask(s, res.perm, n, m), info
    if opts.permute == "gather" and plan is not None:
        idx, shared = plan  # searched for the linears sharing the input
        w = site.gather(idx, w)
        info.update(realised="gather", **shared)
    else:  # fold / space, or gather folded at no cost
        choice = fold_choice(result, site.param, m, dim=site.w_in)
        group = choice.group
        if group is None:
            if opts.permute == "space" and choice.reason == SHARED_SPACE:
                info.update(realised="space")  # its input space was permuted up front
            else:
                blocker = site.gather_blocker() if opts.permute == "gather" else None
                info["why"] = blocker or choice.why
            return w, s, hess, None, info
        pos = unit_positions(group, site.param, site.w_in)
        res = search_permutation(stacked_scores(s, pos), n, m, mode=opts.search)
        idx = permute_group(result, group, res.perm)[(site.param, site.w_in)]
        w = site.read()
        info.update(realised="fold", group=group.id, group_kind=group.kind,
                    perm=res.perm.tolist(), kept_before=res.kept_before,
                    kept_after=res.kept_after, seconds=round(res.seconds, 3))
    return w, s[:, idx], hess[idx][:, idx] if hess is not None else None, None, info


def gather_plans(opts: PruneOptions, input_of: dict[str, str],
                 score_of: Callable[[str], torch.Tensor]) -> dict:
    """``permute=gather``: the permutation of each linear of ``input_of`` (name -> the
    activation it reads), or with ``gather_share`` one per set of linears that read the
    same activation (:func:`~slimgraph.sparsity.deploy.search_shared` on their
    ``score_of(name)``)."""
    from slimgraph.sparsity.deploy import input_sets, search_shared

    n, m = opts.nm
    return search_shared(input_sets(input_of, opts.gather_share), score_of, n, m, opts.search)


def permutation_summary(opts: PruneOptions, pruned: list[dict]) -> dict:
    """The report's ``permutation`` entry from the per-linear reports."""
    perms = [r["permutation"] for r in pruned if "permutation" in r]
    return {"mode": opts.permute, "search": opts.search,
            "seconds": round(sum(p.get("seconds", 0) for p in perms), 2),
            "layers_permuted": sum(1 for p in perms if p["realised"] != "none"),
            "layers_unpermuted": [f"{r['name']}: {r['permutation']['why']}" for r in pruned
                                  if r.get("permutation", {}).get("realised") == "none"]}
