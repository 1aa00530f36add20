"""Which units to remove: ratios per group kind, with hardware and safety constraints.

- at least one unit is kept in every group;
- GQA heads are removed as whole KV-groups (a unit is a KV-group), so the
  query-per-KV ratio stays uniform;
- kept counts are rounded to a multiple of ``round_to`` where possible;
- protected layers are never touched.
Every group a ratio applies to but which is left alone gets a reason in the report.
"""

from __future__ import annotations

from typing import Literal

import torch

from slimgraph.errors import PipelineError
from slimgraph.ir.dependency import ChannelGroup


class NothingToPruneError(PipelineError):
    """A ratio names a group kind with nothing to prune (:func:`plan_counts`): ``reason``
    is ``"no-groups"`` (the analysis found no group of ``kind``) or ``"unprunable"``
    (every group of ``kind`` is refused). Callers branch on ``reason``, not the text."""

    def __init__(self, message: str, kind: str,
                 reason: Literal["no-groups", "unprunable"]) -> None:
        super().__init__(message)
        self.kind = kind
        self.reason = reason

    def __reduce__(self):
        return type(self), (str(self), self.kind, self.reason)


def removal_count(units: int, ratio: float, round_to: int) -> int:
    """Units to remove from a group of ``units`` for ``ratio``, kept count rounded."""
    n = int(round(ratio * units + 1e-9))
    if round_to > 1 and n > 0:
        kept = units - n
        rounded = max(round_to, int(round(kept / round_to)) * round_to)
        if rounded < units:
            n = units - rounded
    return n


def plan_counts(groups: list[ChannelGroup], ratios: dict[str, float], round_to: int,
                protect: set[int]) -> tuple[dict[int, int], list[str]]:
    """Per group id, how many units to remove; errors before any weight is read."""
    counts: dict[int, int] = {}
    skipped: list[str] = []
    for kind, ratio in ratios.items():
        if ratio == 0:
            continue
        targets = [g for g in groups if g.kind == kind]
        if not targets:
            raise NothingToPruneError(f"option '{kind}': the model has no "
                                      f"{kind} groups", kind, "no-groups")
        if not any(g.prunable for g in targets):
            why = targets[0].reasons[0] if targets[0].reasons else "unprunable"
            raise NothingToPruneError(f"option '{kind}': every {kind} group "
                                      f"is unprunable ({why})", kind, "unprunable")
        for g in targets:
            where = f"{kind} group {g.id}" + (f" (layer {g.layer})" if g.layer is not None else "")
            if not g.prunable:
                skipped.append(f"{where}: not prunable: {'; '.join(g.reasons)}")
                continue
            if g.layer is not None and g.layer in protect:
                skipped.append(f"{where}: layer is protected")
                continue
            n = removal_count(g.units, ratio, round_to)
            if n >= g.units:
                raise PipelineError(
                    f"option '{kind}': ratio {ratio} would remove all "
                    f"{g.units} units of {where}; at least one must be kept")
            if n == 0:
                skipped.append(f"{where}: {ratio} x {g.units} units rounds to 0 removed")
                continue
            counts[g.id] = n
    return counts, skipped


def counts_for_params(groups: list[ChannelGroup], ratios: dict[str, float], kind: str,
                      target: int, total: int, round_to: int,
                      protect: set[int]) -> tuple[float, dict[int, int], list[str]]:
    """A parameter-count target (``params=``): the smallest ratio of ``kind`` (the same in
    every group of that kind) that, with the fixed ``ratios`` of the other kinds, leaves
    at most ``target`` of the model's ``total`` parameters. A unit's cost is its group's
    ``params_per_unit``. Returns ``(ratio, counts, skipped)`` as :func:`plan_counts`."""

    def plan(r: float) -> tuple[dict[int, int], list[str]]:
        return plan_counts(groups, {**ratios, kind: r}, round_to, protect)

    def left(counts: dict[int, int]) -> int:
        cost = {g.id: g.params_per_unit for g in groups}
        return total - sum(n * cost[gid] for gid, n in counts.items())

    base, _ = plan_counts(groups, ratios, round_to, protect) if ratios else ({}, [])
    if left(base) <= target:
        raise PipelineError(f"option 'params': the model has {left(base):,} "
                            f"parameters {'after the other ratios ' if ratios else ''}already, "
                            f"at most the target {target:,}")
    groups_of_kind = [g for g in groups if g.kind == kind and g.prunable
                      and (g.layer is None or g.layer not in protect)]
    most = min((1 - 1 / g.units for g in groups_of_kind), default=0.0)
    most_counts, _ = plan(most) if groups_of_kind else ({}, [])
    if not groups_of_kind or left(most_counts) > target:
        raise PipelineError(f"option 'params': removing all but one unit of "
                            f"every {kind} group leaves {left(most_counts if groups_of_kind else base):,} "
                            f"parameters, more than the target {target:,}")
    lo, hi = 0.0, most  # left(plan(lo)) > target >= left(plan(hi))
    for _ in range(40):
        mid = (lo + hi) / 2
        if left(plan(mid)[0]) <= target:
            hi = mid
        else:
            lo = mid
    counts, skipped = plan(hi)
    return hi, counts, skipped


def choose(scores: torch.Tensor, n: int) -> list[int]:
    """The ``n`` least important units (ties broken by index)."""
    order = sorted(range(len(scores)), key=lambda u: (float(scores[u]), u))
    return sorted(order[:n])


def global_counts(groups: list[ChannelGroup], counts: dict[int, int],
                  scores: dict[int, torch.Tensor], floor: float, ceiling: float) -> dict[int, int]:
    """``allocation=global``: per kind, the same total number of units as ``counts`` (the
    uniform plan), spread over the groups by one ranking across layers. Each group's
    scores are standardised (FLAP: ``(s - mean) / std`` within the group), every unit is
    ranked on that common scale, and the lowest go, with at least ``floor`` and at most
    ``ceiling`` of each group's units removed (rounded half up; at least one unit kept)."""
    by_id = {g.id: g for g in groups}
    out: dict[int, int] = {}
    for kind in sorted({by_id[gid].kind for gid in counts}):
        gids = sorted(gid for gid in counts if by_id[gid].kind == kind)
        total = sum(counts[gid] for gid in gids)
        lo, hi, pool = {}, {}, []
        for gid in gids:
            units = by_id[gid].units
            lo[gid] = min(units - 1, int(floor * units + 0.5))
            hi[gid] = max(lo[gid], min(units - 1, int(ceiling * units + 0.5)))
            s = scores[gid].to(torch.float64)
            std = float(s.std()) if len(s) > 1 else 0.0
            z = sorted(((s - s.mean()) / std).tolist() if std > 0 else [0.0] * len(s))
            pool += [(z[r], gid, r) for r in range(lo[gid], hi[gid])]
        if not sum(lo.values()) <= total <= sum(hi.values()):
            raise PipelineError(
                f"option 'layer_floor/layer_ceiling': {kind}: the bounds "
                f"allow {sum(lo.values())}..{sum(hi.values())} units in all, the target is "
                f"{total}")
        alloc = dict(lo)
        for _, gid, _ in sorted(pool)[: total - sum(lo.values())]:
            alloc[gid] += 1
        out.update({gid: n for gid, n in alloc.items() if n > 0})
    return out
