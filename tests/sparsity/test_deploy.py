"""Deployable N:M permutations: stored weights N:M in stored order, outputs = masked model."""

from __future__ import annotations

import json

import pytest
import torch

from slimgraph.cli import main
from slimgraph.frontends.loading import load_model
from slimgraph.sparsity.masks import is_nm
from tests import zoo

LIN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("perm")
    zoo.build("llama").save_pretrained(d / "m")
    zoo.tiny_tokenizer().save_pretrained(d / "m")
    (d / "calib.txt").write_text(zoo.tiny_text(3000, seed=1))
    return d


def _run(tiny, out, mode, extra=""):
    rc = main(["compile", str(tiny / "m"), "-p",
               f"sparsify{{score=ria,pattern=2:4,permute={mode}{extra}}},save-hf",
               "-o", str(out), "--calib-file", str(tiny / "calib.txt"), "--calib-samples", "8",
               "--calib-seqlen", "32"])
    assert rc == 0
    return load_model(str(out / "hf")).model, json.loads((out / "report.json").read_text())


def _weights(model):
    for i, layer in enumerate(model.model.layers):
        for n in LIN:
            mod = getattr(layer.self_attn, n, None) or getattr(layer.mlp, n)
            yield f"{i}.{n}", mod


@pytest.mark.parametrize("mode,share", [("fold", False), ("space", False), ("gather", False),
                                        ("gather", True)])
