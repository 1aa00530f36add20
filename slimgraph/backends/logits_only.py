"""The export wrapper of ``export-onnx``: one tensor in (``input_ids``), one out (``logits``).

A module of its own so that importing the pass (``slimgraph passes``) does not import
PyTorch; :mod:`slimgraph.backends.onnx_export` still offers it as ``LogitsOnly``.
"""

from __future__ import annotations

import torch


class LogitsOnly(torch.nn.Module):
    """``input_ids -> logits``: one tensor in, one out, no cache."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, use_cache=False)
        return out.logits if hasattr(out, "logits") else out[0]
