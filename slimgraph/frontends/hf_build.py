"""Building transformers models from configs, and keeping transformers quiet.

:func:`model_class` picks the class a config is built with; :func:`build_from_config`
builds it with random weights from a fixed seed, or on the meta device, after the
size checks of :func:`slimgraph.frontends.model_folder.check_size`.
:func:`quiet_transformers` silences transformers' logs and progress bars for a block.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from slimgraph.errors import ModelLoadError
from slimgraph.frontends.model_folder import check_bytes, check_size

__all__ = [
    "SEED",
    "build_from_config",
    "is_causal_lm",
    "model_class",
    "module_device",
    "note",
    "one_line",
    "quiet_transformers",
]

SEED = 0  # random weights of hf-config models


def model_class(config: Any) -> Any:
    """The transformers class to instantiate: from ``config.architectures`` when it names
    a class transformers has, else AutoModelForCausalLM for causal LM types, else AutoModel.

    Encoders such as BERT also have a causal-LM class (``BertLMHeadModel``), meant only
    for ``is_decoder=True`` configs; without ``architectures`` they get AutoModel.
    """
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
        if isinstance(cls, type) and hasattr(cls, "from_pretrained"):
            return cls
    model_type = getattr(config, "model_type", None)
    encoder = model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(
        config, "is_decoder", False
    )
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not encoder:
        return AutoModelForCausalLM
    return AutoModel


def check_memory(config: Any, *, dtype: torch.dtype, label: str) -> None:
    """Refuse, before anything real is allocated, a model this machine cannot hold: its
    exact parameter bytes, from the model built without weights (the config estimate of
    :func:`check_size` is only a lower bound)."""
    probe = build_from_config(config, meta=True, dtype=dtype, label=label)
    check_bytes(sum(p.numel() * p.element_size() for p in probe.parameters()), label=label)


def build_from_config(
    config: Any, *, meta: bool, dtype: torch.dtype, label: str
) -> torch.nn.Module:
    """Instantiate a model from its config: random weights from a fixed seed, or on meta
    (sizes checked first: :func:`check_size`, and :func:`check_memory` for real weights)."""
    check_size(config, dtype=dtype, meta=meta, label=label)
    if not meta:
        check_memory(config, dtype=dtype, label=label)
    cls = model_class(config)
    make = cls.from_config if hasattr(cls, "from_config") else cls._from_config
    with quiet_transformers():
        try:
            if meta:
                with torch.device("meta"):
                    model = make(config, dtype=dtype)
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(SEED)
                    model = make(config, dtype=dtype)
        except Exception as exc:
            raise ModelLoadError(
                f"cannot build a model from config (model_type "
                f"'{getattr(config, 'model_type', '?')}'): {one_line(exc)}"
            ) from exc
    model.eval()
    return model


def one_line(exc: BaseException) -> str:
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    text = text or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def note(message: str) -> None:
    try:
        from rich.console import Console

        Console(stderr=True, highlight=False, soft_wrap=True).print(f"[dim]{message}[/dim]")
    except Exception:  # noqa: BLE001 - never let a status line break a load
        print(message, file=sys.stderr)


@contextlib.contextmanager
def quiet_transformers(*, gguf: bool = False) -> Iterator[None]:
    """Silence transformers' progress bars, info/warning logs and Python warnings (with
    ``gguf``, also the GGUF de-quantization progress bar), and put things back afterwards."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    gguf_logger = logging.getLogger("gguf")
    gguf_level = gguf_logger.level
    gguf_logger.setLevel(logging.ERROR)
    # The GGUF de-quantization loop uses a bare tqdm that ignores transformers' switch.
    gguf_utils = sys.modules.get("transformers.modeling_gguf_pytorch_utils")
    if gguf and gguf_utils is None:
        with contextlib.suppress(Exception):
            import transformers.modeling_gguf_pytorch_utils as gguf_utils
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    if gguf_tqdm is not None:
        gguf_utils.tqdm = _no_progress
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        gguf_logger.setLevel(gguf_level)
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm


def _no_progress(iterable: Any = None, *args: Any, **kwargs: Any) -> Any:
    """Stand-in for tqdm that only iterates."""
    return iterable


def is_causal_lm(model: torch.nn.Module | None, config: Any | None) -> bool:
    if model is None:
        return False
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update([value] if isinstance(value, str) else value)
    for cls in type(model).__mro__:
        if cls.__name__ in names:
            return True
    return type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def module_device(model: torch.nn.Module | None) -> torch.device | None:
    if model is None:
        return None
    for p in model.parameters():
        return p.device
    return None
