"""`sparsify` on ONNX input (slimgraph.sparsity.onnx_path): the tiny LLaMA exported with
dynamic axes, pruned through the ONNX path and saved by export-onnx; magnitude equals the
PyTorch path; the block-sequential ORT calibration gives the PyTorch path's masks for
Wanda and RIA in every layer (the one-shot fallback's statistics equal the dense torch
activations); options only the PyTorch path supports are refused before anything is
written."""

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
from slimgraph.sparsity.onnx_path import CALIBRATION, ONE_SHOT, input_stats
from slimgraph.sparsity.onnx_targets import find_targets
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
    """Every block nn.Linear's input-channel statistic as GramAccumulator.act_norm defines
    it: sqrt(sum of squares / calibration samples), here from one forward in float64."""
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
    return {n + ".weight": (s / windows.shape[0]).sqrt() for n, s in sums.items()}


@pytest.mark.parametrize("options", ["score=wanda,pattern=2:4", "score=ria,pattern=2:4",
                                     "score=wanda,sparsity=0.5,scope=row"])
def test_block_sequential_calibration_gives_the_pytorch_masks(tiny, tmp_path, options):
    """Every layer's mask equals the PyTorch path's: layer 1 is observed on the outputs of
    the pruned layer 0 on both paths (with dense activations, layer 1 differs)."""
    src = tiny / "onnx" / "model.onnx"
    out = tmp_path / "out"
    pipeline = f"sparsify{{{options}}}"
    assert _compile(src, out, pipeline + ",export-onnx", *_calib(tiny)) == 0
    rep = _report(out)[0]["report"]
    assert rep["calibration"] == {"method": CALIBRATION, "source": str(tiny / "calib.txt"),
                                  "samples": 8, "seqlen": 32}
    assert rep["notes"] == [] and len(rep["layers"]) == N_TARGETS
    assert rep["sparsity"] == pytest.approx(0.5)
    assert _compile(tiny / "hf", tmp_path / "t", pipeline + ",save-hf", *_calib(tiny)) == 0
    params = dict(load_model(str(tmp_path / "t" / "hf")).model.named_parameters())
    onnx_w = _onnx_weights(out / "model.onnx")
    assert len(onnx_w) == N_TARGETS
    for name, w in onnx_w.items():
        assert torch.equal(w, params[name].detach()), name

    # dense statistics (one-shot) would give layer 1 other masks: the test can tell
    windows = sample_windows(calibration_tokens(zoo.tiny_tokenizer(), tiny / "calib.txt"),
                             8, 32, 0)
    graph = import_onnx(src)
    targets, _ = find_targets(analyze(graph))
    dense = input_stats(graph.meta["onnx_model"], targets, windows)
    pruned = _torch_norms(load_model(str(tmp_path / "t" / "hf")).model, windows)
    later = [t.name for t in targets if ".layers.1." in t.name]
    assert later and any(not torch.allclose(dense[n].act_norm().double(),
                                            pruned[n.removeprefix(WRAPPER)],
                                            rtol=1e-3) for n in later)


@pytest.mark.parametrize("options", ["score=ria,pattern=2:4,reconstruct=true",
                                     "score=sparsegpt,sparsity=0.5"])
def test_reconstruction_matches_the_pytorch_path(tiny, tmp_path, options):
    """SparseGPT's update on ONNX input, from the Gram matrices of the segment models:
    the PyTorch path's masks, its weights and outputs within 1e-4."""
    pipeline = f"sparsify{{{options}}}"
    out = tmp_path / "out"
    assert _compile(tiny / "onnx" / "model.onnx", out, pipeline + ",export-onnx",
                    *_calib(tiny)) == 0
    rep = _report(out)[0]["report"]
    assert rep["calibration"]["method"] == CALIBRATION
    assert rep["reconstruct"] == ("reconstruct=true" in options)
    assert _compile(tiny / "hf", tmp_path / "t", pipeline + ",save-hf", *_calib(tiny)) == 0
    torch_model = load_model(str(tmp_path / "t" / "hf")).model
    params = dict(torch_model.named_parameters())
    dense = dict(zoo.build("llama").named_parameters())
    onnx_w = _onnx_weights(out / "model.onnx")
    assert len(onnx_w) == N_TARGETS
    for name, w in onnx_w.items():
        want = params[name].detach()
        assert torch.equal(w != 0, want != 0), name
        assert float((w - want).norm() / want.norm()) < 1e-4, name
        kept = w != 0  # the kept weights were updated, not only masked
        assert not torch.equal(w[kept], dense[name].detach()[kept]), name
    ids = torch.randint(0, zoo.VOCAB, (2, 13), generator=torch.Generator().manual_seed(5))
    got = _ort_logits(out / "model.onnx", ids)
    with torch.no_grad():
        want = torch_model(input_ids=ids, use_cache=False).logits.numpy()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-4


