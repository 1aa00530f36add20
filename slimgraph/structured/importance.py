"""Group-level magnitude importance: one score per unit over every member it touches."""

from __future__ import annotations

from collections.abc import Callable

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


def consumer_input_norms(model: torch.nn.Module, graph: Graph, windows: torch.Tensor,
                         batch: int = 8) -> dict[str, torch.Tensor]:
    """Sum of squares of every linear's input channels over calibration windows."""
    from slimgraph.ir.graph import OpKind

    weights = {n.inputs[1].name for n in graph.nodes if n.kind is OpKind.LINEAR}
    # the modules that multiply by each weight: found by the weight tensor, so a tied
    # lm_head counts under the embedding's name (and the embedding lookup itself is not
    # mistaken for a linear)
    readers: dict[int, list[torch.nn.Module]] = {}
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear) or type(mod).__name__ == "Conv1D":
            readers.setdefault(id(mod.weight), []).append(mod)
    sums: dict[str, torch.Tensor] = {}
    hooks = []
    for name in weights:
        try:
            param = model.get_parameter(name)
        except AttributeError:
            continue
        for mod in readers.get(id(param), []):
            def hook(_m, args, name=name):
                x = args[0].detach().double()
                s = x.pow(2).reshape(-1, x.shape[-1]).sum(0)
                sums[name] = sums.get(name, 0) + s

            hooks.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for i in range(0, len(windows), batch):
                model(input_ids=windows[i : i + batch], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return sums


def activation_importance(graph: Graph, group: ChannelGroup, sq_norms: dict[str, torch.Tensor],
                          linear_inputs: dict[str, int]) -> torch.Tensor:
    """Importance of each unit from what it feeds forward: for every member that is a
    linear's input dim, sum over the unit's positions j of ||X_j||^2 * ||W[:, j]||^2
    (the energy the unit contributes to that linear's output on calibration data)."""
    score = torch.zeros(group.units, dtype=torch.float64)
    used = False
    for m in group.members:
        if linear_inputs.get(m.param) != m.dim or m.param not in sq_norms:
            continue
        w = graph.params[m.param].param.read().to(torch.float64)
        other = [d for d in range(w.dim()) if d != m.dim]
        per_pos = w.pow(2).sum(dim=other) * sq_norms[m.param]
        owner = torch.from_numpy(unit_of_position(m, group.units))
        keep = owner >= 0
        score.index_add_(0, owner[keep], per_pos[keep])
        used = True
    if not used:
        raise ValueError(f"group {group.id} has no linear consuming its channels")
    return score


def activation_scorer(model: torch.nn.Module, graph: Graph, batches) -> Callable:
    """``group -> importance`` by :func:`activation_importance`, with input statistics
    summed over ``batches`` (token-id tensors ``[b, L]``; lengths may differ between
    batches)."""
    from slimgraph.ir.graph import OpKind

    norms: dict[str, torch.Tensor] = {}
    for ids in batches:
        for k, v in consumer_input_norms(model, graph, ids, batch=len(ids)).items():
            norms[k] = norms.get(k, 0) + v
    inputs = {n.inputs[1].name: n.attrs["w_in"] for n in graph.nodes if n.kind is OpKind.LINEAR}
    return lambda group: activation_importance(graph, group, norms, inputs)
