"""N:M sparsity checks (slimgraph.sparsity.check): a tiny LLaMA made exactly 2:4 by hand,
checked in PyTorch, as a state dict, as a dynamo ONNX export (weights stored transposed as
MatMul B [K, N]); hand-built ONNX graphs (Gemm transB, Transpose incl. a 3-D perm, Cast,
Conv, Reshape-hidden weights, K not a multiple of M); the CLI's exit codes and JSON; the
check-sparsity pass."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import shutil
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from slimgraph.cli import main
from slimgraph.errors import OnnxImportError, PipelineError, SlimgraphError
from slimgraph.sparsity.check import (
    SparsityCheckError,
    check_model,
    check_onnx,
    check_torch,
    in_decoder_block,
    parse_pattern,
)

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
BLOCK_NAMES = {f"model.layers.{i}.{lin}.weight" for i in range(2) for lin in LINEARS}
BROKEN = "model.layers.1.mlp.down_proj.weight"


def make_24(w: torch.Tensor) -> None:
    """Zero the 2 smallest |w| of every 4 consecutive entries along dim 1, in place."""
    c_out, c_in = w.shape
    groups = w.detach().view(c_out, c_in // 4, 4)
    drop = groups.abs().argsort(dim=2)[..., :2]
    groups.scatter_(2, drop, 0.0)


def break_one(model) -> None:
    """One group of BROKEN gets a third nonzero."""
    w = model.get_parameter(BROKEN)
    with torch.no_grad():
        row = w[3, 8:12]
        zero = int((row == 0).nonzero()[0])
        row[zero] = 0.5


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name in BLOCK_NAMES:
                make_24(p)
    return m


class _Logits(torch.nn.Module):
    def __init__(self, model) -> None:
        super().__init__()
        self.m = model

    def forward(self, input_ids):
        return self.m(input_ids=input_ids, use_cache=False).logits


@pytest.fixture(scope="module")
def onnx_path(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    quiet = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript")]
    for lg in quiet:
        lg.setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(_Logits(model), (ids,), str(path), dynamo=True)
    return path


def copy_onnx(src, dst):
    """Copy an ONNX file to ``dst`` with its external data file (kept under its own name)."""
    shutil.copy(src, dst)
    data = src.with_name(src.name + ".data")
    if data.is_file():
        shutil.copy(data, dst.parent / data.name)
    return dst


@pytest.fixture(scope="module")
def hf_dir(model, tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    model.save_pretrained(d)
    return d


# --------------------------------------------------------------------------- patterns, names


@pytest.mark.parametrize("text, expected", [("2:4", (2, 4)), (" 4 : 8 ", (4, 8)), ((1, 4), (1, 4)),
                                            ("none", None), (None, None)])
def test_parse_pattern(text, expected):
    assert parse_pattern(text) == expected


@pytest.mark.parametrize("bad", ["4:2", "0:4", "4:4", "a:b", "2-4", "2:4:8", "-2:4"])
def test_parse_pattern_rejects(bad):
    with pytest.raises(SparsityCheckError):
        parse_pattern(bad)


def test_in_decoder_block():
    assert in_decoder_block("model.layers.3.mlp.up_proj.weight")
    assert in_decoder_block("transformer.h.0.attn.c_attn.weight")
    assert not in_decoder_block("lm_head.weight")
    assert not in_decoder_block("model.embed_tokens.weight")
    assert not in_decoder_block("model.layers.0.embed_scale.weight")


# --------------------------------------------------------------------------- PyTorch


def test_torch_24_holds(model):
    r = check_torch(model, "2:4")
    assert r.ok and r.source == "torch"
    assert {lyr.name for lyr in r.layers} == BLOCK_NAMES  # no embeddings, no lm_head
    for lyr in r.layers:
        assert lyr.axis == 1 and lyr.op == "Linear" and lyr.status == "holds"
        assert lyr.groups_violating == 0
        assert lyr.groups_total == lyr.shape[0] * lyr.shape[1] // 4
        assert lyr.zero_fraction == pytest.approx(0.5)
        assert lyr.reduction_size == lyr.shape[1] and lyr.output_size == lyr.shape[0]
        # 2:4 but far too small for TensorRT's sparse kernels
        assert not lyr.trt_sparse and ">= 256" in lyr.trt_reason
    assert r.summary()["holds"] == 14
    assert check_torch(model, "4:8").ok  # 2 of every 4 is also at most 4 of every 8
    bad = check_torch(model, "1:4")
    assert not bad.ok and bad.count("violates") == 14


def test_torch_broken_layer_named(model):
    broken = copy.deepcopy(model)
    break_one(broken)
    r = check_torch(broken, "2:4")
    assert not r.ok
    [fail] = r.failures()
    assert fail.name == BROKEN and fail.groups_violating == 1 and fail.status == "violates"
    assert "holds on 13 of 14 layers" in r.headline()


def test_torch_targets_and_state_dict(model):
    every = check_torch(model, "2:4", targets="all-linear")
    names = {lyr.name for lyr in every.layers}
    assert names == BLOCK_NAMES | {"lm_head.weight"}
    assert not every.ok  # lm_head is dense
    sd = check_torch(model.state_dict(), "2:4")
    assert sd.ok and {lyr.name for lyr in sd.layers} == BLOCK_NAMES
    only = check_torch(model, "2:4", targets=lambda n: "mlp" in n)
    assert len(only.layers) == 6 and only.ok
    zeros = check_torch(model)  # no pattern: zero fractions only
    assert zeros.ok and {lyr.status for lyr in zeros.layers} == {"unchecked"}
    with pytest.raises(SparsityCheckError):
        check_torch(model, "2:4", targets="blocs")
    with pytest.raises(SparsityCheckError):
        check_torch(model, "4:2")
    empty = check_torch(torch.nn.Sequential(torch.nn.ReLU()), "2:4")
    assert not empty.ok and not empty.layers


def test_torch_conv1d_axis():
    from transformers.pytorch_utils import Conv1D

    net = torch.nn.ModuleDict({"h": torch.nn.ModuleList([torch.nn.ModuleDict({"c": Conv1D(8, 16)})])})
    w = net["h"][0]["c"].weight  # [C_in = 16, C_out = 8]: reduction along axis 0
    with torch.no_grad():
        w.normal_()
        make_24(w.T)
    [lyr] = check_torch(net, "2:4").layers
    assert lyr.op == "Conv1D" and lyr.axis == 0 and lyr.status == "holds"
    assert lyr.reduction_size == 16 and lyr.output_size == 8


def test_torch_skipped_when_k_not_multiple_of_m():
    net = torch.nn.ModuleList([torch.nn.ModuleDict({"fc": torch.nn.Linear(6, 8)})])
    r = check_torch(net, "2:4")
    [lyr] = r.layers
    assert lyr.status == "skipped" and "not a multiple of M = 4" in lyr.reason
    assert not r.ok  # nothing could be checked


def test_torch_meta_weights_refused():
    with torch.device("meta"):
        net = torch.nn.ModuleList([torch.nn.Linear(8, 8)])
    with pytest.raises(SparsityCheckError, match="meta"):
        check_torch(net, "2:4")


# --------------------------------------------------------------------------- ONNX: dynamo export


def test_onnx_export_holds_along_axis_0(model, onnx_path):
    r = check_onnx(onnx_path, "2:4")
    assert r.ok, r.headline()
    assert {lyr.name for lyr in r.layers} == BLOCK_NAMES  # names recovered, wrapper prefix gone
    stored = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(onnx_path)).graph.initializer}
    for lyr in r.layers:
        w = model.get_parameter(lyr.name).detach().numpy()
        assert lyr.op == "MatMul" and lyr.axis == 0 and lyr.status == "holds"
        assert lyr.shape == [w.shape[1], w.shape[0]]  # B [K, N] = W.T
        np.testing.assert_array_equal(stored[lyr.initializer], w.T)
        assert lyr.reduction_size == w.shape[1] and lyr.output_size == w.shape[0]
        assert lyr.zero_fraction == pytest.approx(0.5)
    every = check_onnx(onnx_path, "2:4", targets="all-linear")
    assert "lm_head.weight" in {lyr.name for lyr in every.layers} and not every.ok
    assert not check_onnx(onnx_path, "1:4").ok
    [via_spec] = check_model(str(onnx_path), "2:4")
    assert via_spec.source == "onnx" and via_spec.ok


def test_polygraphy_agrees_when_installed(onnx_path, tmp_path):
    """``polygraphy inspect sparsity``'s checker (a test dependency) finds
    the same 2:4 initializers. Not compared: a batched B behind a 3-D Transpose (polygraphy
    assumes 2-D B and maps the axis with the inverse perm) and weights it skips silently."""
    sparse = pytest.importorskip("polygraphy.tools.sparse")

    def theirs(path):
        pruner = sparse.SparsityPruner(onnx.load(str(path)))
        pruner.check()
        return set(pruner.sparse_tensors)

    every = check_onnx(onnx_path, "2:4", targets="all-linear")
    assert theirs(onnx_path) == {lyr.initializer for lyr in every.layers if lyr.status == "holds"}
    hand = _hand_built(tmp_path / "h.onnx", with_reshape=True)
    ours = {lyr.initializer for lyr in check_onnx(hand, "2:4").layers if lyr.status == "holds"}
    assert theirs(hand) - {"b_w"} == ours - {"b_w"}


def test_onnx_and_torch_reports_agree(model, onnx_path):
    t = {lyr.name: lyr for lyr in check_torch(model, "2:4").layers}
    o = {lyr.name: lyr for lyr in check_onnx(onnx_path, "2:4").layers}
    assert t.keys() == o.keys()
    for name in t:
        assert (t[name].groups_total, t[name].groups_violating, t[name].zero_fraction) == \
               (o[name].groups_total, o[name].groups_violating, o[name].zero_fraction)


# --------------------------------------------------------------------------- ONNX: hand-built


def _nm_along(shape, axis, rng, n=2, m=4) -> np.ndarray:
    """Random weight with exactly n nonzeros in every m consecutive entries along axis."""
    w = rng.standard_normal(shape).astype(np.float32)
    moved = np.moveaxis(w, axis, -1).copy()
    flat = moved.reshape(-1, m)
    for row in flat:
        row[rng.permutation(m)[: m - n]] = 0.0
    return np.moveaxis(flat.reshape(moved.shape), -1, axis)


def _hand_built(path, *, with_reshape: bool):
    rng = np.random.default_rng(0)
    inits, nodes, infos = [], [], []

    def init(name, arr, folded=None):
        inits.append(numpy_helper.from_array(arr, name))
        if folded:  # where the dynamo exporter records it: the value's metadata
            info = helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(arr.dtype),
                                                 arr.shape)
            info.metadata_props.add(key="pkg.onnxscript.optimizer.folded_from", value=repr([folded]))
            infos.append(info)

    # Gemm transB=1: B [N, K] = [256, 256], 2:4 along axis 1 -> TensorRT-eligible
    init("gemm_w", _nm_along((256, 256), 1, rng), folded="model.layers.0.mlp.up_proj.weight")
    nodes.append(helper.make_node("Gemm", ["x", "gemm_w"], ["g"], name="gemm", transB=1))
    # MatMul through Transpose: stored [N, K] = [64, 256], 2:4 only along stored axis 1
    init("t_w", _nm_along((64, 256), 1, rng))
    nodes.append(helper.make_node("Transpose", ["t_w"], ["t_wT"], perm=[1, 0]))
    nodes.append(helper.make_node("MatMul", ["x", "t_wT"], ["t"], name="mm_transposed"))
    # MatMul through Cast from fp16: [256, 64] along axis 0
    init("c_w", _nm_along((256, 64), 0, rng).astype(np.float16))
    nodes.append(helper.make_node("Cast", ["c_w"], ["c_w32"], to=TensorProto.FLOAT))
    nodes.append(helper.make_node("MatMul", ["x", "c_w32"], ["c"], name="mm_cast"))
    # batched MatMul through a 3-D Transpose (perm [2, 0, 1] is not its own inverse):
    # stored [K=8, N=4, batch=2] -> B [2, 8, 4]; reduction axis -2 of B = stored axis 0
    init("b_w", _nm_along((8, 4, 2), 0, rng))
    nodes.append(helper.make_node("Transpose", ["b_w"], ["b_wT"], perm=[2, 0, 1]))
    nodes.append(helper.make_node("MatMul", ["xb", "b_wT"], ["b"], name="mm_batched"))
    # Conv W[K, C, R, S] = [8, 16, 3, 3]: along C, per (k, r, s)
    init("conv_w", _nm_along((8, 16, 3, 3), 1, rng))
    nodes.append(helper.make_node("Conv", ["img", "conv_w"], ["conv"], name="conv", pads=[1, 1, 1, 1]))
    # Gemm with K = 6: not a multiple of 4 -> skipped
    init("odd_w", rng.standard_normal((6, 8)).astype(np.float32))
    nodes.append(helper.make_node("Gemm", ["x6", "odd_w"], ["o"], name="gemm_odd"))
    # attention-like MatMul of two activations: not a weight, never listed
    nodes.append(helper.make_node("Transpose", ["x"], ["xT"], perm=[1, 0]))
    nodes.append(helper.make_node("MatMul", ["x", "xT"], ["scores"], name="mm_act"))
    outputs = {"g": [1, 256], "t": [1, 64], "c": [1, 64], "b": [2, 1, 4], "conv": [1, 8, 5, 5],
               "o": [1, 8], "scores": [1, 1]}
    if with_reshape:  # a 2:4 weight hidden behind a Reshape
        init("r_w", _nm_along((256, 64), 0, rng).reshape(-1))
        init("r_shape", np.array([256, 64], dtype=np.int64))
        nodes.append(helper.make_node("Reshape", ["r_w", "r_shape"], ["r_w2"], name="reshape_w"))
        nodes.append(helper.make_node("MatMul", ["x", "r_w2"], ["r"], name="mm_reshaped"))
        outputs["r"] = [1, 64]
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes, "handbuilt",
        [helper.make_tensor_value_info("x", f, [1, 256]), helper.make_tensor_value_info("xb", f, [2, 1, 8]),
         helper.make_tensor_value_info("img", f, [1, 16, 5, 5]),
         helper.make_tensor_value_info("x6", f, [1, 6])],
        [helper.make_tensor_value_info(o, f, shape) for o, shape in outputs.items()], inits,
        value_info=infos)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return path


def test_onnx_hand_built(tmp_path):
    r = check_onnx(_hand_built(tmp_path / "h.onnx", with_reshape=True), "2:4")
    by = {lyr.initializer or lyr.name: lyr for lyr in r.layers}
    assert "no PyTorch provenance" in r.notes[0]
    assert set(by) == {"gemm_w", "t_w", "c_w", "b_w", "conv_w", "odd_w", "r_w"}
    gemm = by["gemm_w"]
    assert gemm.name == "model.layers.0.mlp.up_proj.weight"  # from folded_from metadata
    assert (gemm.op, gemm.axis, gemm.status, gemm.trt_sparse) == ("Gemm", 1, "holds", True)
    t = by["t_w"]
    assert (t.axis, t.status, t.through, t.shape) == (1, "holds", ["Transpose"], [64, 256])
    assert (t.reduction_size, t.output_size) == (256, 64)
    assert "N = 64" in t.trt_reason
    c = by["c_w"]
    assert (c.axis, c.status, c.through, c.dtype) == (0, "holds", ["Cast"], "FLOAT16")
    b = by["b_w"]
    assert (b.axis, b.status, b.reduction_size, b.output_size) == (0, "holds", 8, 4)
    conv = by["conv_w"]
    assert (conv.op, conv.axis, conv.status, conv.groups_total) == ("Conv", 1, "holds", 8 * 4 * 9)
    odd = by["odd_w"]
    assert odd.status == "skipped" and "reduction size 6" in odd.reason
    hidden = by["r_w"]
    assert hidden.status == "not-visible" and "Reshape" in hidden.reason
    assert hidden.nodes == ["mm_reshaped"] and hidden.zero_fraction == pytest.approx(0.5)
    assert not r.ok and [f.initializer for f in r.failures()] == ["r_w"]

    clean = check_onnx(_hand_built(tmp_path / "c.onnx", with_reshape=False), "2:4")
    assert clean.ok and clean.count("skipped") == 1


def test_onnx_hand_built_wrong_axis_detected(tmp_path):
    """A Gemm weight that is 2:4 along the wrong axis fails."""
    rng = np.random.default_rng(1)
    w = _nm_along((64, 64), 0, rng)
    assert (np.count_nonzero(w.reshape(64, 16, 4), axis=2) > 2).any()  # not 2:4 along axis 1
    g = helper.make_graph([helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(w, "w")])
    path = tmp_path / "w.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    [lyr] = check_onnx(path, "2:4").layers
    assert lyr.axis == 1 and lyr.status == "violates" and lyr.groups_violating > 0


def test_onnx_external_data(onnx_path, tmp_path):
    m = onnx.load(str(onnx_path))
    path = tmp_path / "ext.onnx"
    onnx.save(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.onnx.data", size_threshold=0)
    assert (tmp_path / "ext.onnx.data").is_file()
    r = check_onnx(path, "2:4")
    assert r.ok and len(r.layers) == 14


def test_onnx_errors(tmp_path):
    with pytest.raises(OnnxImportError, match="does not exist"):
        check_onnx(tmp_path / "nope.onnx", "2:4")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(OnnxImportError):
        check_onnx(bad, "2:4")


# --------------------------------------------------------------------------- CLI


def _run(capsys, *argv):
    code = main(["check-sparsity", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_hf_dir_json(hf_dir, capsys):
    code, out, _ = _run(capsys, hf_dir, "--pattern", "2:4", "--json")
    assert code == 0
    obj = json.loads(out)
    assert obj["ok"] is True and obj["pattern"] == "2:4" and obj["targets"] == "blocks"
    [rep] = obj["reports"]
    assert rep["source"] == "torch" and rep["summary"]["holds"] == 14
    lyr = rep["layers"][0]
    for key in ("name", "shape", "axis", "zero_fraction", "groups_violating", "groups_total",
                "status", "holds", "trt_sparse", "trt_reason"):
        assert key in lyr
    code, out, _ = _run(capsys, hf_dir, "--pattern", "2:4", "--all-linear", "--json")
    assert code == 1 and "lm_head.weight" in out


def test_cli_compile_outdir_and_onnx(hf_dir, onnx_path, tmp_path, capsys):
    out_dir = tmp_path / "out"
    shutil.copytree(hf_dir, out_dir / "hf")
    copy_onnx(onnx_path, out_dir / "model.onnx")
    code, out, _ = _run(capsys, out_dir, "--pattern", "2:4", "--json")
    assert code == 0
    assert [r["source"] for r in json.loads(out)["reports"]] == ["torch", "onnx"]
    code, out, _ = _run(capsys, onnx_path, "--pattern", "2:4")  # table
    assert code == 0 and "model.layers.0.mlp.down_proj.weight" in out and "OK" in out
    code, out, _ = _run(capsys, onnx_path, "--pattern", "1:4")
    assert code == 1 and "NOT OK" in out
    code, out, _ = _run(capsys, onnx_path)  # zero fractions only
    assert code == 0 and "50.0%" in out


def test_cli_broken_exit_1(model, tmp_path, capsys):
    broken = copy.deepcopy(model)
    break_one(broken)
    broken.save_pretrained(tmp_path / "broken")
    code, out, _ = _run(capsys, tmp_path / "broken", "--pattern", "2:4")
    assert code == 1
    assert f"FAIL: 2:4 does not hold on 1 layer(s): {BROKEN} (1 of" in out


@pytest.mark.parametrize("argv, needle", [
    (["--pattern", "4:2"], "0 < N < M"),
    (["--pattern", "0:4"], "0 < N < M"),
    (["--pattern", "2of4"], "invalid N:M pattern"),
])
def test_cli_bad_pattern_exit_2(hf_dir, capsys, argv, needle):
    code, out, err = _run(capsys, hf_dir, *argv)
    assert code == 2 and out == ""
    assert err.startswith("slimgraph: error: ") and needle in err and err.count("\n") == 1


def test_cli_bad_model_exit_2(tmp_path, capsys):
    code, _, err = _run(capsys, tmp_path / "missing.onnx", "--pattern", "2:4")
    assert code == 2 and err.startswith("slimgraph: error: ") and "does not exist" in err
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x00\x01garbage" * 10)
    code, _, err = _run(capsys, corrupt, "--pattern", "2:4")
    assert code == 2 and err.startswith("slimgraph: error: ") and err.count("\n") == 1
    (tmp_path / "empty").mkdir()
    code, _, err = _run(capsys, tmp_path / "empty", "--pattern", "2:4")
    assert code == 2 and "has no model" in err


# --------------------------------------------------------------------------- pass


def _state(model, tmp_path, files=()):
    from slimgraph.frontends.loading import wrap_module
    from slimgraph.passes.base import CompileState

    return CompileState(loaded=wrap_module(model, spec="tiny"), out_dir=tmp_path, files=list(files))


def test_pass_checks_model_and_exported_onnx(model, onnx_path, tmp_path):
    from slimgraph.passes import registry
    from slimgraph.passes.pipeline import PassManager, from_text_or_file

    assert "check-sparsity" in registry.names()
    exported = tmp_path / "model.onnx"
    copy_onnx(onnx_path, exported)
    passes = from_text_or_file("check-sparsity{pattern=2:4}")
    [rec] = PassManager(passes, verify=False).run(_state(model, tmp_path, [str(exported)]))
    assert rec.modified is False and rec.report["ok"] is True
    assert [r["source"] for r in rec.report["reports"]] == ["torch", "onnx"]
    assert all(r["summary"]["holds"] == 14 for r in rec.report["reports"])

    broken = copy.deepcopy(model)
    break_one(broken)
    with pytest.raises(SlimgraphError, match=BROKEN.replace(".", r"\.")):
        PassManager(from_text_or_file("check-sparsity"), verify=False).run(_state(broken, tmp_path))


def test_pass_options():
    from slimgraph.passes.pipeline import build, from_text_or_file

    with pytest.raises(PipelineError, match="option 'pattern'"):
        from_text_or_file("check-sparsity{pattern=4:2}")
    with pytest.raises(PipelineError, match="quote"):  # YAML reads 2:4 as 124
        build([("check-sparsity", {"pattern": 124})])
    [p] = from_text_or_file("check-sparsity{pattern=none,all_linear=true}")
    assert p.nm() is None and p.all_linear
