"""Group-level magnitude importance: one score per unit over every member it touches."""

from __future__ import annotations

import numpy as np
import torch

from slimgraph.ir.dependency import ChannelGroup, Member
from slimgraph.ir.graph import Graph


def unit_of_position(member: Member, units: int) -> np.ndarray:
    """For each index of the member's dim, the unit that owns it (-1: none)."""
    owner = np.full(member.size, -1, dtype=np.int64)
    for u in range(units):
        owner[member.indices(u)] = u
    return owner


def group_importance(graph: Graph, group: ChannelGroup, norm: str = "l2") -> torch.Tensor:
    """Importance of each unit: the L1 or L2 norm of all weights the unit owns."""
    if norm not in ("l1", "l2"):
        raise ValueError(f"unknown importance norm {norm!r}")
    score = torch.zeros(group.units, dtype=torch.float64)
    for m in group.members:
        handle = graph.params[m.param].param
        if handle.kind == "buffer":
            continue
        w = handle.read().to(torch.float64)
        other = [d for d in range(w.dim()) if d != m.dim]
        per_pos = (w.abs() if norm == "l1" else w.pow(2)).sum(dim=other) if other else \
            (w.abs() if norm == "l1" else w.pow(2))
        owner = torch.from_numpy(unit_of_position(m, group.units))
        keep = owner >= 0
        score.index_add_(0, owner[keep], per_pos[keep])
    return score.sqrt() if norm == "l2" else score
