"""A reloadable Hugging Face checkpoint of the (slimmed) model (the `save-hf` pass writes it).

OUTDIR/hf/ holds ``model.safetensors``, ``config.json`` and the tokenizer. Where the
new sizes are uniform and expressible in the architecture's config (LLaMA-family:
hidden_size, intermediate_size, head counts, explicit head_dim, rms_norm_eps),
plain ``transformers`` reloads the directory. Where they are not (per-layer sizes
after non-uniform pruning, or head counts that an architecture derives from
hidden_size), config.json gets a ``slimgraph`` section with every parameter shape and
the module attributes that removal changed, and :func:`load_pruned` (used by
``slimgraph`` for any directory with that section; in
:mod:`slimgraph.frontends.pruned_checkpoint`) rebuilds the model: construct
from the config, resize parameters, replay attributes, load the weights.
The section records which loader is needed: ``"loader": "transformers"`` or
``"slimgraph"``. After saving, the directory is reloaded and its outputs compared.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slimgraph.backends.hf_layout import finish_checkpoint, param_shapes, transformers_can_build
from slimgraph.io import make_temp_dir

if TYPE_CHECKING:  # annotations only: importing the pass does not import PyTorch
    import torch

__all__ = ["finish_checkpoint", "load_pruned", "max_rel_error", "save_hf"]


def load_pruned(path: str | Path, *args: Any, **kwargs: Any) -> torch.nn.Module:
    """:func:`slimgraph.frontends.pruned_checkpoint.load_pruned` (same arguments): the model
    of a ``save-hf`` directory, whatever its per-layer sizes."""
    from slimgraph.frontends.pruned_checkpoint import load_pruned as load

    return load(path, *args, **kwargs)


def save_hf(model: torch.nn.Module, tokenizer, out: Path, module_attrs: dict[str, dict],
            base_config=None, gathers: list[str] | None = None) -> dict[str, Any]:
    """Write the checkpoint to ``out`` atomically (a temp dir renamed at the end).

    ``base_config`` is the config before pruning: written instead of the updated one
    when transformers cannot build the new shapes from the updated config.
    """
    from slimgraph.frontends.hf_build import quiet_transformers

    config = model.config
    shapes = param_shapes(model)
    loader = "transformers" if transformers_can_build(config, shapes, module_attrs) else "slimgraph"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out.parent, f".{out.name}-")
    try:
        with quiet_transformers():
            if loader == "slimgraph" and base_config is not None:
                # written instead of the updated config, which may not even validate
                # (Gemma 3: hidden_size no multiple of the heads left): buildable, and the
                # shapes come from the section
                base_config = copy.deepcopy(base_config)
                base_config.architectures = [type(model).__name__]
                model.config = base_config
            try:
                model.save_pretrained(str(tmp), safe_serialization=True)
            finally:
                model.config = config
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
        finish_checkpoint(tmp, out, loader, module_attrs, shapes, gathers)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"dir": str(out), "loader": loader}


def max_rel_error(a: torch.nn.Module, b: torch.nn.Module, vocab: int, seq: int = 11) -> float:
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, max(vocab, 2), (1, seq), generator=g)
    with torch.no_grad():
        ya = a(input_ids=ids, use_cache=False).logits
        yb = b(input_ids=ids, use_cache=False).logits
    return float((ya - yb).norm() / ya.norm().clamp_min(1e-30))
