"""Structured removal on ONNX input (slimgraph.structured.onnx_removal).

The invariant of the PyTorch path, on ONNX files run by ONNX Runtime: the slimmed ONNX
model's outputs equal those of the original ONNX model with the same units zeroed, and
those of the PyTorch path's slimmed model on the same selection. Files: tiny zoo models
exported with static shapes (heads and MLP channels are exact groups there) and, for
llama, with dynamic batch/sequence axes (torch's default opset 18; heads and MLP
channels: the head counts sit in Concat-built shape tensors). Dynamic-axis exports at
opsets 18 and 23 with more KV-groups: test_onnx_dynamic_heads.py.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import warnings

import numpy as np
import onnx
import pytest
import torch

from slimgraph.cli import main
from slimgraph.errors import PipelineError
from slimgraph.frontends.onnx_import import import_onnx
from slimgraph.frontends.torch_export import trace
from slimgraph.ir.dependency import analyze
from slimgraph.structured.onnx_removal import remove_units_onnx
from slimgraph.structured.removal import remove_units
from slimgraph.structured.unit_slicing import mask_units
from tests import zoo

ort = pytest.importorskip("onnxruntime")

STATIC = ["llama", "qwen2", "opt", "gpt2"]
SEQ = 7


def _export_static(model, path):
    from slimgraph.backends.onnx_export import LogitsOnly, _quiet

    ids = torch.randint(0, zoo.VOCAB, (1, SEQ))
    path.parent.mkdir(parents=True, exist_ok=True)
    with _quiet(), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(LogitsOnly(model).eval(), (ids,), dynamo=True,
                                 input_names=["input_ids"], output_names=["logits"],
                                 verbose=False)
    prog.save(str(path))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{"llama": .../llama/model.onnx (static), ..., "llama-dyn": dynamic axes}."""
    from slimgraph.backends.onnx_export import export_onnx

    d = tmp_path_factory.mktemp("onnx_rm")
    out = {}
    for name in STATIC:
        out[name] = d / name / "model.onnx"
        _export_static(zoo.build(name), out[name])
    out["llama-dyn"] = d / "llama-dyn" / "model.onnx"
    export_onnx(zoo.build("llama"), out["llama-dyn"], vocab=zoo.VOCAB)
    return out


def _hashes(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.iterdir()) if p.is_file()}


