"""ONNX input's weights in memory: unmodified ones stay in their file, and the model is
saved inline one initializer at a time (slimgraph.backends.onnx_inline), byte for byte
what ``onnx_ir.save`` writes."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch

from slimgraph.backends.onnx_export import export_onnx, save_onnx_model
from slimgraph.backends.onnx_inline import save_inline
from slimgraph.frontends.onnx.weights import OnnxParamHandle
from slimgraph.frontends.onnx_import import import_onnx
from tests import zoo

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def external_file(tmp_path_factory):
    """A tiny llama as model.onnx + model.onnx.data (every initializer external)."""
    d = tmp_path_factory.mktemp("onnx_inline")
    export_onnx(zoo.build("llama"), d / "dense.onnx", vocab=zoo.VOCAB)
    model = ir.load(d / "dense.onnx")
    ir.save(model, d / "model.onnx", external_data="model.onnx.data", size_threshold_bytes=0)
    return d / "model.onnx"


def _linears(graph) -> list[OnnxParamHandle]:
    handles = [p.param for p in graph.params.values() if isinstance(p.param, OnnxParamHandle)]
    return [h for h in handles if len(h.shape) == 2 and h.permuted]


def test_unmodified_weights_stay_external_and_unmapped(external_file):
    graph = import_onnx(external_file)
    first, second = _linears(graph)[:2]
    before = second.read().clone()
    first.write(torch.zeros(first.shape))
    second.read()
    stored = second.targets[0].storage.tensor
    assert isinstance(stored, ir.ExternalTensor)
    assert stored.raw is None  # read from the file, never mapped
    assert torch.equal(second.read(), before)
    assert not isinstance(first.targets[0].storage.tensor, ir.ExternalTensor)
    assert first._array is None  # held once, by the model (stored transposed)
    assert torch.equal(first.read(), torch.zeros(first.shape))


def test_save_inline_writes_the_bytes_of_ir_save(external_file, tmp_path):
    graph = import_onnx(external_file)
    handle = _linears(graph)[0]
    w = handle.read()
    handle.write(torch.where(w.abs() < w.abs().median(), torch.zeros_like(w), w))
    model = graph.meta["onnx_model"]
    kinds = {type(v.const_value) for v in model.graph.initializers.values()}
    assert ir.ExternalTensor in kinds and ir.Tensor in kinds
    ir.save(model, tmp_path / "reference.onnx", external_data="reference.onnx.data",
            size_threshold_bytes=2**62)
    save_inline(model, tmp_path / "inline.onnx")
    assert (tmp_path / "inline.onnx").read_bytes() == (tmp_path / "reference.onnx").read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("slimgraph-stand-in")]
    saved = save_onnx_model(model, tmp_path / "out" / "model.onnx")
    assert saved.read_bytes() == (tmp_path / "reference.onnx").read_bytes()
    assert sorted(p.name for p in saved.parent.iterdir()) == ["model.onnx"]
    back = ir.load(saved)
    name = handle.targets[0].storage.name
    assert np.array_equal(back.graph.initializers[name].const_value.numpy(),
                          handle.targets[0].storage.array())
