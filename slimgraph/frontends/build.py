"""From a model spec to an IR graph: load (``loading.py``), then trace or import."""

from __future__ import annotations

from slimgraph.errors import TraceError
from slimgraph.frontends.loading import LoadedModel, load_model
from slimgraph.ir.graph import Graph

_POSITION_KEYS = ("max_position_embeddings", "n_positions")


def graph_of(loaded: LoadedModel, *, seq: int = 7) -> Graph:
    """Trace a loaded torch model (example input ids of shape [1, seq]) or import ONNX."""
    if loaded.onnx_path is not None:
        from slimgraph.frontends.onnx_import import import_onnx

        return import_onnx(loaded.onnx_path)
    from slimgraph.frontends.torch_export import trace

    if seq < 1:
        raise TraceError(f"example sequence length must be at least 1, got {seq}")
    for key in _POSITION_KEYS:
        limit = getattr(loaded.config, key, None)
        if isinstance(limit, int) and seq > limit:
            raise TraceError(
                f"example sequence length {seq} exceeds the model's {key}={limit}"
            )
    args, kwargs = loaded.example_inputs(batch=1, seq=seq)
    return trace(loaded.model, args, kwargs)


def load_graph(spec: str, *, meta: bool = False, seq: int = 7) -> tuple[LoadedModel, Graph]:
    loaded = load_model(spec, meta=meta)
    return loaded, graph_of(loaded, seq=seq)