@pytest.mark.parametrize("options", ["score=wanda,sparsity=0.5,schedule=owl,owl_lambda=0.1",
                                     "score=ria,sparsity=0.5,schedule=linear,spread=0.1",
                                     "score=magnitude,layer_sparsity=0.4 0.6"])
def test_per_layer_schedules_match_the_pytorch_path(tiny, tmp_path, options):
    pipeline = f"sparsify{{{options}}}"
    out = tmp_path / "out"
    assert _compile(tiny / "onnx" / "model.onnx", out, pipeline + ",export-onnx",
                    *_calib(tiny)) == 0
    assert _compile(tiny / "hf", tmp_path / "t", pipeline + ",save-hf", *_calib(tiny)) == 0
    rep, want = _report(out)[0]["report"], _report(tmp_path / "t")[0]["report"]
    got_s, want_s = rep["schedule"], want["schedule"]
    assert got_s["name"] == want_s["name"] and got_s["layers"] == want_s["layers"]
    assert got_s["layer_params"] == want_s["layer_params"]
    assert got_s["layer_sparsity"] == pytest.approx(want_s["layer_sparsity"], abs=1e-6)
    assert got_s["layer_sparsity_pruned"] == want_s["layer_sparsity_pruned"]
    assert len(set(got_s["layer_sparsity_pruned"])) == zoo.LAYERS  # the layers differ
    if "owl" in options:
        assert got_s["owl"]["outlier_ratio"] == pytest.approx(want_s["owl"]["outlier_ratio"],
                                                              rel=1e-5)
    assert rep["sparsity_target"] == pytest.approx(want["sparsity_target"])
    params = dict(load_model(str(tmp_path / "t" / "hf")).model.named_parameters())
    for name, w in _onnx_weights(out / "model.onnx").items():
        assert torch.equal(w != 0, params[name] != 0), name


def test_explicit_schedule_needs_one_value_per_layer(tiny, tmp_path, capsys):
    rc = _compile(tiny / "onnx" / "model.onnx", tmp_path / "out",
                  "sparsify{score=magnitude,layer_sparsity=0.4 0.5 0.6},export-onnx")
    assert rc == 2
    err = capsys.readouterr().err
    assert "option 'layer_sparsity'" in err and f"{zoo.LAYERS} decoder blocks" in err
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_segments_cut_the_residual_stream(tiny):
    """One segment per layer; only the residual stream crosses between them."""
    from slimgraph.sparsity.onnx_blocks import plan_segments, target_layers

    graph = import_onnx(tiny / "onnx" / "model.onnx")
    result = analyze(graph)
    targets, _ = find_targets(result)
    segments = plan_segments(graph.meta["onnx_model"].graph, targets,
                             target_layers(result, targets))
    assert [s.layer for s in segments] == list(range(zoo.LAYERS))
    assert [len(s.targets) for s in segments] == [7] * zoo.LAYERS
    assert segments[0].inputs == [] and segments[-1].outputs == []
    for a, b in zip(segments, segments[1:]):
        assert len(a.outputs) == 1 and a.outputs == b.inputs
    # the crossing value is a residual Add's output
    by_out = {o.name: n for n in graph.meta["onnx_model"].graph for o in n.outputs}
    assert all(by_out[s.outputs[0]].op_type == "Add" for s in segments[:-1])


