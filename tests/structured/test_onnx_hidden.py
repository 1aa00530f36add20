"""Hidden (residual) channel removal on ONNX input (slimgraph.structured.onnx_norms).

The invariant: the slimmed ONNX model's outputs equal those of the original ONNX model
with the same hidden channels (and random MLP / head units) zeroed, in ONNX Runtime, and
those of the PyTorch path's slimmed model on the same selection. Covered: decomposed
RMSNorm (torch's opset-18/20 exports: ``ReduceMean`` gets a ``Mul`` by ``D'/D``) on
static LLaMA and Qwen2 exports and a dynamic-axis opset-18 export; the fused
``RMSNormalization`` of an opset-23 export (gains x sqrt(D/D'), epsilon x D/D'); OPT's
LayerNorm (an approximation, recorded in the notes).
"""

from __future__ import annotations

import random
import warnings

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from slimgraph.cli import main
from slimgraph.errors import PipelineError
from slimgraph.frontends.onnx_import import import_onnx
from slimgraph.frontends.torch_export import trace
from slimgraph.ir.dependency import analyze
from slimgraph.structured.onnx_norms import plan_statistics
from slimgraph.structured.onnx_removal import remove_units_onnx
from slimgraph.structured.removal import remove_units
from tests import zoo
from tests.structured import test_onnx_dynamic_heads as dyn
from tests.structured.random_selection import slim_and_masked
from tests.structured.test_onnx_removal import _export_static

ort = pytest.importorskip("onnxruntime")

SEQ = 7


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from slimgraph.backends.onnx_export import export_onnx

    d = tmp_path_factory.mktemp("onnx_hidden")
    out = {}
    for name in ("llama", "qwen2", "opt"):
        out[name] = d / name / "model.onnx"
        _export_static(zoo.build(name), out[name])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for opset in (18, 23):
            out[f"gqa-op{opset}"] = export_onnx(dyn._model(), d / f"gqa{opset}" / "model.onnx",
                                                vocab=dyn.VOCAB, opset=opset)
    return out


def _builder(name):
    return dyn._model if name.startswith("gqa") else (lambda: zoo.build(name))


def _vocab(name):
    return dyn.VOCAB if name.startswith("gqa") else zoo.VOCAB


def _selection(result, seed):
    """Random hidden channels, plus random units of about half the MLP / head groups."""
    rng = random.Random(seed)
    sel = {}
    for g in result.prunable():
        if g.kind == "hidden" or (g.kind in ("mlp", "heads") and rng.random() < 0.5):
            sel[g.id] = sorted(rng.sample(range(g.units), rng.randint(1, g.units - 1)))
    assert any(g.kind == "hidden" and g.id in sel for g in result.groups)
    return sel


def _ort(path, ids):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input_ids": ids})[0]


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _ops(path):
    return [n.op_type for n in onnx.load(str(path)).graph.node]


@pytest.mark.parametrize("name", ["llama", "qwen2", "gqa-op18", "gqa-op23"])
@pytest.mark.parametrize("seed", [0, 1])
def test_slim_equals_masked_and_the_torch_path(files, tmp_path, name, seed):
    src = files[name]
    result, sel, report, masked_path, slim_path = slim_and_masked(src, seed, tmp_path,
                                                                  select=_selection)
    onnx.checker.check_model(str(slim_path), full_check=True)
    assert report["shape_check"]["checked"] and not report["notes"]

    # every norm over the residual stream is corrected, one way or the other
    layers = 3 if name.startswith("gqa") else zoo.LAYERS
    fused = [r for r in report["onnx_rewrites"] if r.get("op") == "RMSNormalization"]
    means = [r for r in report["onnx_rewrites"] if r.get("op") == "ReduceMean"]
    if "RMSNormalization" in _ops(src):
        assert len(fused) == 2 * layers + 1 and not means
        hidden = next(g for g in result.groups if g.kind == "hidden")
        d, d_kept = hidden.units, hidden.units - len(sel[hidden.id])
        for r in fused:
            assert r["gain_scaled_by"] == pytest.approx((d / d_kept) ** 0.5)
            assert r["epsilon"][1] == pytest.approx(r["epsilon"][0] * d / d_kept)
    else:
        assert len(means) == 2 * layers + 1 and not fused

    vocab = _vocab(name)
    batch = 2 if name.startswith("gqa") else 1
    ids = np.random.default_rng(seed).integers(0, vocab, (batch, SEQ))
    got, want = _ort(slim_path, ids), _ort(masked_path, ids)
    assert _rel(got, want) <= 1e-5

    # the PyTorch path on the same selection (groups matched by kind and layer)
    model = _builder(name)()
    t_ids = torch.from_numpy(ids)
    tr = analyze(trace(model, (t_ids,), {"use_cache": False}))
    key = {(g.kind, g.layer): g for g in tr.groups}
    by_id = {g.id: g for g in result.groups}
    tsel = {}
    for gid, units in sel.items():
        tg = key[(by_id[gid].kind, by_id[gid].layer)]
        assert tg.units == by_id[gid].units
        tsel[tg.id] = units
    remove_units(model, tr, tsel)
    with torch.no_grad():
        torch_out = model(t_ids, use_cache=False).logits.numpy()
    assert _rel(got, torch_out) <= 1e-4


