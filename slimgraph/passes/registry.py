"""Pass registry: a lazy map from stable pass names to pass classes."""

from __future__ import annotations

import importlib

from slimgraph.errors import PipelineError

# name -> module that defines it (imported on first use)
_MODULES = {
    "prune-structured": "slimgraph.passes.prune_structured",
    "remove": "slimgraph.passes.remove",
    "l0": "slimgraph.passes.l0",
    "distill": "slimgraph.passes.distill",
    "sparsify": "slimgraph.passes.sparsify",
    "check-sparsity": "slimgraph.passes.check_sparsity",
    "export-onnx": "slimgraph.passes.export_onnx",
    "export-trt": "slimgraph.passes.export_trt",
    "save-hf": "slimgraph.passes.save_hf",
}
_CLASSES: dict[str, type] = {}


def register(cls):
    """Class decorator: ``@register`` on a Pass dataclass with a ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _CLASSES[cls.name] = cls
    return cls


def names() -> list[str]:
    return sorted(set(_MODULES) | set(_CLASSES))


def get(name: str) -> type:
    if name not in _CLASSES and name in _MODULES:
        importlib.import_module(_MODULES[name])
    try:
        return _CLASSES[name]
    except KeyError:
        raise PipelineError(
            f"unknown pass '{name}'; known passes: {', '.join(names())}"
        ) from None
