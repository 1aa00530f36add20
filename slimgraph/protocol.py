"""Defaults of the perplexity protocol (docs/benchmark-protocol.md) and the backends that
``eval`` and ``bench`` run on; light to import, so the command line can show them in its
help without loading PyTorch."""

from __future__ import annotations

DEFAULT_SEQLEN = 512  # tokens per window
DEFAULT_WINDOWS = 40  # windows from the start of the text
BACKENDS = ("auto", "torch", "onnx")