def test_one_shot_fallback_statistics_match_dense_torch(tiny, monkeypatch, tmp_path):
    """A graph that cannot be cut into layers falls back to one dense run, says so, and
    those statistics equal the dense torch activations."""
    from slimgraph.sparsity import onnx_blocks
    from slimgraph.structured import onnx_observer

    def refuse(*_a, **_k):
        raise onnx_blocks.SegmentError("node 'x' holds a subgraph")

    monkeypatch.setattr(onnx_observer, "plan_segments", refuse)
    out = tmp_path / "out"
    assert _compile(tiny / "onnx" / "model.onnx", out, "sparsify{score=wanda,pattern=2:4},"
                    "export-onnx", *_calib(tiny)) == 0
    assert main(["check-sparsity", str(out / "model.onnx"), "--pattern", "2:4"]) == 0
    rep = _report(out)[0]["report"]
    assert rep["calibration"]["method"] == ONE_SHOT
    assert len(rep["notes"]) == 1 and "node 'x' holds a subgraph" in rep["notes"][0]

    windows = sample_windows(calibration_tokens(zoo.tiny_tokenizer(), tiny / "calib.txt"),
                             8, 32, 0)
    graph = import_onnx(tiny / "onnx" / "model.onnx")
    targets, _ = find_targets(analyze(graph))
    onnx_norms = {n.removeprefix(WRAPPER): s.act_norm().double()
                  for n, s in input_stats(graph.meta["onnx_model"], targets, windows).items()}
    torch_norms = _torch_norms(zoo.build("llama"), windows)
    assert sorted(onnx_norms) == sorted(torch_norms) and len(onnx_norms) == N_TARGETS
    for name, want in torch_norms.items():
        rel = float((onnx_norms[name] - want).norm() / want.norm())
        assert rel < 1e-4, (name, rel)


@pytest.mark.parametrize("mode", ["mask-only", "fold", "space", "gather", "gather_share"])
def test_permutations_match_the_pytorch_path(tiny, tmp_path, mode):
    """RIA 2:4 with a channel permutation: the ONNX path gives the PyTorch path's model
    (ORT logits within 1e-4); fold, space and gather store 2:4 weights, mask-only does
    not."""
    share = mode == "gather_share"
    mode = "gather" if share else mode
    pipeline = (f"sparsify{{score=ria,pattern=2:4,permute={mode}"
                f"{',gather_share=true' if share else ''}}},export-onnx")
    onnx_out, torch_out = tmp_path / "o", tmp_path / "t"
    assert _compile(tiny / "onnx" / "model.onnx", onnx_out, pipeline, *_calib(tiny)) == 0
    assert _compile(tiny / "hf", torch_out, pipeline, *_calib(tiny)) == 0
    path = onnx_out / "model.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    ids = torch.randint(0, zoo.VOCAB, (2, 13), generator=torch.Generator().manual_seed(5))
    got, want = _ort_logits(path, ids), _ort_logits(torch_out / "model.onnx", ids)
    dense = _ort_logits(tiny / "onnx" / "model.onnx", ids)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-4
    assert np.linalg.norm(got - dense) / np.linalg.norm(dense) > 1e-2  # it did prune
    rc = main(["check-sparsity", str(path), "--pattern", "2:4"])
    assert rc == (1 if mode == "mask-only" else 0)
    rep = _report(onnx_out)[0]["report"]
    torch_rep = _report(torch_out)[0]["report"]
    assert rep["permutation"]["mode"] == mode
    assert rep["permutation"]["layers_permuted"] == torch_rep["permutation"]["layers_permuted"]
    gathers = [n for n in onnx.load(str(path)).graph.node if n.op_type == "GatherElements"]
    if mode == "fold":  # o_proj (v head_dim) and down_proj (MLP channels) in every layer
        assert rep["permutation"]["layers_permuted"] == 2 * zoo.LAYERS
        assert all("hidden space" in why for why in rep["permutation"]["layers_unpermuted"])
    else:  # space: the hidden readers through the residual permutation, the others fold
        if mode == "space":
            space, want_space = rep["permutation"]["space"], torch_rep["permutation"]["space"]
            assert space["realised"] == "space" and space["readers"] == 5 * zoo.LAYERS
            assert space["perm"] == want_space["perm"]
            assert space["perm"] != sorted(space["perm"])
        assert rep["permutation"]["layers_permuted"] == N_TARGETS
    # gather: q, k, v, o, gate, up each a gather (shared: q/k/v one, gate/up one, o one);
    # down_proj folds
    assert len(gathers) == ((3 if share else 6) * zoo.LAYERS if mode == "gather" else 0)
    if mode == "gather":
        realised = [r["permutation"]["realised"] for r in rep["layers"]]
        assert realised.count("fold") == zoo.LAYERS and realised.count("gather") == 6 * zoo.LAYERS
    assert rep["sparsity"] == pytest.approx(0.5)


@pytest.mark.parametrize("options,needle", [
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