def _ids(seed=3, batch=1):
    return torch.randint(0, zoo.VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


def _ort(path, ids):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input_ids": ids.numpy()})[0]


def _save(result, path):
    from slimgraph.backends.onnx_export import save_onnx_model

    return save_onnx_model(result.graph.meta["onnx_model"], path)


def _selection(result, seed, kinds):
    rng = random.Random(seed)
    sel = {}
    for g in result.prunable():
        if g.kind in kinds and rng.random() < 0.8:
            k = rng.randint(1, g.units - 1)
            sel[g.id] = sorted(rng.sample(range(g.units), k))
    if not sel:  # at least one group
        g = next(g for g in result.prunable() if g.kind in kinds)
        sel[g.id] = [rng.randrange(g.units)]
    return sel


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _check_strict(path):
    onnx.checker.check_model(str(path))
    onnx.shape_inference.infer_shapes(onnx.load(str(path)), check_type=True, strict_mode=True)


@pytest.mark.parametrize("name,kinds", [(n, ("heads", "mlp")) for n in STATIC]
                         + [("llama-dyn", ("heads", "mlp"))])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_slim_equals_masked_and_the_torch_path(files, tmp_path, name, kinds, seed):
    src = files[name]
    before = _hashes(src.parent)
    result = analyze(import_onnx(src))
    sel = _selection(result, seed, kinds)
    # masked: the same units zeroed in a fresh copy of the original ONNX model
    masked = analyze(import_onnx(src))
    mask_units(masked, sel)
    masked_path = _save(masked, tmp_path / "masked" / "model.onnx")
    report = remove_units_onnx(result, sel)
    slim_path = _save(result, tmp_path / "slim" / "model.onnx")
    assert report["params_after"] < report["params_before"]
    assert report["shape_check"]["checked"] and report["shape_check"]["strict"]
    _check_strict(slim_path)
    assert slim_path.stat().st_size < src.stat().st_size
    ids = _ids(seed)
    want = _ort(masked_path, ids)
    got = _ort(slim_path, ids)
    assert got.shape == want.shape == (1, SEQ, zoo.VOCAB)
    assert _rel(got, want) <= 1e-5
    assert _hashes(src.parent) == before  # the input is never written

    # the PyTorch path on the same selection (groups matched by kind and layer)
    base = name.removesuffix("-dyn")
    model = zoo.build(base)
    args, kwargs = (ids,), {"use_cache": False}
    tr = analyze(trace(model, args, kwargs))
    key = {(g.kind, g.layer): g.id for g in tr.groups}
    by_id = {g.id: g for g in result.groups}
    t_by_id = {g.id: g for g in tr.groups}
    tsel = {}
    for gid, units in sel.items():
        tid = key[(by_id[gid].kind, by_id[gid].layer)]
        assert t_by_id[tid].units == by_id[gid].units
        tsel[tid] = units
    remove_units(model, tr, tsel)
    with torch.no_grad():
        torch_out = model(*args, **kwargs).logits.numpy()
    assert _rel(got, torch_out) <= 1e-4

    # the slimmed file imports again, with the smaller groups
    again = analyze(import_onnx(slim_path))
    for gid, units in sel.items():
        g = by_id[gid]
        if g.units - len(units) > 1:
            assert any(h.kind == g.kind and h.layer == g.layer and
                       h.units == g.units - len(units) for h in again.groups), (g.kind, g.layer)


def _compile(src, out, pipeline, *extra):
    return main(["compile", str(src), "-p", pipeline, "-o", str(out), *extra])


def test_cli_static_heads_and_mlp_end_to_end(files, tmp_path, capsys):
    src = files["llama"]
    before = _hashes(src.parent)
    out = tmp_path / "out"
    assert _compile(src, out, "prune-structured{heads=0.5,mlp=0.5},export-onnx") == 0
    path = out / "model.onnx"
    _check_strict(path)
    assert path.stat().st_size < src.stat().st_size
    assert _hashes(src.parent) == before
    rep = json.loads((out / "report.json").read_text())
    pr = rep["passes"][0]["report"]
    assert pr["input"] == "onnx" and pr["removed_units"] == {
        "heads[0]": 1, "mlp[0]": 48, "heads[1]": 1, "mlp[1]": 48}
    ops = {r["op"] for r in pr["onnx_rewrites"]}
    assert ops == {"Reshape", "Expand"}  # head counts in the static attention's shapes
    assert rep["parameters"]["after"] < rep["parameters"]["before"]
    assert rep["passes"][1]["report"]["ort_check"]["finite"]
    logits = _ort(path, _ids())
    assert logits.shape == (1, SEQ, zoo.VOCAB) and np.isfinite(logits).all()

    # the same selection in two steps: prune-structured{remove=false}, then remove
    out2 = tmp_path / "two"
    assert _compile(src, out2, "prune-structured{heads=0.5,mlp=0.5,remove=false},remove,"
                    "export-onnx") == 0
    np.testing.assert_array_equal(_ort(out2 / "model.onnx", _ids()), logits)

    # the ONNX path's l2 scores pick what the PyTorch path picks
    hf = tmp_path / "hf"
    zoo.build("llama").save_pretrained(hf)
    assert _compile(hf, tmp_path / "t", "prune-structured{heads=0.5,mlp=0.5},export-onnx") == 0
    torch_logits = _ort(tmp_path / "t" / "model.onnx", _ids())
    assert _rel(logits, torch_logits) <= 1e-4

    capsys.readouterr()
    assert main(["inspect", "--diff", str(src), str(path)]) == 0
    text = capsys.readouterr().out
    assert "mlp.gate_proj.weight" in text and "[96, 64]" in text and "[48, 64]" in text


def test_cli_dynamic_axes_mlp(files, tmp_path):
    src = files["llama-dyn"]
    out = tmp_path / "out"
    assert _compile(src, out, "prune-structured{mlp=0.5,importance=l1},export-onnx") == 0
    path = out / "model.onnx"
    _check_strict(path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = _ids(batch=2)
    assert sess.run(None, {"input_ids": ids.numpy()})[0].shape == (2, SEQ, zoo.VOCAB)
    # dynamic axes survive
    inp = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in inp] == ["batch", "seq"]


@pytest.mark.parametrize("options", ["mlp=0.5,importance=act", "mlp=0.5,reconstruct=true",
                                     "mlp=0.5,allocation=global"])
def test_calibrated_options_run_on_onnx_input(files, tmp_path, options):
    """importance=act, the refit and global allocation run on ONNX input (calibration in
    ONNX Runtime, one segment model per layer; test_onnx_recovery.py compares them with
    the PyTorch path); the static export's tokenizer is put beside a copy of it."""
    from tests.zoo import tiny_text, tiny_tokenizer

    src = tmp_path / "src"
    shutil.copytree(files["llama"].parent, src)
    tiny_tokenizer().save_pretrained(src)
    (tmp_path / "calib.txt").write_text(tiny_text(1000, seed=1))
    out = tmp_path / "out"
    assert main(["compile", str(src / "model.onnx"), "-p", f"prune-structured{{{options},"
                 f"samples=4,seqlen={SEQ}}},export-onnx", "-o", str(out), "--calib-file",
                 str(tmp_path / "calib.txt")]) == 0
    rep = json.loads((out / "report.json").read_text())["passes"][0]["report"]
    assert rep["reconstruct"]["enabled"] is True  # the default with calibration text
    assert _ort(out / "model.onnx", _ids()).shape == (1, SEQ, zoo.VOCAB)


def test_a_size_left_unrewritten_is_caught_by_shape_inference(files, monkeypatch):
    """If a node encoding a head count were missed, the re-inferred shapes disagree with
    the analysis and the pass fails instead of producing a wrong model."""
    from slimgraph.structured import onnx_removal

    monkeypatch.setattr(onnx_removal.RemovalPlan, "_shape_input", lambda *a, **k: None)
    result = analyze(import_onnx(files["llama"]))
    heads = next(g for g in result.prunable() if g.kind == "heads")
    with pytest.raises(PipelineError, match="the analysis expects"):
        remove_units_onnx(result, {heads.id: [0]})


def test_selections_cover_heads_and_mlp(files):
    """The random selections of the invariant test remove heads and MLP channels."""
    kinds = set()
    for name in [*STATIC, "llama-dyn"]:
        result = analyze(import_onnx(files[name]))
        for seed in (0, 1, 2):
            by_id = {g.id: g for g in result.groups}
            kinds |= {by_id[gid].kind for gid in _selection(result, seed, ("heads", "mlp"))}
    assert kinds == {"heads", "mlp"}


def test_the_shape_check_copies_no_weights(files):
    """The re-inference runs on a serialization without the weights' data (so a model of
    any size is checked) and leaves the model's tensors as they were."""
    import onnx_ir as ir

    from slimgraph.structured.onnx_removal import _shape_only_proto

    model = analyze(import_onnx(files["llama"])).graph.meta["onnx_model"]
    tensors = {n: v.const_value for n, v in model.graph.initializers.items()}
    weight_bytes = sum(t.nbytes for t in tensors.values())
    proto = _shape_only_proto(model)
    inline = sum(len(t.raw_data) for t in proto.graph.initializer)
    assert inline < weight_bytes / 4
    external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(external) == sum(1 for t in tensors.values() if t.size > 1024) > 0
    assert all(model.graph.initializers[n].const_value is t for n, t in tensors.items())
    assert not any(isinstance(t, ir.ExternalTensor) for t in tensors.values())
    inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True)
    assert len(inferred.graph.value_info) > 0


