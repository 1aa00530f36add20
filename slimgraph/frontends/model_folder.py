"""Checks of an untrusted model before anything in it is loaded.

- :func:`check_folder`: every file a model folder refers to lies inside it. The weight
  indexes (``*.index.json``) name their shards by relative path; an entry that is
  absolute, climbs out with ``..``, or leads outside through a symlink is refused by
  name, as is a file the loaders read (config, weights, tokenizer) that is a symlink
  leading outside. (A Hugging Face hub snapshot, ``.../snapshots/REV/``, links its files
  to ``.../blobs/``: that folder counts as inside.)
- :func:`refuse_custom_code`: a config or tokenizer config with ``auto_map`` needs the
  model's own Python code; slimgraph never runs it (and transformers is always called
  with ``trust_remote_code=False``, so it never asks either).
- :func:`check_size`: the size a config describes, computed before anything is
  allocated: refused when its parameters cannot fit in the memory available, or (also
  on the meta device, where nothing is allocated) when its layer or expert counts would
  make tracing explode.
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch

from slimgraph.errors import ModelLoadError

__all__ = [
    "MAX_EXPERTS",
    "MAX_LAYERS",
    "available_memory",
    "check_folder",
    "check_size",
    "check_bytes",
    "estimate_parameters",
    "refuse_custom_code",
]

# Files of a model folder that slimgraph or transformers read.
_READ_SUFFIXES = {".json", ".safetensors", ".bin", ".pt", ".model", ".txt", ".jinja", ".gguf"}
CODE_CONFIGS = ("config.json", "tokenizer_config.json")

MAX_LAYERS = 1024  # real models have at most a few hundred; tracing costs ~0.15 s a layer
MAX_EXPERTS = 4096
_MAX_NUMEL = 2**62  # larger tensors overflow torch's int64 sizes


# --------------------------------------------------------------------------- containment


def _allowed_roots(root: Path) -> list[Path]:
    real = root.resolve()
    roots = [real]
    if real.parent.name == "snapshots":  # an HF hub cache snapshot: links into ../../blobs
        roots.append(real.parent.parent / "blobs")
    return roots


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == r or path.is_relative_to(r) for r in roots)


def check_folder(root: Path, label: str | None = None) -> None:
    """Refuse a model folder that refers to a file outside itself (see the module doc)."""
    root = Path(root)
    label = label or str(root)
    roots = _allowed_roots(root)
    try:
        entries = sorted(root.iterdir())
    except OSError as exc:
        raise ModelLoadError(f"cannot read model directory '{label}': {exc.strerror}") from exc
    for entry in entries:
        if entry.suffix.lower() in _READ_SUFFIXES and entry.is_symlink():
            if not _inside(entry.resolve(), roots):
                raise ModelLoadError(
                    f"model directory '{label}': '{entry.name}' is a symlink leading outside "
                    f"the directory (to '{os.readlink(entry)}'); every file a model folder "
                    "refers to must lie inside it")
    for index in (e for e in entries if e.name.endswith(".index.json") and e.is_file()):
        for name in _index_files(index, label):
            _check_entry(root, roots, index.name, name, label)


def _index_files(index: Path, label: str) -> list[str]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model directory '{label}': '{index.name}' is not a readable "
                             f"JSON index ({_short(exc)})") from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise ModelLoadError(f"model directory '{label}': '{index.name}' has no \"weight_map\" "
                             "object")
    names = set()
    for tensor, name in weight_map.items():
        if not isinstance(name, str) or not name.strip():
            raise ModelLoadError(f"model directory '{label}': '{index.name}' maps tensor "
                                 f"'{tensor}' to {name!r}, not a file name")
        names.add(name)
    return sorted(names)


def _check_entry(root: Path, roots: list[Path], index: str, name: str, label: str) -> None:
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    escapes = (posix.is_absolute() or windows.is_absolute() or bool(windows.drive)
               or ".." in posix.parts or ".." in windows.parts)
    if not escapes:
        escapes = not _inside((root / name).resolve(), roots)
    if escapes:
        raise ModelLoadError(
            f"model directory '{label}': '{index}' refers to '{name}', which lies outside the "
            "directory; every file a model folder refers to must lie inside it")


# --------------------------------------------------------------------------- custom code


def refuse_custom_code(data: Any, where: str) -> None:
    """Refuse a parsed config (or tokenizer config) that asks for the model's own code."""
    if isinstance(data, dict) and "auto_map" in data:
        kind = data.get("model_type")
        hint = (f"; without \"auto_map\" transformers' built-in '{kind}' classes are used"
                if isinstance(kind, str) and kind else "")
        raise ModelLoadError(
            f"'{where}' has an \"auto_map\": the model needs its own Python code, which "
            f"slimgraph never runs (untrusted model folders are loaded as data only){hint}")


