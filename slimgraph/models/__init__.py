"""The model interface: what differs between a PyTorch model and an ONNX model.

A pass asks ``state.kind`` (a :class:`~slimgraph.models.base.ModelKind`) instead of
branching on the kind of its input: :class:`~slimgraph.models.torch_model.TorchModel`
for a PyTorch / Hugging Face model, :class:`~slimgraph.models.onnx_model.OnnxModel` for an
ONNX file. :func:`kind_of` picks one for a loaded model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from slimgraph.models.base import ModelKind


def kind_of(loaded: Any) -> ModelKind:
    """The model kind of a loaded model: ONNX when there is no PyTorch model behind an
    ONNX file, PyTorch otherwise."""
    if getattr(loaded, "model", None) is None and getattr(loaded, "onnx_path", None) is not None:
        from slimgraph.models.onnx_model import OnnxModel

        return OnnxModel()
    from slimgraph.models.torch_model import TorchModel

    return TorchModel()
