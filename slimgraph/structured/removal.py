"""Physically remove selected units from a PyTorch model.

Removal slices every member of every selected unit through its parameter handle
(:func:`~slimgraph.structured.unit_slicing.slice_units`, as on an ONNX model; ties stay
tied), then brings the modules in line with their new weights: ``nn.Linear``
/ ``Conv1D`` / ``nn.Embedding`` / ``nn.LayerNorm`` sizes, head counts of attention
modules (from the graph: a KV-group unit carries its query heads), and the HF config.
Every RMSNorm whose channels shrink gets the norm correction (ALGORITHMS.md section 4):
the slim norm averages over D' < D channels, so its gains are multiplied by sqrt(D/D')
and its epsilon by D/D' — then the slim model equals the masked model exactly. That is
the residual norms when hidden channels go, and norms over all of a layer's heads
(OLMo-2's q_norm / k_norm) when heads go. Gemma-style norms that multiply by (1 + w)
get (1 + w) scaled. Attention modules that read head counts from their config at run
time (Phi-3 splits its fused qkv_proj at ``config.num_attention_heads * head_dim``) get
a config of their own with the layer's counts.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from typing import Any

import torch

from slimgraph.ir.dependency import ChannelGroup, DependencyResult
from slimgraph.ir.graph import OpKind
from slimgraph.structured.unit_slicing import slice_units

HEAD_COUNT_ATTRS = ("num_heads", "num_attention_heads", "n_head")
KV_COUNT_ATTRS = ("num_key_value_heads", "num_kv_heads")
HEAD_WIDTH_ATTRS = ("split_size", "all_head_size")
EPS_ATTRS = ("variance_epsilon", "eps", "epsilon")
# embedding output scales derived from hidden_size (Gemma: sqrt(hidden_size)); they keep
# the original value after hidden channels go, so the slim model equals the masked one
EMBED_SCALE_ATTRS = ("scalar_embed_scale", "embed_scale")


def set_module_attr(module: torch.nn.Module, key: str, value: Any) -> None:
    """Set one attribute recorded under a report's ``module_attrs`` (removal, and the
    checkpoint loader replaying it). ``config.X`` gives the module a config of its own
    (the model's is shared by every layer) with X set; a tensor attribute (a buffer such
    as Gemma's ``embed_scale``) is filled with the number."""
    if key.startswith("config."):
        module.config = copy.copy(module.config)
        setattr(module.config, key.removeprefix("config."), value)
        return
    current = getattr(module, key, None)
    if isinstance(current, torch.Tensor) and not isinstance(value, torch.Tensor):
        with torch.no_grad():
            current.fill_(value)
    else:
        setattr(module, key, value)


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
    norm_sizes = _norm_sizes(model)  # before slicing, for the norm correction
    counts = attention_counts(model, result, selection)
    hidden_removed = any(by_id[gid].kind == "hidden" and units for gid, units in selection.items())
    report: dict[str, Any] = {"removed_units": slice_units(result, selection),
                              "module_attrs": {}, "notes": []}
    for prefix, q_heads, kv_heads, changed in counts.values():
        if changed:
            _update_head_counts(model, prefix, q_heads, kv_heads, report)
    sync_module_sizes(model)
    _correct_norms(model, norm_sizes, report)
    if hidden_removed:
        _keep_embed_scales(model, report)
        _resize_weightless_norms(model, result, selection, report)
    _update_config(model, result, selection, counts, report)
    report["params_before"] = before
    report["params_after"] = sum(
        p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return report


def attention_counts(model, result: DependencyResult, selection: dict[int, list[int]]
                     ) -> dict[Any, tuple[str, int, int, bool]]:
    """Per layer with attention groups: (module prefix, query heads kept, KV heads kept,
    whether anything changes). A layer's heads group removes whole KV-groups (or heads),
    its qheads group the same query head slot of every KV-group."""
    by_layer: dict[Any, dict[str, ChannelGroup]] = defaultdict(dict)
    for g in result.groups:
        if g.kind in ("heads", "qheads") and g.prunable:
            by_layer[g.layer][g.kind] = g
    out = {}
    for layer, gs in by_layer.items():
        heads, qheads = gs.get("heads"), gs.get("qheads")
        removed = {k: len(selection.get(g.id, ())) for k, g in gs.items()}
        if qheads is None:  # one query head per unit (MHA) or a fixed ratio (GQA)
            q_kept = heads.units - removed["heads"]
            q_heads = q_kept * heads.queries_per_unit
            kv_heads = q_kept if heads.unit == "kv-group" else q_heads
        else:
            q_per = qheads.units - removed["qheads"]
            if heads is not None:
                kv_heads = heads.units - removed.get("heads", 0)
            else:  # one KV head: no heads group
                per_slot = len(qheads.members[0].indices(0))
                kv_heads = max(1, per_slot // _head_dim(model, qheads))
            q_heads = kv_heads * q_per
        members = [m.param for g in gs.values() for m in g.members]
        out[layer] = (module_prefix(members), q_heads, kv_heads, any(removed.values()))
    return out


def _update_head_counts(model, prefix: str, q_heads: int, kv_heads: int, report) -> None:
    """Set head-count attributes on the attention module(s) under ``prefix``."""
    root = model.get_submodule(prefix) if prefix else model
    for sub, module in root.named_modules():
        name = f"{prefix}.{sub}" if prefix and sub else (prefix or sub)
        changes: dict[str, int] = {}
        config = getattr(module, "config", None)
        config_q = getattr(config, "num_attention_heads", None)
        old_q = next((getattr(module, a) for a in HEAD_COUNT_ATTRS
                      if isinstance(getattr(module, a, None), int)), None)
        if old_q is None and isinstance(config_q, int):
            old_q = config_q
        if old_q is None:
            continue
        if isinstance(config_q, int) and config_q != q_heads:
            # the module may read its config at run time (Phi-3's qkv split)
            changes["config.num_attention_heads"] = q_heads
            if isinstance(getattr(config, "num_key_value_heads", None), int):
                changes["config.num_key_value_heads"] = kv_heads
        for attr in HEAD_COUNT_ATTRS:
            if isinstance(getattr(module, attr, None), int):
                changes[attr] = q_heads
        for attr in KV_COUNT_ATTRS:
            if isinstance(getattr(module, attr, None), int):
                changes[attr] = kv_heads
        if isinstance(getattr(module, "num_key_value_groups", None), int):
            changes["num_key_value_groups"] = q_heads // kv_heads  # repeat_kv's factor
        for attr in HEAD_WIDTH_ATTRS:
            val = getattr(module, attr, None)
            if isinstance(val, int) and old_q > 0 and val % old_q == 0:
                changes[attr] = val // old_q * q_heads
        changes = {k: v for k, v in changes.items() if getattr(module, k, None) != v}
        for attr, val in changes.items():
            set_module_attr(module, attr, val)
        if changes:
            report["module_attrs"].setdefault(name, {}).update(changes)


def sync_module_sizes(model: torch.nn.Module) -> None:
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


def _is_rms_norm(module: torch.nn.Module) -> bool:
    return "RMSNorm" in type(module).__name__ or isinstance(module, torch.nn.RMSNorm)


def _is_layer_norm(module: torch.nn.Module) -> bool:
    return "LayerNorm" in type(module).__name__ or isinstance(module, torch.nn.LayerNorm)


def _norm_sizes(model: torch.nn.Module) -> dict[str, int]:
    """Channel count of every RMSNorm / LayerNorm with a 1-D weight."""
    return {name: m.weight.shape[0] for name, m in model.named_modules()
            if (_is_rms_norm(m) or _is_layer_norm(m))
            and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 1}


def _eps(module: torch.nn.Module) -> tuple[str, float] | None:
    """(attribute, value) of a norm's epsilon; torch.nn.RMSNorm's ``eps=None`` means the
    dtype's machine epsilon."""
    if isinstance(module, torch.nn.RMSNorm) and module.eps is None:
        return "eps", torch.finfo(module.weight.dtype).eps
    attr = next((a for a in EPS_ATTRS if isinstance(getattr(module, a, None), float)), None)
    return (attr, getattr(module, attr)) if attr else None


def rms_gain_form(module: torch.nn.Module) -> str | None:
    """How an RMSNorm applies its weight ``w`` to ``x / rms(x)``: ``"scale"`` (times w),
    ``"offset"`` (times 1 + w: Gemma), or None (neither: not corrected). Found by
    running the module on a random input, so any implementation is classified."""
    eps = _eps(module)
    if eps is None:
        return None
    w = module.weight.detach().float()
    x = torch.randn(4, w.shape[0], generator=torch.Generator().manual_seed(0))
    probe = copy.deepcopy(module).float()  # a bf16 model's rounding would hide the form
    with torch.no_grad():
        y = probe(x).float()
    x_hat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps[1])
    for form, gain in (("scale", w), ("offset", 1 + w)):
        if torch.allclose(y, x_hat * gain, rtol=1e-3, atol=1e-5):
            return form
    return None


def _correct_norms(model, sizes_before: dict[str, int], report) -> None:
    """The norm correction for every norm whose channels were sliced (module docstring)."""
    for name, d in sizes_before.items():
        module = model.get_submodule(name)
        d_kept = module.weight.shape[0]
        if d_kept == d:
            continue
        if _is_rms_norm(module):
            form = rms_gain_form(module)
            if form is None:
                report["notes"].append(
                    f"{name}: {type(module).__name__} is not x/rms(x) times w or (1 + w); its "
                    f"statistics now span {d_kept} instead of {d} channels and are not corrected")
                continue
            scale = math.sqrt(d / d_kept)
            with torch.no_grad():
                if form == "scale":
                    module.weight.mul_(scale)
                else:  # (1 + w) * scale = 1 + w'
                    module.weight.add_(1).mul_(scale).sub_(1)
            attr, eps = _eps(module)
            setattr(module, attr, eps * d / d_kept)
            report["module_attrs"].setdefault(name, {})[attr] = eps * d / d_kept
        else:
            _note_layer_norm(report, name, d, d_kept)


def _note_layer_norm(report, name: str, d: int, d_kept: int) -> None:
    note = (f"{name}: LayerNorm statistics now span {d_kept} instead of {d} channels; "
            "the slim model approximates the masked model (its mean changes)")
    if note not in report["notes"]:
        report["notes"].append(note)


def _resize_weightless_norms(model, result: DependencyResult, selection, report) -> None:
    """Norms without a weight (OLMo's LayerNorm) hold their size in ``normalized_shape``
    only: the hidden group has no member there, so it is set here, found through the
    graph's norm nodes and their modules."""
    by_id = {g.id: g for g in result.groups}
    new_size = {g.units: g.units - len(units) for gid, units in selection.items()
                for g in [by_id[gid]] if g.kind == "hidden" and units}
    for node in result.graph.nodes:
        if node.kind != OpKind.NORM or (len(node.inputs) > 1 and node.inputs[1] is not None):
            continue
        path = node.meta.get("module")
        try:
            module = model.get_submodule(path) if path else None
        except AttributeError:
            continue
        shape = getattr(module, "normalized_shape", None)
        if isinstance(shape, (tuple, list)) and len(shape) == 1 and shape[0] in new_size:
            module.normalized_shape = (new_size[shape[0]],)
            report["module_attrs"].setdefault(path, {})["normalized_shape"] = [new_size[shape[0]]]
            if _is_layer_norm(module):
                _note_layer_norm(report, path, shape[0], new_size[shape[0]])


def _keep_embed_scales(model, report) -> None:
    """Record embedding scales derived from hidden_size (see EMBED_SCALE_ATTRS), so that a
    checkpoint loader rebuilding from the new config replays the original value."""
    for name, module in model.named_modules():
        for attr in EMBED_SCALE_ATTRS:
            val = getattr(module, attr, None)
            if isinstance(val, torch.Tensor) and val.numel() == 1:
                val = float(val)
            if isinstance(val, float):
                report["module_attrs"].setdefault(name, {})[attr] = val


def _head_dim(model, g: ChannelGroup) -> int:
    """Channels per head of a heads group: the attention module's ``head_dim`` where it
    has one, else the narrowest member's share of a unit (k_proj's rows; a fused qkv_proj
    holds several heads' rows per unit)."""
    prefix = module_prefix([m.param for m in g.members])
    root = model.get_submodule(prefix) if prefix else model
    for module in root.modules():
        if isinstance(getattr(module, "head_dim", None), int):
            return module.head_dim
    return min(len(m.indices(0)) for m in g.members)


def _update_config(model, result, selection, counts, report) -> None:
    """Write new sizes into the HF config where they are uniform over layers."""
    config = getattr(model, "config", None)
    if config is None:
        return
    kept: dict[str, dict[Any, int]] = defaultdict(dict)
    for g in result.groups:
        if g.prunable and g.kind in ("mlp", "hidden"):
            kept[g.kind][g.layer] = g.units - len(selection.get(g.id, ()))
    for layer, (_, q_heads, kv_heads, _) in counts.items():
        kept["heads"][layer], kept["kv"][layer] = q_heads, kv_heads
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
    attention = next((g for g in result.groups if g.prunable and g.kind in ("heads", "qheads")),
                     None)
    if attention is not None and ("num_attention_heads" in updates or "hidden_size" in updates):
        # explicit, also where the architecture would derive it from hidden_size / heads
        updates["head_dim"] = _head_dim(model, attention)
    # one epsilon for every RMSNorm (all corrected alike): the config can say it; else
    # the per-module values in module_attrs need the slimgraph loader
    eps = {e[1] for m in model.modules() if _is_rms_norm(m) for e in [_eps(m)] if e}
    if len(eps) == 1 and getattr(config, "rms_norm_eps", None) not in (None, *eps):
        updates["rms_norm_eps"] = eps.pop()
    for attr, val in list(updates.items()):
        try:
            setattr(config, attr, val)
        except AttributeError:  # a derived property (Falcon's head_dim): left to derive
            del updates[attr]
    report["config_updates"] = updates