def refuse_custom_code_in(folder: Path, label: str | None = None) -> None:
    """:func:`refuse_custom_code` for the config and tokenizer config of a folder."""
    label = label or str(folder)
    for name in CODE_CONFIGS:
        path = Path(folder) / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # malformed files are reported by the loader that reads them
        refuse_custom_code(data, f"{label}/{name}")


# --------------------------------------------------------------------------- sizes


def _int(config: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def estimate_parameters(config: Any) -> tuple[int, int]:
    """``(parameters, largest tensor's elements)`` a config describes, at least: the
    embedding, the attention projections and two MLP matrices of every layer (gates,
    biases, norms and untied heads only add to it)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = _int(text, "hidden_size", "n_embd", "d_model") or 0
    layers = _int(text, "num_hidden_layers", "n_layer", "num_layers") or 0
    vocab = _int(text, "vocab_size") or 0
    inter = _int(text, "intermediate_size", "ffn_dim", "n_inner", "d_ff") or 0
    heads = _int(text, "num_attention_heads", "n_head") or 0
    head_dim = _int(text, "head_dim") or (hidden // heads if heads > 0 else 0)
    kv = _int(text, "num_key_value_heads") or heads
    q_out, kv_out = max(heads, 0) * max(head_dim, 0), max(kv, 0) * max(head_dim, 0)
    per_layer = 2 * hidden * q_out + 2 * hidden * kv_out + 2 * hidden * max(inter, 0)
    params = max(vocab, 0) * max(hidden, 0) + max(layers, 0) * max(per_layer, 0)
    largest = max(vocab * hidden, hidden * inter, hidden * q_out, 0)
    return params, largest


def available_memory() -> int | None:
    """Bytes this process can still allocate: MemAvailable, or less under a cgroup
    limit; None when unknown."""
    found: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = Path("/sys/fs/cgroup/memory.current").read_text().strip()
        if limit != "max":
            found.append(max(int(limit) - int(used), 0))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def check_size(config: Any, *, dtype: torch.dtype, meta: bool, label: str) -> None:
    """Refuse, before anything is built, a config whose model cannot be built here (see
    the module doc)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for holder in {id(config): config, id(text): text}.values():
        layers = _int(holder, "num_hidden_layers", "n_layer", "num_layers")
        if layers is not None and layers > MAX_LAYERS:
            raise ModelLoadError(f"config '{label}': num_hidden_layers={layers} is more layers "
                                 f"than slimgraph builds or traces (at most {MAX_LAYERS})")
        experts = _int(holder, "num_local_experts", "num_experts", "n_routed_experts")
        if experts is not None and experts > MAX_EXPERTS:
            raise ModelLoadError(f"config '{label}': {experts} experts is more than slimgraph "
                                 f"builds or traces (at most {MAX_EXPERTS})")
    params, largest = estimate_parameters(config)
    if largest > _MAX_NUMEL:
        raise ModelLoadError(f"config '{label}': its sizes give a tensor of {largest:.3g} "
                             "elements, more than any tensor can hold")
    if meta:
        return
    need = params * torch.empty((), dtype=dtype, device="meta").element_size()
    avail = available_memory()
    if avail is not None and need > avail:
        raise ModelLoadError(
            f"config '{label}' describes a model of at least {params:.3g} parameters "
            f"({need / 2**30:.1f} GiB as {str(dtype).removeprefix('torch.')}), more than the "
            f"{avail / 2**30:.1f} GiB of memory available (inspect --meta analyses it "
            "without weights)")


def check_bytes(need: int, *, label: str) -> None:
    """Refuse a model of ``need`` bytes of parameters when this machine has less memory
    available (plus a quarter for what building it needs beside the weights)."""
    avail = available_memory()
    if avail is not None and need * 1.25 > avail:
        raise ModelLoadError(
            f"config '{label}' describes {need / 2**30:.1f} GiB of parameters, more than the "
            f"{avail / 2**30:.1f} GiB of memory available leaves room for (inspect --meta "
            "analyses it without weights)")


def _short(exc: BaseException) -> str:
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return (text or type(exc).__name__)[:300]
