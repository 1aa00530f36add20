"""`sparsify` on ONNX input (slimgraph.sparsity.onnx_path): the tiny LLaMA exported with
dynamic axes, pruned through the ONNX path and saved by export-onnx; magnitude equals the
PyTorch path; Wanda's one-shot ORT calibration equals the dense torch activations; options
only the PyTorch path supports are refused before anything is written."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from slimgraph.cli import main
from slimgraph.frontends.loading import load_model
from slimgraph.frontends.onnx_import import import_onnx
from slimgraph.ir.dependency import analyze
from slimgraph.sparsity.calibration import calibration_tokens, sample_windows
from slimgraph.sparsity.masks import is_nm
from slimgraph.sparsity.onnx_path import CALIBRATION, find_targets, input_sumsq
from tests import zoo

ort = pytest.importorskip("onnxruntime")

N_TARGETS = 7 * zoo.LAYERS
WRAPPER = "model."  # export-onnx's LogitsOnly wrapper prefixes the module names


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """hf/ (torch model + tokenizer), onnx/model.onnx (+ tokenizer beside it),
    ext/model.onnx (the same with external data, no tokenizer), calib.txt."""
    from slimgraph.backends.onnx_export import export_onnx

    d = tmp_path_factory.mktemp("onnx_sp")
    model = zoo.build("llama")
    model.save_pretrained(d / "hf")
    zoo.tiny_tokenizer().save_pretrained(d / "hf")
    export_onnx(model, d / "onnx" / "model.onnx", vocab=zoo.VOCAB)
    zoo.tiny_tokenizer().save_pretrained(d / "onnx")
    (d / "ext").mkdir()
    ir.save(ir.load(d / "onnx" / "model.onnx"), d / "ext" / "model.onnx",
            external_data="model.onnx.data")
    (d / "calib.txt").write_text(zoo.tiny_text(3000, seed=1))
    return d


def _hashes(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.iterdir()) if p.is_file()}


def _compile(src, out, pipeline, *extra):
    return main(["compile", str(src), "-p", pipeline, "-o", str(out), *extra])


def _calib(tiny):
    return ["--calib-file", str(tiny / "calib.txt"), "--calib-samples", "8",
            "--calib-seqlen", "32"]


def _ort_logits(path, ids):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input_ids": ids.numpy()})[0]


def _onnx_weights(path) -> dict[str, torch.Tensor]:
    """Block linear weights of an ONNX file in torch layout, by torch name."""
    targets, _ = find_targets(analyze(import_onnx(path)))
    return {t.name.removeprefix(WRAPPER): t.handle.read() for t in targets}


def _report(out):
    return json.loads((out / "report.json").read_text())["passes"]


@pytest.mark.parametrize("variant", ["onnx", "ext"])
def test_magnitude_24_end_to_end(tiny, tmp_path, variant):
    src = tiny / variant / "model.onnx"
    before = _hashes(src.parent)
    out = tmp_path / "out"
    rc = _compile(src, out, "sparsify{score=magnitude,pattern=2:4},export-onnx")
    assert rc == 0
    path = out / "model.onnx"
    onnx.checker.check_model(str(path))
    assert main(["check-sparsity", str(path), "--pattern", "2:4"]) == 0
    assert _hashes(src.parent) == before  # the input is untouched
    # self-contained: no temp leftovers, no reference to the input's external data
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.startswith(".")]
    assert "model.onnx.data" not in names
    proto = onnx.load(str(path), load_external_data=False)
    assert not [t.name for t in proto.graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL]
    assert ("tokenizer.json" in names) == (variant == "onnx")  # copied when next to the input
    ids = torch.randint(0, zoo.VOCAB, (2, 11), generator=torch.Generator().manual_seed(3))
    logits = _ort_logits(path, ids)
    assert logits.shape == (2, 11, zoo.VOCAB) and np.isfinite(logits).all()
    weights = _onnx_weights(path)
    assert len(weights) == N_TARGETS
    for name, w in weights.items():
        assert is_nm(w, 2, 4, axis=1), name
        assert float((w == 0).float().mean()) == pytest.approx(0.5), name
    passes = _report(out)
    rep = passes[0]["report"]
    assert rep["sparsity"] == pytest.approx(0.5) and not rep["skipped"]
    assert len(rep["layers"]) == N_TARGETS and rep["input"] == "onnx"
    assert {r["name"] for r in rep["layers"]} == {  # torch's module names: the wrapper's removed
        f"model.layers.{i}.{m}" for i in range(zoo.LAYERS)
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert rep["calibration"]["method"] is None  # magnitude needs no data
    assert passes[1]["report"]["ort_check"]["finite"]


def test_magnitude_matches_the_pytorch_path(tiny, tmp_path):
    pipeline = "sparsify{score=magnitude,pattern=2:4}"
    assert _compile(tiny / "onnx" / "model.onnx", tmp_path / "o", pipeline + ",export-onnx") == 0
    assert _compile(tiny / "hf", tmp_path / "t", pipeline + ",save-hf") == 0
    torch_model = load_model(str(tmp_path / "t" / "hf")).model
    # the same masks, weight by weight
    params = dict(torch_model.named_parameters())
    onnx_w = _onnx_weights(tmp_path / "o" / "model.onnx")
    assert len(onnx_w) == N_TARGETS
    for name, w in onnx_w.items():
        assert torch.equal(w, params[name].detach()), name
    # and the same outputs
    ids = torch.randint(0, zoo.VOCAB, (2, 13), generator=torch.Generator().manual_seed(5))
    got = _ort_logits(tmp_path / "o" / "model.onnx", ids)
    with torch.no_grad():
        want = torch_model(input_ids=ids, use_cache=False).logits.numpy()
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel < 1e-4


def _torch_norms(model, windows) -> dict[str, torch.Tensor]:
    """sqrt(sum of squares) of every block nn.Linear's input channels (dense model)."""
    sums: dict[str, torch.Tensor] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            def hook(_m, args, name=name):
                x = args[0].detach().double()
                sums[name] = sums.get(name, 0) + x.pow(2).reshape(-1, x.shape[-1]).sum(0)

            hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(input_ids=windows, use_cache=False)
    for h in hooks:
        h.remove()
    return {n + ".weight": s.sqrt() for n, s in sums.items()}