def test_deployable_permutation_is_exact_and_nm_in_stored_order(tiny, tmp_path, mode, share):
    from slimgraph.frontends.torch_export import trace
    from slimgraph.ir.dependency import analyze
    from slimgraph.sparsity.deploy import fold_choice, permute_group

    model, report = _run(tiny, tmp_path / mode, mode, ",gather_share=true" if share else "")
    for name, mod in _weights(model):
        assert is_nm(mod.weight.detach(), 2, 4, axis=1), name
    rep = report["passes"][0]["report"]
    perm = rep["permutation"]
    assert perm["mode"] == mode and perm["layers_permuted"] > 0
    if mode == "fold":
        # down_proj (MLP channels) and o_proj (v head_dim) fold; q/k/v/gate/up read the
        # residual stream and stay unpermuted, with the reason
        assert perm["layers_permuted"] == 2 * zoo.LAYERS
        assert all("shared by every layer" in why for why in perm["layers_unpermuted"])
    elif mode == "space":  # the residual stream is permuted once, for all its readers
        assert perm["layers_permuted"] == 7 * zoo.LAYERS and not perm["layers_unpermuted"]
        assert perm["space"]["kept_after"] >= perm["space"]["kept_before"]
    else:  # every linear gathers but down_proj, which folds (the same freedom, no gather)
        assert perm["layers_permuted"] == 7 * zoo.LAYERS
        realised = {r["name"].split(".")[-1]: r["permutation"] for r in rep["layers"]
                    if r["name"].startswith("model.layers.0.")}
        assert realised["down_proj"]["realised"] == "fold"
        assert all(realised[n]["realised"] == "gather" for n in LIN if n != "down_proj")
        assert "shared_with" not in realised["o_proj"]
        for layer in model.model.layers:
            a, mlp = layer.self_attn, layer.mlp
            assert not hasattr(mlp.down_proj, "input_perm")
            # gather_share: q/k/v one permutation (one gather), gate/up another
            same = [torch.equal(a.q_proj.input_perm, a.k_proj.input_perm),
                    torch.equal(a.q_proj.input_perm, a.v_proj.input_perm),
                    torch.equal(mlp.gate_proj.input_perm, mlp.up_proj.input_perm)]
            assert all(same) if share else not any(same)
        if share:
            assert sorted(realised["q_proj"]["shared_with"]) == [
                "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"]
            assert realised["gate_proj"]["shared_with"] == ["model.layers.0.mlp.up_proj"]
        else:
            assert not any("shared_with" in p for p in realised.values())
    ids = torch.randint(0, zoo.VOCAB, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = model(input_ids=ids, use_cache=False).logits
    # undo every realised permutation: back in the original channel order (folds:
    # fold, space, and gather's down_proj; then the gathers, below)
    r = analyze(trace(model, *zoo.example("llama")))
    if mode == "space":
        (hidden,) = r.by_kind("hidden")
        permute_group(r, hidden, torch.argsort(torch.tensor(perm["space"]["perm"])))
    for layer in rep["layers"]:
        p = layer.get("permutation", {})
        if p.get("realised") == "fold":
            # group ids of this re-analysis may differ (gathers): find it again
            group = fold_choice(r, layer["name"] + ".weight", 4).group
            assert group.kind == p["group_kind"]
            permute_group(r, group, torch.argsort(torch.tensor(p["perm"])))
    dense = zoo.build("llama")
    for (name, d), (_, q) in zip(_weights(dense), _weights(model)):
        w = q.weight.detach()
        if hasattr(q, "input_perm"):
            w = w[:, torch.argsort(q.input_perm)]
            with torch.no_grad():
                q.weight.copy_(w)
            q.input_perm.copy_(torch.arange(w.shape[1]))
        keep = w != 0
        # (1) the un-permuted weights are the original weights under a mask
        assert torch.equal(w, d.weight.detach() * keep), name
    with torch.no_grad():
        back = model(input_ids=ids, use_cache=False).logits
    # (2) the permuted model computes exactly what the original model with that mask does
    assert float((got - back).norm() / back.norm()) <= 1e-5


def test_mask_only_is_not_nm_as_stored_but_keeps_more(tiny, tmp_path):
    model, report = _run(tiny, tmp_path / "mo", "mask-only", ",search=exact")
    broken = [name for name, mod in _weights(model) if not is_nm(mod.weight.detach(), 2, 4, axis=1)]
    assert broken  # the reference behaviour: masks chosen in permuted order, stored unpermuted
    layers = report["passes"][0]["report"]["layers"]
    assert all(r["permutation"]["kept_after"] >= r["permutation"]["kept_before"] - 1e-9
               for r in layers)
    assert any(r["permutation"]["kept_after"] > r["permutation"]["kept_before"] for r in layers)


def test_permute_needs_a_pattern(tiny, tmp_path, capsys):
    rc = main(["compile", str(tiny / "m"), "-p", "sparsify{score=ria,sparsity=0.5,permute=fold}",
               "-o", str(tmp_path / "x")])
    assert rc == 2 and "option 'permute': channel permutation needs an N:M pattern" in \
        capsys.readouterr().err


@pytest.mark.parametrize("share", [False, True])
def test_gather_exports_to_onnx_and_checks_2_4(tiny, tmp_path, share):
    out = tmp_path / "g"
    rc = main(["compile", str(tiny / "m"), "-p",
               f"sparsify{{score=ria,pattern=2:4,permute=gather,gather_share={str(share).lower()}}},"
               "export-onnx,check-sparsity{pattern=2:4}",
               "-o", str(out), "--calib-file", str(tiny / "calib.txt"), "--calib-samples", "4",
               "--calib-seqlen", "32"])
    assert rc == 0
    assert main(["check-sparsity", str(out / "model.onnx"), "--pattern", "2:4"]) == 0
    import onnx

    from slimgraph.sparsity.onnx_gathers import last_axis_gathers

    # a gather per layer for q, k, v, o, gate, up (down_proj folds); shared: one for
    # q/k/v, one for gate/up, one for o. GatherElements form, no last-axis Gather left
    gathers = (3 if share else 6) * zoo.LAYERS
    nodes = onnx.load(str(out / "model.onnx")).graph.node
    assert sum(n.op_type == "GatherElements" for n in nodes) == gathers
    import onnx_ir as ir

    assert not last_axis_gathers(ir.load(str(out / "model.onnx")).graph)
    report = json.loads((out / "report.json").read_text())
    counts = report["passes"][1]["report"]["gathers"]  # the exporter may merge some itself
    assert counts["shared"] == gathers <= counts["gathers"] <= 6 * zoo.LAYERS


@pytest.mark.parametrize("mode,ok", [("fold", True), ("mask-only", False)])
def test_export_trt_verifies_stored_2_4(tiny, tmp_path, capsys, mode, ok):
    out = tmp_path / mode
    rc = main(["compile", str(tiny / "m"), "-p",
               f"sparsify{{score=ria,pattern=2:4,permute={mode}}},export-trt",
               "-o", str(out), "--calib-file", str(tiny / "calib.txt"), "--calib-samples", "4",
               "--calib-seqlen", "32"])
    if ok:
        assert rc == 0
        rep = json.loads((out / "report.json").read_text())["passes"][1]["report"]
        assert rep["check"]["ok"]
        assert all(lyr["status"] == "holds" for lyr in rep["layers"])
        # tiny layers (64 x 96) are below TensorRT's sparse-kernel sizes: reasons are given
        assert all(not lyr["trt_sparse"] and lyr["why_not"] for lyr in rep["layers"])
    else:
        assert rc == 2
        assert "not 2:4 along TensorRT's reduction axis" in capsys.readouterr().err


def test_export_trt_fp16(tiny, tmp_path):
    import onnx

    out = tmp_path / "h"
    rc = main(["compile", str(tiny / "m"), "-p",
               "sparsify{score=magnitude,pattern=2:4,permute=gather},export-trt{fp16=true}",
               "-o", str(out)])
    assert rc == 0
    model = onnx.load(str(out / "model.trt.onnx"))
    big = [i for i in model.graph.initializer if len(i.dims) == 2 and min(i.dims) >= 16]
    assert big and all(i.data_type == onnx.TensorProto.FLOAT16 for i in big)
    assert main(["check-sparsity", str(out / "model.trt.onnx"), "--pattern", "2:4"]) == 0
