"""prune-structured with reconstruction: block-sequential choice and refit of the readers of
removed channels; the slim model equals the masked model with the same refitted weights."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from slimgraph.frontends.torch_export import trace
from slimgraph.ir.dependency import analyze
from slimgraph.structured.recovery import BlockRemover, walk_blocks
from slimgraph.structured.torch_blocks import TorchBlocks
from slimgraph.structured.removal import remove_units
from slimgraph.structured.unit_slicing import mask_units
from slimgraph.structured.selection import plan_counts
from tests import zoo


def _walk(model, ratios, importance="act", reconstruct=True, hidden=None):
    args, kwargs = zoo.example("llama")
    r = analyze(trace(model, args, kwargs))
    counts, _ = plan_counts(r.groups, ratios, 1, set())
    sel = {}
    if hidden is not None:
        (g,) = [g for g in r.groups if g.kind == "hidden"]
        sel[g.id] = hidden
        mask_units(r, sel)
    windows = torch.randint(0, zoo.VOCAB, (6, 12), generator=torch.Generator().manual_seed(3))
    observer = TorchBlocks(model, r, windows, batch=3)
    remover = BlockRemover(r, {k: v for k, v in counts.items()
                               if next(g for g in r.groups if g.id == k).kind != "hidden"},
                           importance, reconstruct=reconstruct, observer=observer)
    walk_blocks(observer, remover.visit)
    sel.update(remover.selection)
    return r, sel, remover, windows


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("name,importance", [("llama", "act"), ("llama", "obs"), ("qwen2", "obs"),
                                             ("phi3", "act"), ("gpt2", "obs"), ("opt", "act")])
def test_slim_equals_masked_with_the_refitted_weights(name, importance):
    model = zoo.build(name)
    ratios = {"heads": 0.5, "mlp": 0.5}
    r, sel, remover, windows = _walk(model, ratios, importance)
    assert remover.refitted, "nothing was refitted"
    masked = copy.deepcopy(model)  # masked, refitted, full size
    remove_units(model, r, sel)
    a, b = _logits(masked, windows), _logits(model, windows)
    assert float((a - b).norm() / a.norm()) <= 1e-5
    # exactly the readers of removed channels were refitted, one per layer and kind
    names = sorted(x["linear"] for x in remover.refitted)
    assert len(names) == 2 * zoo.LAYERS
    assert all(x["rel_error_refit"] < x["rel_error_no_update"] for x in remover.refitted)


def test_llama_with_qheads_kv_groups_mlp_and_hidden_all_at_once():
    model = zoo.build("llama", seed=1)
    r, sel, remover, windows = _walk(model, {"heads": 0.5, "qheads": 0.5, "mlp": 0.25},
                                     "obs", hidden=[0, 5, 9, 33])
    masked = copy.deepcopy(model)
    remove_units(model, r, sel)
    a, b = _logits(masked, windows), _logits(model, windows)
    assert float((a - b).norm() / a.norm()) <= 1e-5
    assert sorted({x["linear"].rsplit(".", 1)[1] for x in remover.refitted}) == \
        ["down_proj", "o_proj"]
    assert model.config.hidden_size == zoo.HIDDEN - 4


def test_reconstruction_brings_the_block_outputs_closer_to_the_dense_model():
    dense = zoo.build("llama")
    ids = torch.randint(0, zoo.VOCAB, (6, 12), generator=torch.Generator().manual_seed(3))
    ref = _logits(dense, ids)
    errs = {}
    for rec in (False, True):
        model = copy.deepcopy(dense)
        _walk(model, {"mlp": 0.5}, "act", reconstruct=rec)
        errs[rec] = float((_logits(model, ids) - ref).norm())
    assert errs[True] < errs[False]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("m")
    zoo.build("llama").save_pretrained(d / "model")
    zoo.tiny_tokenizer().save_pretrained(d / "model")
    (d / "calib.txt").write_text(zoo.tiny_text(400))
    return d


def _compile(d, out, pipeline, calib=True):
    from slimgraph.cli import main

    extra = ["--calib-file", str(d / "calib.txt")] if calib else []
    return main(["compile", str(d / "model"), "-p", pipeline, "-o", str(out)] + extra)


def test_cli_reconstructs_by_default_with_calibration_and_says_what(tiny_dir, tmp_path):
    assert _compile(tiny_dir, tmp_path / "a", "prune-structured{heads=0.5,mlp=0.5,"
                    "importance=obs,allocation=global,samples=4,seqlen=16},save-hf") == 0
    rep = next(p for p in json.loads((tmp_path / "a" / "report.json").read_text())["passes"]
               if p["name"] == "prune-structured")["report"]
    rec = rep["reconstruct"]
    assert rec["enabled"] is True and rec["calibration"]["samples"] == 4
    assert sorted(rec["refitted"]) == sorted(
        [f"model.layers.{i}.{m}" for i in range(zoo.LAYERS)
         for m in ("self_attn.o_proj", "mlp.down_proj")])
    # l2 without --calib-file: the shipped WikiText-2 calibration text is the default
    # data, so the refit is on; reconstruct=false turns it off, and the report says so
    from slimgraph.data import packaged_text

    assert _compile(tiny_dir, tmp_path / "b", "prune-structured{mlp=0.5,samples=2,seqlen=16},"
                    "save-hf", calib=False) == 0
    rep = next(p for p in json.loads((tmp_path / "b" / "report.json").read_text())["passes"]
               if p["name"] == "prune-structured")["report"]
    assert rep["reconstruct"]["enabled"] is True
    assert rep["reconstruct"]["calibration"]["source"] == str(packaged_text("wikitext2-calib"))
    assert _compile(tiny_dir, tmp_path / "c", "prune-structured{mlp=0.5,reconstruct=false},"
                    "save-hf", calib=False) == 0
    rep = next(p for p in json.loads((tmp_path / "c" / "report.json").read_text())["passes"]
               if p["name"] == "prune-structured")["report"]
    assert rep["reconstruct"] == {"enabled": False}


@pytest.mark.parametrize("pipeline,needle", [
    ("prune-structured{mlp=0.5,importance=l3}", "option 'importance'"),
    ("prune-structured{mlp=0.5,layer_floor=0.1}", "option 'layer_floor': applies to allocation"),
    ("prune-structured{mlp=0.5,allocation=global,round_to=8}", "option 'round_to'"),
    ("prune-structured{mlp=0.5,allocation=best}", "option 'allocation'"),
    ("prune-structured{mlp=0.5,allocation=global,layer_floor=0.6,layer_ceiling=0.9}",
     "option 'layer_floor': 0.6 is above the mlp ratio 0.5"),
    ("prune-structured{mlp=0.5,allocation=global,layer_ceiling=0.4}",
     "option 'layer_ceiling': 0.4 is below the mlp ratio 0.5"),
])
def test_bad_options_are_refused_naming_the_option(tiny_dir, tmp_path, capsys, pipeline, needle):
    assert _compile(tiny_dir, tmp_path / "x", pipeline) == 2
    assert needle in capsys.readouterr().err


def _walk_to(model, ratios, target):
    args, kwargs = zoo.example("llama")
    r = analyze(trace(model, args, kwargs))
    counts, _ = plan_counts(r.groups, ratios, 1, set())
    windows = torch.randint(0, zoo.VOCAB, (6, 12), generator=torch.Generator().manual_seed(3))
    observer = TorchBlocks(model, r, windows, batch=3)
    remover = BlockRemover(r, counts, "act", reconstruct=True, target=target, observer=observer)
    walk_blocks(observer, remover.visit)
    return r, remover.selection, remover, windows


def test_refit_to_dense_keeps_slim_equal_to_masked_and_fits_the_dense_outputs_better():
    dense = zoo.build("llama")
    ids = torch.randint(0, zoo.VOCAB, (6, 12), generator=torch.Generator().manual_seed(3))
    ref = _logits(dense, ids)
    errs, removers = {}, {}
    for target in ("pruned", "dense"):
        model = copy.deepcopy(dense)
        r, sel, remover, windows = _walk_to(model, {"heads": 0.5, "mlp": 0.5}, target)
        removers[target] = remover
        masked = copy.deepcopy(model)
        remove_units(model, r, sel)
        a, b = _logits(masked, windows), _logits(model, windows)
        assert float((a - b).norm() / a.norm()) <= 1e-5
        errs[target] = float((_logits(model, ids) - ref).norm())
    # the same units are chosen (selection sees the pruned model's inputs either way) ...
    assert removers["dense"].selection == removers["pruned"].selection
    # ... and on the calibration windows the dense-target refit ends closer to the dense model
    assert errs["dense"] < errs["pruned"]
    # layer 0 sees the same inputs in both models: the two refits agree there
    first = {t: next(x for x in removers[t].refitted if x["linear"].startswith("model.layers.0."))
             for t in removers}
    a, b = first["dense"]["rel_error_refit"], first["pruned"]["rel_error_refit"]
    assert abs(a - b) <= 1e-4 * b


def test_refit_columns_to_with_equal_streams_is_the_plain_refit():
    from slimgraph.structured.refit import refit_columns, refit_columns_to

    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 12, generator=g, dtype=torch.float64)
    W = torch.randn(5, 12, generator=g, dtype=torch.float64)
    H = X.T @ X
    for damp in (0.0, 0.01, 0.5):  # the damping pulls both towards the current weights
        a, ia = refit_columns(W, H, [1, 4, 7], damp=damp)
        b, ib = refit_columns_to(W, H, W @ H, float(((W @ H) * W).sum()), [1, 4, 7], damp=damp)
        assert torch.allclose(a, b, atol=1e-9) and (b[:, [1, 4, 7]] == 0).all()
        assert abs(ia["error_refit"] - ib["error_refit"]) < 1e-6 * ia["energy"]
    # with different dense inputs: the least-squares solution of ||W' x_p - W x_d||
    Xd = X + 0.1 * torch.randn(200, 12, generator=g, dtype=torch.float64)
    c, info = refit_columns_to(W, H, W @ Xd.T @ X, float(((Xd @ W.T) ** 2).sum()), [1, 4, 7],
                               damp=0.0)
    S = [i for i in range(12) if i not in (1, 4, 7)]
    want = torch.linalg.lstsq(X[:, S], Xd @ W.T).solution.T
    assert torch.allclose(c[:, S], want, atol=1e-8)
    assert abs(info["error_refit"] - float(((X @ c.T - Xd @ W.T) ** 2).sum())) < 1e-6 * info["energy"]


def test_params_target_solves_the_mlp_ratio(tiny_dir, tmp_path):
    from slimgraph.frontends.loading import load_model

    total = sum(p.numel() for p in load_model(str(tiny_dir / "model")).model.parameters())
    target = total - total // 10
    assert _compile(tiny_dir, tmp_path / "p", f"prune-structured{{params={target},samples=2,"
                    "seqlen=16},save-hf") == 0
    report = json.loads((tmp_path / "p" / "report.json").read_text())
    rep = next(p for p in report["passes"] if p["name"] == "prune-structured")["report"]
    after = report["parameters"]["after"]
    assert after <= target
    # the smallest ratio: one MLP channel fewer per layer would be over the target
    per_channel = 3 * zoo.HIDDEN * zoo.LAYERS
    assert after + per_channel > target
    assert rep["params_target"]["target"] == target and 0 < rep["params_target"]["mlp_ratio"] < 1


@pytest.mark.parametrize("pipeline,needle", [
    ("prune-structured{params=10}", "option 'params': removing all but one unit"),
    ("prune-structured{params=1e12}", "option 'params': the model has"),
    ("prune-structured{params=1e5,mlp=0.5}", "option 'params': params sets the MLP ratio"),
    ("prune-structured{params=1e5,hidden=0.1}", "cannot be given with hidden="),
    ("prune-structured{params=0}", "option 'params': must be a parameter count"),
])
def test_bad_params_targets_are_refused(tiny_dir, tmp_path, capsys, pipeline, needle):
    assert _compile(tiny_dir, tmp_path / "x", pipeline) == 2
    assert needle in capsys.readouterr().err


def test_refit_to_residual_brings_each_block_back_to_the_dense_output():
    dense = zoo.build("llama")
    ids = torch.randint(0, zoo.VOCAB, (6, 12), generator=torch.Generator().manual_seed(3))
    ref = _logits(dense, ids)
    errs = {}
    for target in ("dense", "residual"):
        model = copy.deepcopy(dense)
        r, sel, remover, windows = _walk_to(model, {"heads": 0.5, "mlp": 0.5}, target)
        kinds = {x["linear"].rsplit(".", 1)[1]: x["target"] for x in remover.refitted}
        masked = copy.deepcopy(model)
        remove_units(model, r, sel)
        a, b = _logits(masked, windows), _logits(model, windows)
        assert float((a - b).norm() / a.norm()) <= 1e-5
        errs[target] = float((_logits(model, ids) - ref).norm())
    # LLaMA's down_proj writes straight into the block output: its target is the residual
    assert kinds == {"o_proj": "dense", "down_proj": "residual"}
    assert errs["residual"] < errs["dense"]


def test_calibration_windows_follow_the_compile_options_unless_the_pass_sets_them(tiny_dir, tmp_path):
    from slimgraph.cli import main

    def calibration(out):
        rep = next(p for p in json.loads((out / "report.json").read_text())["passes"]
                   if p["name"] == "prune-structured")["report"]
        return rep["reconstruct"]["calibration"]

    args = ["--calib-file", str(tiny_dir / "calib.txt"), "--calib-samples", "3", "--calib-seqlen", "24"]
    assert main(["compile", str(tiny_dir / "model"), "-p", "prune-structured{mlp=0.5},save-hf",
                 "-o", str(tmp_path / "a")] + args) == 0
    assert (calibration(tmp_path / "a")["samples"], calibration(tmp_path / "a")["seqlen"]) == (3, 24)
    assert main(["compile", str(tiny_dir / "model"), "-p",
                 "prune-structured{mlp=0.5,samples=2,seqlen=16},save-hf", "-o", str(tmp_path / "b")]
                + args) == 0
    assert (calibration(tmp_path / "b")["samples"], calibration(tmp_path / "b")["seqlen"]) == (2, 16)
