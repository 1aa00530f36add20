"""save-hf reloads (transformers or slimgraph loader) and export-onnx matches PyTorch."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from slimgraph.backends.hf_checkpoint import load_pruned, max_rel_error, save_hf
from slimgraph.backends.onnx_export import export_onnx
from slimgraph.backends.ort_session import session
from slimgraph.frontends.loading import load_model
from slimgraph.frontends.torch_export import trace
from slimgraph.ir.dependency import analyze
from slimgraph.structured.removal import remove_units
from tests import zoo


def _prune(model, name, plan):
    """Remove units: plan maps (kind, layer) -> list of units."""
    r = analyze(trace(model, *zoo.example(name)))
    sel = {g.id: plan[(g.kind, g.layer)] for g in r.groups if (g.kind, g.layer) in plan}
    return remove_units(model, r, sel)


def test_uniform_llama_reloads_with_plain_transformers(tmp_path):
    import transformers

    m = zoo.build("llama")
    rep = _prune(m, "llama", {("heads", 0): [1], ("heads", 1): [0], ("mlp", 0): list(range(40)),
                              ("mlp", 1): list(range(50, 90)), ("hidden", None): [3, 7, 11, 12]})
    info = save_hf(m, None, tmp_path / "hf", rep["module_attrs"])
    assert info["loader"] == "transformers"
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["intermediate_size"] == zoo.INTER - 40 and cfg["num_key_value_heads"] == 1
    assert cfg["hidden_size"] == zoo.HIDDEN - 4 and cfg["head_dim"] == zoo.HEAD_DIM
    plain = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert max_rel_error(m, plain, zoo.VOCAB) < 1e-6


@pytest.mark.parametrize("name", ["llama", "gpt2", "opt", "bert"])
def test_non_uniform_reloads_with_slimgraph_loader(tmp_path, name):
    m = zoo.build(name)
    base = copy.deepcopy(m.config)
    rep = _prune(m, name, {("heads", 0): [1], ("mlp", 1): list(range(0, 60, 3))})
    info = save_hf(m, None, tmp_path / "hf", rep["module_attrs"], base)
    back = load_model(str(tmp_path / "hf")).model
    assert type(back) is type(m)
    args, kw = zoo.example(name)
    with torch.no_grad():
        a, b = m(*args, **kw).logits, back(*args, **kw).logits
    assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    if name == "llama":
        assert info["loader"] == "slimgraph"  # intermediate sizes differ per layer


def _assert_reloads(tmp_path, m, name, base) -> dict:
    info = save_hf(m, None, tmp_path / "hf", m._report["module_attrs"], base)
    back = load_model(str(tmp_path / "hf")).model
    args, kw = zoo.example(name)
    with torch.no_grad():
        a, b = m(*args, **kw).logits, back(*args, **kw).logits
    assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    return info


# (name, plan, loader): uniform plans where plain transformers can rebuild the model from
# the updated config, and where it cannot (a per-module value the config has no field for)
UNIFORM = [
    # Phi-3 splits its fused qkv_proj by config head counts; head_dim written explicitly
    ("phi3", {("heads", 0): [1], ("heads", 1): [0]}, "transformers"),
    ("qwen3", {("heads", 0): [1], ("heads", 1): [0]}, "transformers"),
    # Qwen3's q_norm / k_norm keep their epsilon, the residual norms' is corrected
    ("qwen3", {("hidden", None): [3, 7, 11, 12]}, "slimgraph"),
    # Gemma's embeddings are scaled by sqrt(the original hidden_size)
    ("gemma3", {("hidden", None): [3, 7, 11, 12]}, "slimgraph"),
    ("gemma3", {("heads", 0): [1], ("heads", 1): [0], ("mlp", 0): [2, 5], ("mlp", 1): [2, 5]},
     "transformers"),
    # OLMo-2's q_norm / k_norm span all heads: corrected like a residual norm
    ("olmo2", {("heads", 0): [1], ("heads", 1): [0]}, "slimgraph"),
]


@pytest.mark.parametrize("name,plan,loader", UNIFORM)
def test_uniform_pruning_reloads(tmp_path, name, plan, loader):
    m = zoo.build(name)
    base = copy.deepcopy(m.config)
    m._report = _prune(m, name, plan)
    assert _assert_reloads(tmp_path, m, name, base)["loader"] == loader


@pytest.mark.parametrize("name", ["qwen3", "gemma3", "olmo2", "phi3"])
def test_non_uniform_heads_mlp_hidden_reload(tmp_path, name):
    m = zoo.build(name)
    base = copy.deepcopy(m.config)
    m._report = _prune(m, name, {("heads", 0): [1], ("mlp", 1): list(range(0, 60, 3)),
                                 ("hidden", None): [0, 9]})
    assert _assert_reloads(tmp_path, m, name, base)["loader"] == "slimgraph"


def test_save_hf_names_a_checkpoint_that_does_not_run(tmp_path, monkeypatch):
    from slimgraph.backends import hf_checkpoint
    from slimgraph.errors import SlimgraphError
    from slimgraph.passes.base import CompileState
    from slimgraph.passes.save_hf import SaveHF

    class Broken(torch.nn.Module):
        def forward(self, **kw):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (7x64 and 32x64)")

    m = zoo.build("llama")
    loaded = SimpleNamespace(model=m, config=m.config, tokenizer=None)
    state = CompileState(loaded=loaded, out_dir=tmp_path)
    monkeypatch.setattr(hf_checkpoint, "load_pruned", lambda path: Broken())
    with pytest.raises(SlimgraphError, match="does not run after reloading.*RuntimeError: mat1"):
        SaveHF().run(state)


def test_load_pruned_rejects_non_checkpoints(tmp_path):
    from slimgraph.errors import ModelLoadError

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="not a slimgraph checkpoint"):
        load_pruned(tmp_path)


@pytest.mark.parametrize("opset", [None, 23])
def test_export_onnx_dynamic_axes_match_torch(tmp_path, opset):
    import onnx

    m = zoo.build("llama")
    _prune(m, "llama", {("heads", 1): [0], ("mlp", 0): list(range(30))})
    path = export_onnx(m, tmp_path / "model.onnx", vocab=zoo.VOCAB, opset=opset)
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no temp files left
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    if opset == 23:  # fused ops; rotary caches broadcast to the batch (ORT wants batch 2 there)
        assert {"Attention", "RotaryEmbedding", "RMSNormalization"} <= ops and "Expand" in ops
    sess = session(path)
    for shape in [(1, 5), (2, 12)]:
        ids = torch.randint(0, zoo.VOCAB, shape)
        got = sess.run(None, {"input_ids": ids.numpy()})[0]
        with torch.no_grad():
            ref = m(input_ids=ids, use_cache=False).logits.numpy()
        assert got.shape == ref.shape and np.abs(got - ref).max() < 1e-4


def test_export_reports_its_stages_in_order_with_a_time_share(tmp_path):
    """export-onnx has no fraction from the exporter: it reports the exporter's stages
    (read from its stdout) and ours, in order, as a share of the time, ending at 100%."""
    from slimgraph.backends.onnx_export import EXPORT_STAGES
    from slimgraph.models.torch_model import TorchModel

    seen = []
    state = SimpleNamespace(model=zoo.build("llama", seed=0).eval(), files=[], out_dir=tmp_path,
                            loaded=SimpleNamespace(config=SimpleNamespace(vocab_size=zoo.VOCAB),
                                                   tokenizer=None),
                            progress=lambda done, total, **kw: seen.append((done, total, kw)))
    report = TorchModel().write_onnx(state, tmp_path / "model.onnx", opset=23, check=True,
                                     tolerance=1e-4)
    assert report["ort_vs_torch"]["rel_error"] < 1e-4
    infos = [kw["info"] for _, _, kw in seen]
    assert infos == [label for _, label, _ in EXPORT_STAGES] + ["done"], infos
    dones = [d for d, _, _ in seen]
    assert dones == sorted(dones) and dones[0] == 0 and dones[-1] == 100
    assert all(t == 100 and kw["unit"] == "%" for _, t, kw in seen)