def test_layernorm_is_an_approximation_recorded_in_the_notes(files):
    result = analyze(import_onnx(files["opt"]))
    hidden = next(g for g in result.prunable() if g.kind == "hidden")
    report = remove_units_onnx(result, {hidden.id: [0, 5, 9]})
    assert report["notes"] and all("LayerNorm statistics now span" in n for n in report["notes"])
    assert report["params_after"] < report["params_before"]


def test_cli_hidden_end_to_end(files, tmp_path):
    src = files["gqa-op23"]
    out = tmp_path / "out"
    rc = main(["compile", str(src), "-p", "prune-structured{hidden=0.25,mlp=0.5},export-onnx",
               "-o", str(out)])
    assert rc == 0
    import json

    rep = json.loads((out / "report.json").read_text())
    prune = rep["passes"][0]["report"]
    assert prune["removed_units"]["hidden"] == 12  # a quarter of 48
    assert rep["parameters"]["after"] < rep["parameters"]["before"]
    logits = _ort(out / "model.onnx", np.zeros((2, 5), dtype=np.int64))
    assert logits.shape == (2, 5, dyn.VOCAB) and np.isfinite(logits).all()
    again = analyze(import_onnx(out / "model.onnx"))
    assert next(g for g in again.groups if g.kind == "hidden").units == 36


def _reduce_model(op: str) -> ir.Model:
    x = ir.Value(name="x", shape=ir.Shape([1, 4, 8]), type=ir.TensorType(ir.DataType.FLOAT))
    axes = ir.Value(name="axes", shape=ir.Shape([1]), type=ir.TensorType(ir.DataType.INT64),
                    const_value=ir.Tensor(np.array([-1], dtype=np.int64), name="axes"))
    y = ir.Value(name="y", type=ir.TensorType(ir.DataType.FLOAT))
    node = ir.Node("", op, [x, axes], outputs=[y], name="stat")
    z = ir.Value(name="z", type=ir.TensorType(ir.DataType.FLOAT))
    add = ir.Node("", "Add", [x, y], outputs=[z], name="use")
    graph = ir.Graph([x], [z], nodes=[node, add], initializers=[axes],
                     opset_imports={"": 18})
    return ir.Model(graph, ir_version=10)


def _plan(model):
    from types import SimpleNamespace

    return SimpleNamespace(model=model, new_shape={"x": (1, 4, 6)},
                           old_shape={"x": (1, 4, 8)}, group_of={"x": "hidden group 9"})


def test_plan_statistics_corrects_means_and_refuses_other_reductions():
    corr = plan_statistics(_plan(_reduce_model("ReduceMean")))
    assert [(n.name, r) for n, r in corr.means] == [("stat", 0.75)]
    assert not plan_statistics(_plan(_reduce_model("ReduceSum"))).means  # exact as it is
    with pytest.raises(PipelineError, match="hidden group 9: ONNX node 'stat' \\(ReduceMax\\) "
                       "reduces over removed channels"):
        plan_statistics(_plan(_reduce_model("ReduceMax")))


def test_decomposed_layer_norm_variance_is_noted_approximate(tmp_path):
    """Cohere's LayerNorm is exported as ReduceMean, Sub, Pow, ReduceMean: the first mean
    is corrected exactly, the variance cannot be (the removed channels were -mean there);
    the report says so. RMS statistics (Qwen3) are exact and give no such note."""
    import transformers as tf

    from slimgraph.backends.onnx_export import export_onnx

    torch.manual_seed(0)
    cohere = tf.CohereForCausalLM(tf.CohereConfig(
        vocab_size=zoo.VOCAB, hidden_size=zoo.HIDDEN, intermediate_size=zoo.INTER,
        num_hidden_layers=1, num_attention_heads=zoo.HEADS, num_key_value_heads=zoo.KV,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval()
    for name, model, noted in (("cohere", cohere, True), ("qwen3", zoo.build("qwen3"), False)):
        r = analyze(import_onnx(export_onnx(model, tmp_path / name / "model.onnx", vocab=zoo.VOCAB)))
        (hidden,) = [g for g in r.prunable() if g.kind == "hidden"]
        notes = remove_units_onnx(r, {hidden.id: [1, 2, 3]})["notes"]
        assert any("decomposed LayerNorm" in n for n in notes) is noted, notes
