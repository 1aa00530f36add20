"""Make N:M channel permutations real: stored weights N:M in stored order, function kept.

Two exact realisations (ALGORITHMS.md section 3.3), chosen per linear:

- **fold**: the permutation of a linear's input channels is folded into the producers of
  those channels, decided from the channel groups: if one group covers the linear's
  input dim with unit-contiguous positions (MLP channels: down_proj columns with gate and
  up rows; a layer's v head_dim: o_proj columns with v_proj rows, shared by every head),
  permuting the group's units permutes every member consistently. Zero runtime cost.
- **gather**: the linear stores ``W[:, pi]`` and gathers its input ``x[..., pi]``
  (:class:`GatherLinear`); exact for any linear. A linear whose input channels are the
  units of a group one by one (down_proj: the MLP channels) has its permutation folded
  instead (:func:`free_fold_group`: the same freedom, no gather). Optionally linears that
  read the same activation (q/k/v; gate/up) share one permutation, searched on their
  scores stacked (:func:`search_shared`), so one gather serves them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from slimgraph.ir.dependency import HEAD_DIM_REASON, ChannelGroup, DependencyResult

if TYPE_CHECKING:
    from slimgraph.sparsity.options import PruneOptions


def unit_positions(group: ChannelGroup, param: str, dim: int) -> torch.Tensor | None:
    """[units, P] positions of every unit in (param, dim), when unit-contiguous.

    Unit-contiguous means position k of unit u is ``offset_k + u``: consecutive units are
    consecutive channels, so N:M groups of the dim are groups of units.
    """
    member = next((m for m in group.members if m.param == param and m.dim == dim), None)
    if member is None:
        return None
    pos = torch.tensor([member.indices(u) for u in range(group.units)], dtype=torch.long)
    if pos.numel() == 0:
        return None
    expect = pos[0].unsqueeze(0) + torch.arange(group.units).unsqueeze(1)
    return pos if torch.equal(pos, expect) else None


def foldable(group: ChannelGroup) -> bool:
    """Structurally free to permute: no reasons other than the head_dim pruning policy."""
    return all(r == HEAD_DIM_REASON for r in group.reasons)


SHARED_SPACE = "shared-space"  # FoldChoice.reason: the input space is every layer's
NOT_FOLDABLE = "not-foldable"
MISALIGNED = "misaligned"
NO_GROUP = "no-group"


@dataclass(frozen=True)
class FoldChoice:
    """How a permutation of a weight's inputs can be folded: ``group`` (None when it
    cannot), ``why`` (the report's words) and ``reason`` (a code: ``""`` when it folds,
    else :data:`SHARED_SPACE` -- the input is a space shared by every layer, which only
    ``permute=space`` (or a gather) reorders --, :data:`NOT_FOLDABLE`, :data:`MISALIGNED`
    or :data:`NO_GROUP`)."""

    group: ChannelGroup | None
    why: str = ""
    reason: str = ""


def fold_choice(result: DependencyResult, weight: str, m: int, dim: int = 1) -> FoldChoice:
    """The group whose unit permutation realises a permutation of ``weight``'s inputs
    (its dim ``dim``: 1 for a torch ``[out, in]`` weight), or why there is none."""
    for g in result.groups:
        pos = unit_positions(g, weight, dim)
        if pos is None:
            continue
        if g.layer is None:
            return FoldChoice(None, f"its input is the {g.kind} space shared by every layer "
                              "(only a whole-space or gather permutation could reorder it)",
                              SHARED_SPACE)
        if not foldable(g):
            return FoldChoice(None, f"group {g.id} ({g.kind}) cannot be permuted: "
                              f"{'; '.join(g.reasons)}", NOT_FOLDABLE)
        if g.units % m or int(pos[0].remainder(m).max()) != 0:
            return FoldChoice(None, f"group {g.id} units do not align with groups of {m}",
                              MISALIGNED)
        return FoldChoice(g)
    return FoldChoice(None, "no channel group covers its input channels unit by unit", NO_GROUP)


def free_fold_group(result: DependencyResult, weight: str, m: int, dim: int = 1
                    ) -> ChannelGroup | None:
    """The group that realises *any* permutation of ``weight``'s inputs by folding: one
    input channel per unit (MLP channels for down_proj), so folding loses nothing
    against a gather. ``None`` when folding would restrict the permutation (o_proj's
    head_dim: one permutation shared by every head) or is impossible."""
    group = fold_choice(result, weight, m, dim).group
    if group is None:
        return None
    pos = unit_positions(group, weight, dim)
    return group if pos is not None and pos.shape[1] == 1 else None


def input_sets(input_of: dict[str, str], share: bool = True) -> list[list[str]]:
    """Linears grouped by the activation they read (``input_of``: linear -> activation
    name), in the given order: q/k/v together, gate/up together; each alone when not
    ``share``."""
    if not share:
        return [[name] for name in input_of]
    sets: dict[str, list[str]] = {}
    for name, x in input_of.items():
        sets.setdefault(x, []).append(name)
    return list(sets.values())


def search_shared(sets: list[list[str]], score_of, n: int, m: int, mode: str
                  ) -> dict[str, tuple[torch.Tensor, dict]]:
    """One permutation per set of linears that read the same activation, searched on
    their ``[out, in]`` scores (``score_of(name)``) stacked along the output dim, so one
    gather serves the set. Returns, per linear, the permutation and its report entry
    (importance kept by this linear before / after; the search time on the set's first
    linear; ``shared_with``)."""
    from slimgraph.sparsity.permutation import kept_score, search_permutation

    plans = {}
    for names in sets:
        scores = [score_of(x) for x in names]
        res = search_permutation(torch.cat(scores), n, m, mode=mode)
        identity = torch.arange(res.perm.numel())
        for k, (x, s) in enumerate(zip(names, scores, strict=True)):
            info = {"kept_before": kept_score(s, identity, n, m),
                    "kept_after": kept_score(s, res.perm, n, m),
                    "seconds": round(res.seconds, 3) if k == 0 else 0.0}
            if len(names) > 1:
                info["shared_with"] = [y for y in names if y != x]
            plans[x] = (res.perm, info)
    return plans


def stacked_scores(scores: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Scores of a consumer regrouped per unit: [C_out * P, units]."""
    return torch.cat([scores[:, pos[:, k]] for k in range(pos.shape[1])], dim=0)