NEWER = ["qwen3", "gemma3", "olmo2", "phi3", "glm"]


@pytest.fixture(scope="module")
def newer_files(tmp_path_factory):
    """Dynamic-axis exports (export-onnx, opset 23) of the newer zoo architectures."""
    from slimgraph.backends.onnx_export import export_onnx

    d = tmp_path_factory.mktemp("onnx_rm_newer")
    return {n: export_onnx(zoo.build(n), d / n / "model.onnx", vocab=zoo.VOCAB) for n in NEWER}


@pytest.mark.parametrize("name", NEWER)
@pytest.mark.parametrize("kind", ["heads", "qheads", "mlp", "hidden"])
def test_newer_architectures_slim_equals_the_torch_path(newer_files, tmp_path, name, kind):
    """Phi-3's fused qkv_proj output is cut by Slices at fixed offsets (rewritten when heads
    go), OLMo-2's q_norm / k_norm span all heads, Gemma's norms multiply by (1 + w)."""
    result = analyze(import_onnx(newer_files[name]))
    sel = _selection(result, 0, (kind,))
    report = remove_units_onnx(result, sel)
    assert report["params_after"] < report["params_before"]
    if name == "phi3" and kind == "heads":
        assert any(r["op"] == "Slice" for r in report["onnx_rewrites"])
    ids = _ids(5, batch=2)
    got = _ort(_save(result, tmp_path / "model.onnx"), ids)
    model = zoo.build(name)
    tr = analyze(trace(model, (ids,), {"use_cache": False}))
    key = {(g.kind, g.layer): g.id for g in tr.groups}
    by_id = {g.id: g for g in result.groups}
    remove_units(model, tr, {key[(by_id[gid].kind, by_id[gid].layer)]: u for gid, u in sel.items()})
    with torch.no_grad():
        want = model(ids, use_cache=False).logits.numpy()
    assert got.shape == want.shape == (2, SEQ, zoo.VOCAB)
    assert _rel(got, want) <= 1e-4
