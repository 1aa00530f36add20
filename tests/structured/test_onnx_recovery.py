"""Calibrated structured removal on ONNX input (``importance=act|obs``, the refit,
``allocation=global``): the tiny LLaMA exported by ``slimgraph compile -p export-onnx``
and pruned through the ONNX block observer (one segment model per layer in ONNX Runtime)
keeps the units the PyTorch path keeps on the same calibration text, with the same
refitted weights and outputs up to ONNX Runtime's float error; the refit lowers the
output error against removal without it; ``refit_to=dense|residual`` carries the dense
model's hidden states beside the pruned ones as PyTorch does."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from slimgraph.cli import main
from slimgraph.frontends.onnx_import import import_onnx
from slimgraph.ir.dependency import analyze
from slimgraph.sparsity.calibration import sample_windows
from slimgraph.sparsity.onnx_targets import find_targets
from tests import zoo

ort = pytest.importorskip("onnxruntime")

CALIB = "samples=8,seqlen=32"  # the pass's own options (it reads 16 or 64 windows of 512)
REFITTED = sorted(f"model.layers.{i}.{m}" for i in range(zoo.LAYERS)
                  for m in ("self_attn.o_proj", "mlp.down_proj"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """hf/ (torch model + tokenizer), onnx/model.onnx (its export by the CLI, tokenizer
    beside it), calib.txt."""
    d = tmp_path_factory.mktemp("onnx_rec")
    zoo.build("llama").save_pretrained(d / "hf")
    zoo.tiny_tokenizer().save_pretrained(d / "hf")
    assert main(["compile", str(d / "hf"), "-p", "export-onnx", "-o", str(d / "onnx")]) == 0
    (d / "calib.txt").write_text(zoo.tiny_text(3000, seed=1))
    return d


def _compile(tiny, src, out, pipeline, *extra):
    pipeline = pipeline.replace("prune-structured{", "prune-structured{" + CALIB + ",")
    return main(["compile", str(src), "-p", pipeline, "-o", str(out), "--calib-file",
                 str(tiny / "calib.txt"), *extra])


def _report(out):
    passes = json.loads((out / "report.json").read_text())["passes"]
    return next(p for p in passes if p["name"] == "prune-structured")["report"]


def _weights(path) -> dict[str, torch.Tensor]:
    """The block linears of an ONNX file as ``[out, in]``, by name."""
    targets, _ = find_targets(analyze(import_onnx(path)))
    return {t.name: t.weight() for t in targets}


def _logits(path, ids):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input_ids": ids.numpy()})[0]


def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _held_out(tiny, n=4, seqlen=32):
    tokens = zoo.tiny_tokenizer()(zoo.tiny_text(3000, seed=7), add_special_tokens=False)
    return sample_windows(tokens["input_ids"], n, seqlen, seed=5)


@pytest.mark.parametrize("options", ["heads=0.5,mlp=0.5,importance=act",
                                     "heads=0.5,mlp=0.5,importance=obs,allocation=global"])
def test_onnx_keeps_and_refits_what_pytorch_does(tiny, tmp_path, options):
    pipeline = f"prune-structured{{{options}}},export-onnx"
    assert _compile(tiny, tiny / "hf", tmp_path / "torch", pipeline) == 0
    assert _compile(tiny, tiny / "onnx" / "model.onnx", tmp_path / "onnx", pipeline) == 0
    rt, ro = _report(tmp_path / "torch"), _report(tmp_path / "onnx")
    # (a) the same units (group ids differ between the two graphs: compared as sets)
    assert sorted(rt["selected_units"].values()) == sorted(ro["selected_units"].values())
    assert rt["removed_units"] == ro["removed_units"]
    # the report lists the same refitted linears, with the same calibration errors
    for rep in (rt, ro):
        assert rep["reconstruct"]["enabled"] is True
        assert sorted(rep["reconstruct"]["refitted"]) == REFITTED
    errs = {r["linear"]: r for r in rt["reconstruct"]["linears"]}
    for r in ro["reconstruct"]["linears"]:
        t = errs[r["linear"]]
        assert r["columns_removed"] == t["columns_removed"]
        assert r["rel_error_refit"] == pytest.approx(t["rel_error_refit"], rel=1e-3, abs=1e-5)
        assert r["rel_error_refit"] < r["rel_error_no_update"]
    # (b) the weights: sliced ones equal, refitted ones equal up to float error
    wt, wo = _weights(tmp_path / "torch" / "model.onnx"), _weights(tmp_path / "onnx" / "model.onnx")
    assert wt.keys() == wo.keys() and len(wt) == 7 * zoo.LAYERS
    for name, w in wo.items():
        assert w.shape == wt[name].shape, name
        refitted = name.removeprefix("model.").removesuffix(".weight") in REFITTED
        if refitted:
            assert float((w - wt[name]).norm() / wt[name].norm()) <= 1e-4, name
        else:
            assert torch.equal(w, wt[name]), name
    ids = _held_out(tiny)
    assert _rel(_logits(tmp_path / "onnx" / "model.onnx", ids),
                _logits(tmp_path / "torch" / "model.onnx", ids)) <= 1e-4


@pytest.mark.parametrize("options", ["hidden=0.25,importance=act",
                                     "mlp=0.5,hidden=0.25,importance=obs"])
def test_hidden_channels_scored_by_activations_as_on_pytorch(tiny, tmp_path, options):
    """Hidden channels chosen by their activation energy (every reader, the LM head
    included: one run of the dense ONNX model) are the PyTorch model's; the slim models
    agree."""
    pipeline = f"prune-structured{{{options}}},export-onnx"
    assert _compile(tiny, tiny / "hf", tmp_path / "torch", pipeline) == 0
    assert _compile(tiny, tiny / "onnx" / "model.onnx", tmp_path / "onnx", pipeline) == 0
    rt, ro = _report(tmp_path / "torch"), _report(tmp_path / "onnx")
    assert sorted(rt["selected_units"].values()) == sorted(ro["selected_units"].values())
    assert rt["removed_units"] == ro["removed_units"] and "hidden" in ro["removed_units"]
    ids = _held_out(tiny)
    assert _rel(_logits(tmp_path / "onnx" / "model.onnx", ids),
                _logits(tmp_path / "torch" / "model.onnx", ids)) <= 1e-4


def test_the_refit_lowers_the_output_error_on_onnx(tiny, tmp_path):
    """On the calibration windows (what the refit fits), the refitted model is closer to
    the dense one than the same removal without the refit."""
    src = tiny / "onnx" / "model.onnx"
    tokens = zoo.tiny_tokenizer()((tiny / "calib.txt").read_text(), add_special_tokens=False)
    ids = sample_windows(tokens["input_ids"], 8, 32, 0)  # the pass's windows (CALIB)
    dense = _logits(src, ids)
    errs = {}
    for rec in ("true", "false"):
        out = tmp_path / rec
        assert _compile(tiny, src, out, f"prune-structured{{mlp=0.5,importance=act,"
                        f"reconstruct={rec}}},export-onnx") == 0
        errs[rec] = _rel(_logits(out / "model.onnx", ids), dense)
        assert _report(out)["reconstruct"]["enabled"] is (rec == "true")
    assert errs["true"] < errs["false"], errs


def test_default_refit_needs_a_tokenizer_beside_the_onnx_file(tiny, tmp_path):
    """l2 with calibration text: refitted by default when the file's tokenizer is found
    (as on a PyTorch model), removed without a refit when there is none."""
    assert _compile(tiny, tiny / "onnx" / "model.onnx", tmp_path / "a",
                    "prune-structured{mlp=0.5},export-onnx") == 0
    rec = _report(tmp_path / "a")["reconstruct"]
    assert rec["enabled"] is True and sorted(rec["refitted"]) == sorted(
        r for r in REFITTED if r.endswith("down_proj"))
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tiny / "onnx" / "model.onnx", bare / "model.onnx")
    assert _compile(tiny, bare / "model.onnx", tmp_path / "b",
                    "prune-structured{mlp=0.5},export-onnx") == 0
    assert _report(tmp_path / "b")["reconstruct"] == {"enabled": False}


def test_a_graph_that_cannot_be_cut_into_layers(tiny, tmp_path, capsys, monkeypatch):
    """The default refit of l1/l2 removal is left out (the report says why); an explicit
    importance=act is refused in one line."""
    from slimgraph.sparsity.onnx_blocks import SegmentError
    from slimgraph.structured import onnx_observer

    def refuse(*_a, **_k):
        raise SegmentError("node 'x' (Loop) holds a subgraph")

    monkeypatch.setattr(onnx_observer, "plan_segments", refuse)
    src = tiny / "onnx" / "model.onnx"
    assert _compile(tiny, src, tmp_path / "a", "prune-structured{mlp=0.5},export-onnx") == 0
    rec = _report(tmp_path / "a")["reconstruct"]
    assert rec["enabled"] is False and "cannot be cut into layers" in rec["note"]
    capsys.readouterr()
    assert _compile(tiny, src, tmp_path / "b",
                    "prune-structured{mlp=0.5,importance=act},export-onnx") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "importance=act" in err and "cannot be cut into layers" in err
    assert not (tmp_path / "b" / "report.json").exists()


@pytest.mark.parametrize("target", ["dense", "residual"])
def test_refit_to_the_dense_model_as_on_pytorch(tiny, tmp_path, target):
    """``refit_to=dense|residual``: the dense model's hidden states carried beside the
    pruned ones through the segment models give the refit PyTorch gives."""
    pipeline = f"prune-structured{{heads=0.5,mlp=0.5,importance=act,refit_to={target}}},export-onnx"
    assert _compile(tiny, tiny / "hf", tmp_path / "torch", pipeline) == 0
    assert _compile(tiny, tiny / "onnx" / "model.onnx", tmp_path / "onnx", pipeline) == 0
    rt, ro = _report(tmp_path / "torch"), _report(tmp_path / "onnx")
    assert sorted(rt["selected_units"].values()) == sorted(ro["selected_units"].values())
    errs = {r["linear"]: r for r in rt["reconstruct"]["linears"]}
    assert sorted(errs) == REFITTED and len(ro["reconstruct"]["linears"]) == len(REFITTED)
    for r in ro["reconstruct"]["linears"]:
        t = errs[r["linear"]]
        want = "residual" if target == "residual" and "down_proj" in r["linear"] else "dense"
        assert r["target"] == t["target"] == want, r
        assert r["rel_error_refit"] == pytest.approx(t["rel_error_refit"], rel=1e-3, abs=1e-5)
    wt, wo = _weights(tmp_path / "torch" / "model.onnx"), _weights(tmp_path / "onnx" / "model.onnx")
    assert wt.keys() == wo.keys()
    for name, w in wo.items():
        assert float((w - wt[name]).norm() / wt[name].norm()) <= 1e-4, name
    ids = _held_out(tiny)
    assert _rel(_logits(tmp_path / "onnx" / "model.onnx", ids),
                _logits(tmp_path / "torch" / "model.onnx", ids)) <= 1e-4
