"""`save-hf`: a reloadable Hugging Face checkpoint of the (slimmed) model.

OUTDIR/hf/ holds ``model.safetensors``, ``config.json`` and the tokenizer. Where the
new sizes are uniform and expressible in the architecture's config (LLaMA-family:
hidden_size, intermediate_size, head counts, explicit head_dim, rms_norm_eps),
plain ``transformers`` reloads the directory. Where they are not (per-layer sizes
after non-uniform pruning, or head counts that an architecture derives from
hidden_size), config.json gets a ``slimgraph`` section with every parameter shape and
the module attributes that removal changed, and :func:`load_pruned` (used by
``slimgraph`` for any directory with that section) rebuilds the model: construct
from the config, resize parameters, replay attributes, load the weights.
The section records which loader is needed: ``"loader": "transformers"`` or
``"slimgraph"``. After saving, the directory is reloaded and its outputs compared.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slimgraph.frontends.hf_build import one_line, quiet_transformers
from slimgraph.frontends.model_folder import check_folder, check_size, refuse_custom_code_in
from slimgraph.io import make_temp_dir
from slimgraph.errors import ModelLoadError, PipelineError, SlimgraphError
from slimgraph.passes.base import CompileState, Pass, PassResult
from slimgraph.passes.registry import register

SECTION = "slimgraph"


def _shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def _transformers_can_build(config, shapes: dict[str, list[int]],
                            module_attrs: dict[str, dict] | None = None) -> bool:
    """Would `from_pretrained` build exactly these shapes from this config, with these
    module attributes (head counts, norm epsilons, embedding scales) already?"""
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
    return _shapes(probe) == shapes and _has_attrs(probe, module_attrs or {})


def _has_attrs(model: torch.nn.Module, module_attrs: dict[str, dict]) -> bool:
    """Does ``model`` (built on meta) already have every recorded attribute value?
    Tensors on meta cannot be read; each recorded tensor has a number twin
    (``embed_scale`` / ``scalar_embed_scale``) that is compared instead."""
    import math

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


def save_hf(model: torch.nn.Module, tokenizer, out: Path, module_attrs: dict[str, dict],
            base_config=None, gathers: list[str] | None = None) -> dict[str, Any]:
    """Write the checkpoint to ``out`` atomically (a temp dir renamed at the end).

    ``base_config`` is the config before pruning: written instead of the updated one
    when transformers cannot build the new shapes from the updated config.
    """
    config = model.config
    shapes = _shapes(model)
    loader = "transformers" if _transformers_can_build(config, shapes, module_attrs) else "slimgraph"
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


def finish_checkpoint(tmp: Path, out: Path, loader: str, module_attrs: dict[str, dict],
                      shapes: dict[str, list[int]], gathers: list[str] | None) -> None:
    """Add the slimgraph section to ``tmp/config.json``, then move ``tmp`` to ``out``."""
    cfg_path = tmp / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("quantization_config", None)
    cfg[SECTION] = {"loader": loader, "module_attrs": module_attrs, "param_shapes": shapes,
                    "gather_linears": list(gathers or [])}
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


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

    from slimgraph.structured.removal import _sync_module_sizes

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
    _sync_module_sizes(model)
    return model.to(dtype).eval()


def _is_tied(model, key: str) -> bool:
    emb = model.get_input_embeddings()
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return out is not None and emb is not None and out.weight is emb.weight and \
        key.endswith("weight")


def _build_resized(cls, config, section) -> torch.nn.Module:
    from slimgraph.structured.removal import _sync_module_sizes, set_module_attr

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
    _sync_module_sizes(model)
    return model


def max_rel_error(a: torch.nn.Module, b: torch.nn.Module, vocab: int, seq: int = 11) -> float:
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
