from __future__ import annotations

import onnxruntime as ort
import pytest

from slimgraph.backends.ort_session import providers


@pytest.mark.parametrize("device,available,expected", [
    ("CPU", ["CPUExecutionProvider"], ["CPUExecutionProvider"]),
    # onnxruntime-gpu without a GPU: CPU only
    ("CPU", ["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"]),
    ("GPU", ["CUDAExecutionProvider", "CPUExecutionProvider"],
     ["CUDAExecutionProvider", "CPUExecutionProvider"]),
    # a GPU build without CUDA (e.g. DirectML): CPU
    ("GPU", ["DmlExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"]),
])
def test_cuda_only_with_onnxruntime_gpu_and_a_gpu(monkeypatch, device, available, expected):
    monkeypatch.setattr(ort, "get_device", lambda: device)
    monkeypatch.setattr(ort, "get_available_providers", lambda: list(available))
    assert providers() == expected


def test_this_machine_gets_a_provider_ort_has():
    assert set(providers()) <= set(ort.get_available_providers())
