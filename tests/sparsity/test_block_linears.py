"""The linears of a decoder block (slimgraph/ir/blocks.py) do not depend on the channel
groups: one-KV-head models (whose k/v projections have no prunable heads group) get every
block linear pruned by `sparsify`, on the PyTorch and on the ONNX path; linears the pass
leaves are listed as skipped with the reason; a wrong N:M claim fails the compile."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import transformers as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slimgraph.cli import main
from slimgraph.frontends.loading import load_model
from slimgraph.frontends.torch_export import trace
from slimgraph.ir.blocks import (BlockError, block_linears, find_blocks, in_decoder_block,
                                 layer_number)
from slimgraph.ir.dependency import analyze
from slimgraph.passes.base import CompileState, PassResult
from slimgraph.passes.sparsify import Sparsify
from slimgraph.sparsity.block_prune import SparsityClaimError, prune_blocks
from slimgraph.structured.torch_blocks import TorchBlocks
from slimgraph.sparsity.masks import is_nm
from tests import zoo

LLAMA_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                 "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
FALCON_LINEARS = ("self_attention.query_key_value", "self_attention.dense",
                  "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


def one_kv(name: str, inter: int = zoo.INTER) -> torch.nn.Module:
    """Tiny random models with a single KV head."""
    torch.manual_seed(0)
    if name == "gemma3":
        m = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
            vocab_size=zoo.VOCAB, hidden_size=zoo.HIDDEN, intermediate_size=inter,
            num_hidden_layers=zoo.LAYERS, num_attention_heads=zoo.HEADS, num_key_value_heads=1,
            head_dim=zoo.HEAD_DIM))
    elif name == "llama":
        m = tf.LlamaForCausalLM(tf.LlamaConfig(
            vocab_size=zoo.VOCAB, hidden_size=zoo.HIDDEN, intermediate_size=inter,
            num_hidden_layers=zoo.LAYERS, num_attention_heads=zoo.HEADS, num_key_value_heads=1,
            head_dim=zoo.HEAD_DIM))
    elif name == "falcon":  # multi-query: one shared K/V head in a fused query_key_value
        m = tf.FalconForCausalLM(tf.FalconConfig(
            vocab_size=zoo.VOCAB, hidden_size=zoo.HIDDEN, num_hidden_layers=zoo.LAYERS,
            num_attention_heads=zoo.HEADS, multi_query=True, new_decoder_architecture=False,
            pad_token_id=0, bos_token_id=1, eos_token_id=2))
    else:
        raise KeyError(name)
    return m.eval()


def expected_linears(name: str) -> set[str]:
    if name == "falcon":
        return {f"transformer.h.{i}.{n}" for i in range(zoo.LAYERS) for n in FALCON_LINEARS}
    return {f"model.layers.{i}.{n}" for i in range(zoo.LAYERS) for n in LLAMA_LINEARS}


def _report(out, index=0):
    return json.loads((out / "report.json").read_text())["passes"][index]["report"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """hf/NAME (model + tokenizer), onnx/NAME/model.onnx (dense export + tokenizer),
    calib.txt."""
    from slimgraph.backends.onnx_export import export_onnx

    d = tmp_path_factory.mktemp("one_kv")
    for name in ("gemma3", "llama", "falcon"):
        model = one_kv(name)
        model.save_pretrained(d / "hf" / name)
        zoo.tiny_tokenizer().save_pretrained(d / "hf" / name)
        if name != "llama":  # the ONNX path: Gemma 3 (the reported case) and Falcon
            export_onnx(model, d / "onnx" / name / "model.onnx", vocab=zoo.VOCAB)
            zoo.tiny_tokenizer().save_pretrained(d / "onnx" / name)
    (d / "calib.txt").write_text(zoo.tiny_text(3000, seed=1))
    return d


def _calib(d):
    return ["--calib-file", str(d / "calib.txt"), "--calib-samples", "8",
            "--calib-seqlen", "32"]


def test_layer_numbers_and_block_names():
    assert layer_number("model.layers.3.mlp.up_proj.weight") == 3
    assert layer_number("transformer.h.0.attn.c_attn.weight") == 0
    assert layer_number("Attention_2_qkv_weight") == 2
    assert layer_number("val_123") is None  # an exporter's made-up name, not layer 123
    assert layer_number("onnx::MatMul_7") is None
    assert in_decoder_block("model.layers.1.self_attn.k_proj.weight")
    assert not in_decoder_block("lm_head.weight")
    assert not in_decoder_block("model.layers.0.embed_scale.weight")


@pytest.mark.parametrize("name", ["gemma3", "llama", "falcon"])
def test_blocks_hold_every_linear_without_a_kv_heads_group(name):
    model = one_kv(name)
    result = analyze(trace(model, *zoo.example(name)))
    blocks = find_blocks(result)
    assert [b.layer for b in blocks] == list(range(zoo.LAYERS))
    assert {n for b in blocks for n in b.linears} == expected_linears(name)
    prefix = "transformer.h" if name == "falcon" else "model.layers"
    assert [b.module_name for b in blocks] == [f"{prefix}.{i}" for i in range(zoo.LAYERS)]
    if name != "falcon":  # the bug's cause: k/v are in no prunable heads group
        grouped = {m.param for g in result.groups if g.prunable
                   and g.kind in ("heads", "qheads") for m in g.members}
        assert "model.layers.0.self_attn.k_proj.weight" not in grouped


@pytest.mark.parametrize("name,score", [("gemma3", "wanda"), ("llama", "ria"),
                                        ("falcon", "magnitude")])
def test_torch_path_prunes_all_block_linears(models, tmp_path, name, score):
    out = tmp_path / "out"
    rc = main(["compile", str(models / "hf" / name), "-p",
               f"sparsify{{score={score},pattern=2:4}},save-hf,check-sparsity", "-o", str(out),
               *_calib(models)])
    assert rc == 0
    rep = _report(out)
    assert {r["name"] for r in rep["layers"]} == expected_linears(name)
    assert not rep["skipped"] and rep["sparsity"] == pytest.approx(0.5)
    model = load_model(str(out / "hf")).model
    for lin in expected_linears(name):
        w = model.get_submodule(lin).weight.detach()
        assert is_nm(w, 2, 4, axis=1), lin
        assert float((w == 0).float().mean()) == pytest.approx(0.5), lin
    assert main(["check-sparsity", str(out), "--pattern", "2:4"]) == 0
    assert _report(out, 2)["ok"]


@pytest.mark.parametrize("name,score", [("gemma3", "wanda"), ("falcon", "magnitude")])
def test_onnx_path_prunes_all_block_linears(models, tmp_path, name, score):
    out = tmp_path / "out"
    rc = main(["compile", str(models / "onnx" / name / "model.onnx"), "-p",
               f"sparsify{{score={score},pattern=2:4}},export-onnx,check-sparsity",
               "-o", str(out), *_calib(models)])
    assert rc == 0
    rep = _report(out)
    assert {r["name"] for r in rep["layers"]} == expected_linears(name)
    assert not rep["skipped"] and rep["sparsity"] == pytest.approx(0.5)
    assert main(["check-sparsity", str(out / "model.onnx"), "--pattern", "2:4"]) == 0
    # the input was dense: check-sparsity on it fails (the check is not vacuous)
    assert main(["check-sparsity", str(models / "onnx" / name / "model.onnx"),
                 "--pattern", "2:4"]) == 1


def test_linears_left_dense_are_listed_as_skipped(tmp_path, capsys):
    """down_proj reads 90 channels, not a multiple of 4: skipped with the reason, the
    summary counts it, ensures accepts it (it is not claimed), check-sparsity says skipped."""
    d = tmp_path / "m"
    one_kv("llama", inter=90).save_pretrained(d)
    zoo.tiny_tokenizer().save_pretrained(d)
    out = tmp_path / "out"
    rc = main(["compile", str(d), "-p", "sparsify{score=magnitude,pattern=2:4},save-hf",
               "-o", str(out)])
    assert rc == 0
    rep = _report(out)
    assert rep["skipped"] == [f"model.layers.{i}.mlp.down_proj: input size 90 is not divisible "
                              "by 4" for i in range(zoo.LAYERS)]
    assert {r["name"] for r in rep["layers"]} == expected_linears("llama")
    assert f"{zoo.LAYERS} skipped" in capsys.readouterr().out
    assert main(["check-sparsity", str(out), "--pattern", "2:4"]) == 0


def test_a_wrong_nm_claim_fails_the_compile(tmp_path, capsys, monkeypatch):
    from slimgraph.sparsity import prune_step

    d = tmp_path / "m"
    one_kv("gemma3").save_pretrained(d)
    monkeypatch.setattr(prune_step, "masked_weight", lambda opts, w, *a, **k: w)  # no mask
    rc = main(["compile", str(d), "-p", "sparsify{score=magnitude,pattern=2:4}", "-o",
               str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "2:4 does not hold on 14 linear(s) it reports pruned" in err
    assert "Traceback" not in err


def _state(model, graph) -> CompileState:
    return CompileState(loaded=SimpleNamespace(model=model, meta=False, config=None),
                        graph=graph)


def test_ensures_names_missing_and_false_claims():
    model = one_kv("llama")
    state = _state(model, trace(model, *zoo.example("llama")))
    names = sorted(expected_linears("llama"))
    p = Sparsify(score="magnitude", pattern="2:4")
    # every linear reported, none skipped, all dense: each claim is false
    with pytest.raises(SparsityClaimError, match="does not hold on 14 linear"):
        p.ensures(state, PassResult(True, {"layers": [{"name": n} for n in names]}))
    # k_proj left out of the report: named
    with pytest.raises(SparsityClaimError, match="neither pruned nor skipped: "
                                                 "model.layers.0.self_attn.k_proj"):
        p.ensures(state, PassResult(True, {"layers": [
            {"name": n, "skipped": "test"} for n in names if n != "model.layers.0.self_attn.k_proj"]}))
    p.ensures(state, PassResult(True, {"layers": [{"name": n, "skipped": "x"} for n in names]}))


def test_two_blocks_with_one_layer_number_are_refused():
    from slimgraph.ir.graph import Graph

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.ModuleList([torch.nn.Linear(8, 8)])
            self.b = torch.nn.ModuleList([torch.nn.Linear(8, 8)])

        def forward(self, x):
            return self.b[0](self.a[0](x))

    graph = trace(Two(), (torch.randn(1, 3, 8),))
    assert isinstance(graph, Graph)
    assert [lin.weight for lin in block_linears(graph)] == ["a.0.weight", "b.0.weight"]
    with pytest.raises(BlockError, match="layer 0 has linears in two blocks, 'a.0' and 'b.0'"):
        find_blocks(graph)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(heads=st.sampled_from([2, 4, 8]), ratio=st.sampled_from([1, 2, 4, 8]),
       data=st.data())
def test_gqa_ratios_every_block_linear_pruned(heads, ratio, data):
    """Any GQA ratio (ratio = heads: one KV head): find_blocks has all seven linears and the
    block walk leaves every one of them 2:4."""
    kv = max(1, heads // ratio)
    head_dim = data.draw(st.sampled_from([8, 16]), label="head_dim")
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=zoo.VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim)).eval()
    result = analyze(trace(model, *zoo.example("llama")))
    blocks = find_blocks(result)
    assert [len(b.linears) for b in blocks] == [7, 7]
    opts = Sparsify(score="magnitude", pattern="2:4")
    reports = prune_blocks(opts.prune_options(), TorchBlocks(model, result), result)
    layers = [r for rep in reports for r in rep["layers"]]
    assert len(layers) == 14 and not [r for r in layers if r.get("skipped")]
    for b in blocks:
        for name in b.linears:
            assert is_nm(model.get_submodule(name).weight, 2, 4, axis=1), (heads, kv, name)
    state = _state(model, result.graph)
    opts.ensures(state, PassResult(True, {"layers": layers}))  # the claim holds
