"""Which units to remove: ratios per group kind, with hardware and safety constraints.

- at least one unit is kept in every group;
- GQA heads are removed as whole KV-groups (a unit is a KV-group), so the
  query-per-KV ratio stays uniform;
- kept counts are rounded to a multiple of ``round_to`` where possible;
- protected layers are never touched.
Every group a ratio applies to but which is left alone gets a reason in the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from slimgraph.errors import PipelineError
from slimgraph.ir.dependency import ChannelGroup


@dataclass
class Plan:
    remove: dict[int, list[int]] = field(default_factory=dict)  # group id -> units
    skipped: list[str] = field(default_factory=list)  # explained refusals


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
                protect: set[int], pass_name: str) -> tuple[dict[int, int], list[str]]:
    """Per group id, how many units to remove; errors before any weight is read."""
    counts: dict[int, int] = {}
    skipped: list[str] = []
    for kind, ratio in ratios.items():
        if ratio == 0:
            continue
        targets = [g for g in groups if g.kind == kind]
        if not targets:
            raise PipelineError(f"pass '{pass_name}', option '{kind}': the model has no "
                                f"{kind} groups")
        if not any(g.prunable for g in targets):
            why = targets[0].reasons[0] if targets[0].reasons else "unprunable"
            raise PipelineError(f"pass '{pass_name}', option '{kind}': every {kind} group is "
                                f"unprunable ({why})")
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
                    f"pass '{pass_name}', option '{kind}': ratio {ratio} would remove all "
                    f"{g.units} units of {where}; at least one must be kept")
            if n == 0:
                skipped.append(f"{where}: {ratio} x {g.units} units rounds to 0 removed")
                continue
            counts[g.id] = n
    return counts, skipped


def choose(scores: torch.Tensor, n: int) -> list[int]:
    """The ``n`` least important units (ties broken by index)."""
    order = sorted(range(len(scores)), key=lambda u: (float(scores[u]), u))
    return sorted(order[:n])