def permute_group(result: DependencyResult, group: ChannelGroup, perm: torch.Tensor
                  ) -> dict[tuple[str, int], torch.Tensor]:
    """New unit ``i`` of every member holds old unit ``perm[i]`` (an exact reordering).

    Returns, per member (param, dim), the index array applied along that dim.
    """
    applied = {}
    for m in group.members:
        handle = result.graph.params[m.param].param
        idx = torch.arange(m.size)
        pos = torch.tensor([m.indices(u) for u in range(group.units)], dtype=torch.long)
        idx[pos.reshape(-1)] = pos[perm].reshape(-1)
        handle.write(handle.read().index_select(m.dim, idx).contiguous())
        applied[(m.param, m.dim)] = idx
    return applied


def permute_hidden_space(opts: PruneOptions, result: DependencyResult, readers_of) -> dict:
    """One permutation of the hidden (residual) space for all its readers: their scores
    (``opts.ranking_score``: SparseGPT's saliency falls back to magnitude) stacked per unit, the
    permutation that keeps the most N:M score applied to the whole hidden group.
    ``readers_of(group)`` lists ``(param, in dim, weight [out, in], act_norm or None)``.
    Returns the report's ``space`` entry (``realised: none`` with why, when impossible)."""
    from slimgraph.sparsity.permutation import search_permutation
    from slimgraph.sparsity.scores import score

    n, m = opts.nm
    hidden = [g for g in result.groups if g.kind == "hidden" and g.layer is None]
    if len(hidden) != 1 or hidden[0].units % m:
        return {"realised": "none", "why": "no single hidden space whose size divides by M"}
    group = hidden[0]
    if group.reasons:
        return {"realised": "none", "why": "; ".join(group.reasons)}
    readers = readers_of(group)
    if not readers:
        return {"realised": "none", "why": "no pruned linear reads the hidden space"}
    parts = [stacked_scores(score(w, opts.ranking_score, act_norm=act, a=opts.a),
                            unit_positions(group, name, dim)).float()
             for name, dim, w, act in readers]
    res = search_permutation(torch.cat(parts), n, m, mode=opts.search)
    permute_group(result, group, res.perm)
    return {"realised": "space", "readers": len(readers), "units": group.units,
            "kept_before": res.kept_before, "kept_after": res.kept_after,
            "seconds": round(res.seconds, 2), "perm": res.perm.tolist()}


class GatherLinear(torch.nn.Linear):
    """``y = W x[..., perm] + b``: a linear whose weight columns were permuted."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.index_select(-1, self.input_perm), self.weight, self.bias)


def install_gather(model: torch.nn.Module, name: str, perm: torch.Tensor) -> GatherLinear:
    """Replace linear ``name`` by a GatherLinear storing ``W[:, perm]`` (same function)."""
    owner_path, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_path) if owner_path else model
    lin = getattr(owner, attr)
    new = GatherLinear(lin.in_features, lin.out_features, bias=lin.bias is not None,
                       device=lin.weight.device, dtype=lin.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(lin.weight[:, perm])
        if lin.bias is not None:
            new.bias.copy_(lin.bias)
    new.register_buffer("input_perm", perm.to(torch.long).clone())
    setattr(owner, attr, new)
    return new


def restore_gathers(model: torch.nn.Module, names: list[str]) -> None:
    """Before loading a checkpoint that has gathers: put GatherLinear modules in place."""
    for name in names:
        lin = model.get_submodule(name)
        install_gather(model, name, torch.arange(lin.in_features))
