"""Reloading a checkpoint written by ``save-hf`` (:mod:`slimgraph.backends.hf_checkpoint`).

Where transformers can build the saved shapes from the config, the checkpoint's
``config.json`` section says ``"loader": "transformers"`` and it is loaded with
``from_pretrained``; otherwise (per-layer sizes after non-uniform pruning, head counts an
architecture derives from hidden_size) :func:`load_pruned` rebuilds it: construct from the
config, resize parameters, replay the recorded module attributes, load the weights. The
directory is checked before anything in it is read (:mod:`slimgraph.frontends.model_folder`:
files outside it, custom code, sizes beyond the machine).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from slimgraph.errors import ModelLoadError
from slimgraph.frontends.hf_build import one_line, quiet_transformers
from slimgraph.frontends.model_folder import check_folder, check_size, refuse_custom_code_in

__all__ = ["SECTION", "is_pruned_checkpoint", "load_pruned"]

SECTION = "slimgraph"  # the section of config.json that save-hf writes


def is_pruned_checkpoint(path: Path) -> bool:
    cfg = Path(path) / "config.json"
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and SECTION in data


def load_pruned(path: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Rebuild a model saved by `save-hf`, whatever its per-layer sizes. The directory is
    checked first (files outside it, custom code, sizes: ``frontends/model_folder.py``)."""
    import transformers
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from slimgraph.structured.removal import sync_module_sizes

    path = Path(path)
    check_folder(path)
    refuse_custom_code_in(path)
    try:
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
        section = raw[SECTION]
        config = AutoConfig.from_pretrained(str(path), local_files_only=True,
                                            trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"'{path}' is not a slimgraph checkpoint: {one_line(e)}") from e
    check_size(config, dtype=dtype, meta=False, label=str(path / "config.json"))
    arch = (config.architectures or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise ModelLoadError(f"'{path}': unknown architecture {arch!r}")
    if section.get("loader") == "transformers":
        with quiet_transformers():
            model = cls.from_pretrained(str(path), dtype=dtype, local_files_only=True,
                                        trust_remote_code=False)
        return model.eval()
    model = _build_resized(cls, config, section)
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        try:
            state.update(load_file(str(f)))
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ...
            raise ModelLoadError(f"weights file '{f}' is not a readable safetensors file "
                                 f"(truncated or corrupt?): {one_line(e)}") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and k in section["param_shapes"]
               and k not in state]
    if unexpected or [k for k in missing if not _is_tied(model, k)]:
        raise ModelLoadError(f"'{path}': weights do not match the model "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    sync_module_sizes(model)
    return model.to(dtype).eval()


def _is_tied(model, key: str) -> bool:
    emb = model.get_input_embeddings()
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return out is not None and emb is not None and out.weight is emb.weight and \
        key.endswith("weight")


def _build_resized(cls, config, section) -> torch.nn.Module:
    from slimgraph.structured.removal import sync_module_sizes, set_module_attr

    from slimgraph.sparsity.deploy import restore_gathers

    model = cls(config)
    restore_gathers(model, section.get("gather_linears", []))
    for name, shape in section["param_shapes"].items():
        owner_path, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_path) if owner_path else model
        cur = getattr(owner, attr, None)
        if isinstance(cur, torch.Tensor) and list(cur.shape) != shape:
            new = torch.zeros(shape, dtype=cur.dtype)
            if isinstance(cur, torch.nn.Parameter):
                setattr(owner, attr, torch.nn.Parameter(new, requires_grad=cur.requires_grad))
            else:
                owner._buffers[attr] = new
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        out = model.get_output_embeddings()
        if out is not None:
            out.weight = model.get_input_embeddings().weight
    for module, attrs in section.get("module_attrs", {}).items():
        m = model.get_submodule(module) if module else model
        for k, v in attrs.items():
            set_module_attr(m, k, v)
    sync_module_sizes(model)
    return model
