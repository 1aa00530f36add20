"""`save-hf`: a reloadable Hugging Face checkpoint of the (slimmed) model.

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
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slimgraph.backends.hf_layout import finish_checkpoint, param_shapes, transformers_can_build
from slimgraph.errors import PipelineError, SlimgraphError
from slimgraph.io import make_temp_dir
from slimgraph.passes.base import CompileState, Pass, PassResult
from slimgraph.passes.registry import register

if TYPE_CHECKING:  # annotations only: importing the pass does not import PyTorch
    import torch

__all__ = ["SaveHF", "finish_checkpoint", "load_pruned", "max_rel_error", "save_hf"]


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


@dataclass
class SaveHF(Pass):
    name = "save-hf"
    summary = "write OUTDIR/hf: safetensors, config, tokenizer (reload-checked)"
    writes_files = True
    offload_ok = True
    subdir: str = "hf"
    check: bool = True
    tolerance: float = 1e-5

    def check_options(self) -> None:
        if not self.subdir or "/" in self.subdir or self.subdir in (".", ".."):
            raise self.option_error("subdir", f"{self.subdir!r} must be a plain directory name")
        if self.subdir == "report.json" or self.subdir.startswith(".") or any(
                c == "\\" or ord(c) < 32 for c in self.subdir):
            raise self.option_error("subdir", f"{self.subdir!r} is a name slimgraph keeps for "
                                    "itself in OUTDIR (report.json, .slimgraph-*) or not a "
                                    "plain directory name")

    def requires(self, state: CompileState) -> None:
        self.require_torch(state, out_dir=True)
        if not hasattr(state.model, "save_pretrained"):
            raise PipelineError(f"pass '{self.name}' needs a transformers model")

    def run(self, state: CompileState) -> PassResult:
        out = state.out_dir / self.subdir
        if state.offload is not None:  # streamed from the offload store; see sparsity/offload.py
            from slimgraph.sparsity.offload import save_hf_offloaded

            report = save_hf_offloaded(state.offload, state.loaded.tokenizer, out,
                                       state.module_attrs, gathers=state.gathers,
                                       progress=state.progress)
            state.files.append(str(out))
            return PassResult(False, report)
        report = save_hf(state.model, state.loaded.tokenizer, out, state.module_attrs,
                         state.original_config, state.gathers)
        if self.check:
            vocab = int(getattr(state.model.config, "vocab_size", 2) or 2)
            try:
                err = max_rel_error(state.model, load_pruned(out), vocab)
            except SlimgraphError:
                raise
            except Exception as exc:  # the reloaded model does not run
                raise SlimgraphError(
                    f"the checkpoint written to {out} does not run after reloading "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                    f"'{type(state.model).__name__}' is not yet reloadable after this pruning "
                    "(save-hf{check=false} skips this check)") from exc
            report["reload_rel_error"] = err
            if not math.isfinite(err):
                raise SlimgraphError(f"the model's output (or the reloaded checkpoint's in {out}) "
                                     "has non-finite values (NaN or infinity)")
            if not err <= self.tolerance:
                raise SlimgraphError(f"reloaded checkpoint differs from the model (relative "
                                     f"error {err:.2e})")
        state.files.append(str(out))
        return PassResult(False, report)


register(SaveHF)
