"""Physically remove selected units from a PyTorch model, or zero them (the masked model).

Removal slices every member of every selected unit through its parameter handle
(ties stay tied), then brings the modules in line with their new weights: ``nn.Linear``
/ ``Conv1D`` / ``nn.Embedding`` / ``nn.LayerNorm`` sizes, head counts of attention
modules (from the graph: a KV-group unit carries its query heads), and the HF config.
Removing hidden channels applies the RMSNorm correction (ALGORITHMS.md section 4):
the slim norm averages over D' < D channels, so its gains are multiplied by sqrt(D/D')
and its epsilon by D/D' — then the slim model equals the masked model exactly.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import torch

from slimgraph.ir.dependency import ChannelGroup, DependencyResult

HEAD_COUNT_ATTRS = ("num_heads", "num_attention_heads", "n_head")
KV_COUNT_ATTRS = ("num_key_value_heads", "num_kv_heads")
HEAD_WIDTH_ATTRS = ("split_size", "all_head_size")
EPS_ATTRS = ("variance_epsilon", "eps", "epsilon")


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


def module_prefix(names: list[str]) -> str:
    parts = [n.split(".")[:-1] for n in names]
    common = []
    for level in zip(*parts):
        if all(p == level[0] for p in level):
            common.append(level[0])
        else:
            break
    return ".".join(common)


def remove_units(model: torch.nn.Module, result: DependencyResult,
                 selection: dict[int, list[int]]) -> dict[str, Any]:
    """Slice the selected units out of ``model``; return a report of what changed."""
    by_id = {g.id: g for g in result.groups}
    graph = result.graph
    before = graph.num_parameters()
    report: dict[str, Any] = {"removed_units": {}, "module_attrs": {}, "notes": []}
    # hidden sizes before slicing, for the norm correction
    hidden = [(by_id[gid], len(units)) for gid, units in selection.items()
              if by_id[gid].kind == "hidden" and units]
    for (param, dim), idx in sorted(positions(result, selection).items()):
        handle = graph.params[param].param
        keep = [i for i in range(handle.shape[dim]) if i not in idx]
        handle.slice(dim, keep)
    for gid, units in selection.items():
        g = by_id[gid]
        key = f"{g.kind}" + (f"[{g.layer}]" if g.layer is not None else "")
        report["removed_units"][key] = report["removed_units"].get(key, 0) + len(units)
        if g.kind == "heads" and units:
            _update_head_counts(model, g, g.units - len(units), report)
    _sync_module_sizes(model)
    for g, n_removed in hidden:
        _correct_norms(model, g, g.units, g.units - n_removed, report)
    _update_config(model, result, selection, report)
    report["params_before"] = before
    report["params_after"] = sum(
        p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return report


def _update_head_counts(model, g: ChannelGroup, kept_units: int, report) -> None:
    """Set head-count attributes on the attention module(s) owning the group."""
    prefix = module_prefix([m.param for m in g.members])
    root = model.get_submodule(prefix) if prefix else model
    q_heads = kept_units * g.queries_per_unit
    for sub, module in root.named_modules():
        name = f"{prefix}.{sub}" if prefix and sub else (prefix or sub)
        changes: dict[str, int] = {}
        old_q = next((getattr(module, a) for a in HEAD_COUNT_ATTRS
                      if isinstance(getattr(module, a, None), int)), None)
        if old_q is None:
            continue
        for attr in HEAD_COUNT_ATTRS:
            if isinstance(getattr(module, attr, None), int):
                changes[attr] = q_heads
        for attr in KV_COUNT_ATTRS:
            if isinstance(getattr(module, attr, None), int):
                changes[attr] = kept_units if g.unit == "kv-group" else q_heads
        for attr in HEAD_WIDTH_ATTRS:
            val = getattr(module, attr, None)
            if isinstance(val, int) and old_q > 0 and val % old_q == 0:
                changes[attr] = val // old_q * q_heads
        for attr, val in changes.items():
            setattr(module, attr, val)
        report["module_attrs"].setdefault(name, {}).update(changes)


def _sync_module_sizes(model: torch.nn.Module) -> None:
    for module in model.modules():
        w = getattr(module, "weight", None)
        if not isinstance(w, torch.Tensor):
            continue
        if isinstance(module, torch.nn.Linear):
            module.out_features, module.in_features = w.shape
        elif isinstance(module, torch.nn.Embedding):
            module.num_embeddings, module.embedding_dim = w.shape
        elif isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm)):
            module.normalized_shape = (w.shape[0],)
        elif type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
            module.nf = w.shape[1]


def _correct_norms(model, g: ChannelGroup, d: int, d_kept: int, report) -> None:
    members = {m.param for m in g.members}
    scale = math.sqrt(d / d_kept)
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if not isinstance(w, torch.Tensor) or f"{name}.weight" not in members:
            continue
        cls = type(module).__name__
        if "RMSNorm" in cls:
            with torch.no_grad():
                w.mul_(scale)
            for attr in EPS_ATTRS:
                if isinstance(getattr(module, attr, None), float):
                    setattr(module, attr, getattr(module, attr) * d / d_kept)
                    report["module_attrs"].setdefault(name, {})[attr] = getattr(module, attr)
        elif "LayerNorm" in cls or isinstance(module, torch.nn.LayerNorm):
            note = (f"{name}: LayerNorm statistics now span {d_kept} instead of {d} channels; "
                    "the slim model approximates the masked model (its mean changes)")
            if note not in report["notes"]:
                report["notes"].append(note)


def _update_config(model, result, selection, report) -> None:
    """Write new sizes into the HF config where they are uniform over layers."""
    config = getattr(model, "config", None)
    if config is None:
        return
    kept: dict[str, dict[Any, int]] = defaultdict(dict)
    head_dim = None
    for g in result.groups:
        if not g.prunable or g.kind not in ("heads", "mlp", "hidden"):
            continue
        n = g.units - len(selection.get(g.id, ()))
        if g.kind == "heads":
            kept["heads"][g.layer] = n * g.queries_per_unit
            kept["kv"][g.layer] = n
            head_dim = min(len(m.indices(0)) for m in g.members)
        else:
            kept[g.kind][g.layer] = n
    updates: dict[str, Any] = {}
    for kind, attrs in (("hidden", ("hidden_size",)),
                        ("mlp", ("intermediate_size", "ffn_dim", "n_inner")),
                        ("heads", ("num_attention_heads",)),
                        ("kv", ("num_key_value_heads",))):
        sizes = set(kept[kind].values())
        if len(sizes) == 1:
            (size,) = sizes
            updates.update({a: size for a in attrs
                            if getattr(config, a, None) not in (None, size)})
        elif len(sizes) > 1:
            report["notes"].append(
                f"{kind} sizes differ per layer: "
                f"{dict(sorted(kept[kind].items(), key=lambda kv: (kv[0] is None, kv[0] or 0)))}")
    if head_dim is not None and hasattr(config, "head_dim") and (
            "num_attention_heads" in updates or "hidden_size" in updates):
        updates["head_dim"] = head_dim
    eps = [v for attrs in report["module_attrs"].values() for k, v in attrs.items()
           if k in EPS_ATTRS]
    if eps and getattr(config, "rms_norm_eps", None) is not None:
        updates["rms_norm_eps"] = eps[-1]
    for attr, val in updates.items():
        setattr(config, attr, val)
    report["config_updates"] = updates