def test_wanda_24_one_shot_calibration_matches_dense_torch(tiny, tmp_path):
    src = tiny / "onnx" / "model.onnx"
    out = tmp_path / "out"
    assert _compile(src, out, "sparsify{score=wanda,pattern=2:4},export-onnx", *_calib(tiny)) == 0
    assert main(["check-sparsity", str(out / "model.onnx"), "--pattern", "2:4"]) == 0
    rep = _report(out)[0]["report"]
    assert rep["calibration"] == {"method": CALIBRATION, "source": str(tiny / "calib.txt"),
                                  "samples": 8, "seqlen": 32}
    assert any("one-shot" in n for n in rep["notes"])
    assert rep["sparsity"] == pytest.approx(0.5) and len(rep["layers"]) == N_TARGETS

    # the per-channel input norms from ONNX Runtime equal the dense torch activations'
    windows = sample_windows(calibration_tokens(zoo.tiny_tokenizer(), tiny / "calib.txt"),
                             8, 32, 0)
    graph = import_onnx(src)
    targets, _ = find_targets(analyze(graph))
    onnx_norms = {n.removeprefix(WRAPPER): s.sqrt()
                  for n, s in input_sumsq(graph.meta["onnx_model"], targets, windows).items()}
    torch_norms = _torch_norms(zoo.build("llama"), windows)
    assert sorted(onnx_norms) == sorted(torch_norms) and len(onnx_norms) == N_TARGETS
    for name, want in torch_norms.items():
        rel = float((onnx_norms[name] - want).norm() / want.norm())
        assert rel < 1e-4, (name, rel)

    # layer 0 sees dense activations on both paths: its masks equal the PyTorch path's
    assert _compile(tiny / "hf", tmp_path / "t", "sparsify{score=wanda,pattern=2:4},save-hf",
                    *_calib(tiny)) == 0
    params = dict(load_model(str(tmp_path / "t" / "hf")).model.named_parameters())
    onnx_w = _onnx_weights(out / "model.onnx")
    layer0 = [n for n in onnx_w if ".layers.0." in n]
    assert len(layer0) == 7
    for name in layer0:
        assert torch.equal(onnx_w[name] != 0, params[name] != 0), name


@pytest.mark.parametrize("options,needle", [
    ("score=ria,pattern=2:4,reconstruct=true", "option 'reconstruct'"),
    ("score=ria,pattern=2:4,permute=fold", "option 'permute'"),
    ("score=sparsegpt,pattern=2:4", "option 'score'"),
    ("score=wanda,pattern=2:4,calib=self", "option 'calib'"),
])
def test_torch_only_options_are_refused(tiny, tmp_path, capsys, options, needle):
    src = tiny / "onnx" / "model.onnx"
    before = _hashes(src.parent)
    out = tmp_path / "out"
    rc = _compile(src, out, f"sparsify{{{options}}},export-onnx")
    err = capsys.readouterr().err
    assert rc == 2
    assert needle in err and ("ONNX input" in err or "PyTorch model" in err), err
    assert not (out / "model.onnx").exists() and not (out / "report.json").exists()
    assert _hashes(src.parent) == before


def test_wanda_needs_a_tokenizer_next_to_the_file(tiny, tmp_path, capsys):
    rc = _compile(tiny / "ext" / "model.onnx", tmp_path / "out",
                  "sparsify{score=wanda,pattern=2:4},export-onnx", *_calib(tiny))
    assert rc == 2
    assert "no tokenizer next to" in capsys.readouterr().err
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_check_sparsity_pass_checks_the_written_file(tiny, tmp_path, capsys):
    src = tiny / "onnx" / "model.onnx"
    rc = _compile(src, tmp_path / "a", "sparsify{score=ri,pattern=2:4},export-onnx,check-sparsity")
    assert rc == 0
    rep = _report(tmp_path / "a")[2]["report"]
    assert rep["ok"] and [r["model"] for r in rep["reports"]] == [
        str((tmp_path / "a" / "model.onnx").resolve())]
    # without a written file there is nothing that holds the pruned model
    rc = _compile(src, tmp_path / "b", "sparsify{score=ri,pattern=2:4},check-sparsity")
    assert rc == 2 and "put export-onnx before check-sparsity" in capsys.readouterr().err


def test_unknown_sizes_are_a_layout_conflict_not_a_crash():
    """A dynamic-axis export whose shape inference loses a dim (size 0 = symbolic) made
    the analysis divide by zero; it is a barrier like any other unalignable layout."""
    from slimgraph.ir.spaces import ChannelSpaces, LayoutConflict

    spaces = ChannelSpaces()
    known, unknown = spaces.fresh_layout(16), spaces.fresh_layout("seq")
    with pytest.raises(LayoutConflict, match="cannot be compared"):
        spaces.unify(known, unknown)
