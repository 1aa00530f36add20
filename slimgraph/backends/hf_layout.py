"""The files of a ``save-hf`` checkpoint, shared by the in-memory and the offloaded writer.

Both :func:`slimgraph.backends.hf_checkpoint.save_hf` (the whole model in memory) and
:func:`slimgraph.sparsity.offload.save_hf_offloaded` (streamed, one block at a time) write
the same kind of directory. What they share lives here, below both, so that neither
imports the other for it:

- :func:`param_shapes` -- every state-dict tensor's shape, as recorded in the section;
- :func:`transformers_can_build` -- would plain ``transformers`` build exactly these
  shapes and module attributes from the config? (decides ``"loader"``);
- :func:`finish_checkpoint` -- add the ``slimgraph`` section to ``config.json`` and move
  the finished temp dir into place.

Light at import time: PyTorch and transformers are imported inside the functions.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only
    import torch

__all__ = ["finish_checkpoint", "param_shapes", "transformers_can_build"]


def param_shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    """The shape of every tensor in ``model.state_dict()``, by name."""
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def transformers_can_build(config, shapes: dict[str, list[int]],
                           module_attrs: dict[str, dict] | None = None) -> bool:
    """Would `from_pretrained` build exactly these shapes from this config, with these
    module attributes (head counts, norm epsilons, embedding scales) already?"""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    arch = (getattr(config, "architectures", None) or [None])[0]
    try:
        import transformers

        cls = getattr(transformers, arch) if arch and hasattr(transformers, arch) else None
        with torch.device("meta"):
            if cls is not None:
                probe = cls(config)
            else:
                try:
                    probe = AutoModelForCausalLM.from_config(config)
                except ValueError:
                    probe = AutoModel.from_config(config)
    except Exception:
        return False
    return param_shapes(probe) == shapes and _has_attrs(probe, module_attrs or {})


def _has_attrs(model: torch.nn.Module, module_attrs: dict[str, dict]) -> bool:
    """Does ``model`` (built on meta) already have every recorded attribute value?
    Tensors on meta cannot be read; each recorded tensor has a number twin
    (``embed_scale`` / ``scalar_embed_scale``) that is compared instead."""
    import torch

    for name, attrs in module_attrs.items():
        try:
            module = model.get_submodule(name) if name else model
        except AttributeError:
            return False
        for key, want in attrs.items():
            owner = module.config if key.startswith("config.") else module
            have = getattr(owner, key.removeprefix("config."), None)
            if isinstance(have, torch.Tensor):
                continue
            if isinstance(want, float) and isinstance(have, (int, float)):
                if not math.isclose(have, want, rel_tol=1e-9):
                    return False
            elif have != want:
                return False
    return True


def finish_checkpoint(tmp: Path, out: Path, loader: str, module_attrs: dict[str, dict],
                      shapes: dict[str, list[int]], gathers: list[str] | None) -> None:
    """Add the slimgraph section to ``tmp/config.json``, then move ``tmp`` to ``out``."""
    from slimgraph.frontends.pruned_checkpoint import SECTION

    cfg_path = tmp / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("quantization_config", None)
    cfg[SECTION] = {"loader": loader, "module_attrs": module_attrs, "param_shapes": shapes,
                    "gather_linears": list(gathers or [])}
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
