"""Removing channel-group units from the weights, the same for every model kind.

A selection (group id -> unit indices) names, through the groups' members, the positions
of every weight the units own (:func:`positions`). :func:`slice_units` cuts them out
through the graph's parameter handles (a PyTorch module's tensor or an ONNX initializer;
tied weights are one handle, so they stay tied); :func:`mask_units` zeroes them instead
(the *masked model*, which the slim model must equal). What a model needs after its
weights shrink -- module sizes, head counts, the config and the RMSNorm correction on a
PyTorch model (:mod:`slimgraph.structured.removal`), shape constants and recorded shapes
in an ONNX graph (:mod:`slimgraph.structured.onnx_removal`) -- is the kind's own.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from slimgraph.ir.dependency import DependencyResult


def positions(result: DependencyResult, selection: dict[int, list[int]]
              ) -> dict[tuple[str, int], set[int]]:
    """(param, dim) -> indices to remove, over all selected units of all groups."""
    by_id = {g.id: g for g in result.groups}
    out: dict[tuple[str, int], set[int]] = defaultdict(set)
    for gid, units in selection.items():
        g = by_id[gid]
        for m in g.members:
            for u in units:
                out[(m.param, m.dim)].update(m.indices(u))
    return out


def mask_units(result: DependencyResult, selection: dict[int, list[int]]) -> None:
    """Zero every weight the selected units own (the 'masked model')."""
    for (param, dim), idx in positions(result, selection).items():
        handle = result.graph.params[param].param
        w = handle.read().clone()
        w.index_fill_(dim, torch.tensor(sorted(idx), dtype=torch.long), 0.0)
        handle.write(w)


def slice_units(result: DependencyResult, selection: dict[int, list[int]]) -> dict[str, int]:
    """Cut every weight position the selected units own out of its tensor (through the
    parameter handles); the count of removed units by group kind and layer (the
    report's ``removed_units``, keys like ``mlp[3]``)."""
    graph = result.graph
    for (param, dim), idx in sorted(positions(result, selection).items()):
        handle = graph.params[param].param
        handle.slice(dim, [i for i in range(handle.shape[dim]) if i not in idx])
    by_id = {g.id: g for g in result.groups}
    removed: dict[str, int] = {}
    for gid, units in selection.items():
        g = by_id[gid]
        key = f"{g.kind}" + (f"[{g.layer}]" if g.layer is not None else "")
        removed[key] = removed.get(key, 0) + len(units)
    return removed
