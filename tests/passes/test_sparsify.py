"""`sparsify` end to end on the tiny LLaMA: patterns hold, calibration is block-sequential."""

from __future__ import annotations

import json

import pytest
import torch

from slimgraph.cli import main
from slimgraph.frontends.loading import load_model
from slimgraph.sparsity.masks import is_nm, nm_mask, unstructured_mask
from tests import zoo

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("sp")
    zoo.build("llama").save_pretrained(d / "m")
    zoo.tiny_tokenizer().save_pretrained(d / "m")
    (d / "calib.txt").write_text(zoo.tiny_text(3000, seed=1))
    return d


def _compile(tiny, tmp_path, pipeline, *extra):
    out = tmp_path / "out"
    rc = main(["compile", str(tiny / "m"), "-p", f"{pipeline},save-hf", "-o", str(out),
               "--calib-file", str(tiny / "calib.txt"), "--calib-samples", "8",
               "--calib-seqlen", "32", *extra])
    return rc, out


def _linears(model):
    for i, layer in enumerate(model.model.layers):
        for n in LINEARS:
            mod = getattr(layer.self_attn, n, None) or getattr(layer.mlp, n)
            yield f"{i}.{n}", mod.weight.detach()


@pytest.mark.parametrize("pipeline", ["sparsify{score=ria,pattern=2:4}",
                                      "sparsify{score=wanda,pattern=2:4}",
                                      "sparsify{score=magnitude,pattern=4:8}",
                                      "sparsify{score=ria,pattern=2:4,reconstruct=true}",
                                      "sparsify{score=sparsegpt,pattern=2:4}"])
def test_nm_patterns_hold_in_every_block_linear(tiny, tmp_path, pipeline):
    rc, out = _compile(tiny, tmp_path, pipeline)
    assert rc == 0
    model = load_model(str(out / "hf")).model
    n, m = (4, 8) if "4:8" in pipeline else (2, 4)
    for name, w in _linears(model):
        assert is_nm(w, n, m, axis=1), name
        assert (w == 0).float().mean() >= 0.5 - 1e-6
    dense = zoo.build("llama")
    assert torch.equal(model.model.embed_tokens.weight, dense.model.embed_tokens.weight)
    report = json.loads((out / "report.json").read_text())["passes"][0]["report"]
    assert report["sparsity"] == pytest.approx(0.5) and not report["skipped"]
    assert len(report["layers"]) == 7 * zoo.LAYERS


def test_wanda_unstructured_per_row(tiny, tmp_path):
    rc, out = _compile(tiny, tmp_path, "sparsify{score=wanda,sparsity=0.5,scope=row}")
    assert rc == 0
    for name, w in _linears(load_model(str(out / "hf")).model):
        per_row = (w == 0).sum(1)
        assert torch.all(per_row == w.shape[1] // 2), name


def test_layer0_masks_equal_a_direct_reference(tiny, tmp_path):
    """Block 0 sees the dense model's activations: its Wanda/RIA masks are reproducible."""
    from slimgraph.sparsity.calibration import calibration_tokens, sample_windows
    from tests.sparsity import reference_wanda as ref

    rc, out = _compile(tiny, tmp_path, "sparsify{score=ria,sparsity=0.5}")
    assert rc == 0
    pruned = load_model(str(out / "hf")).model
    dense = zoo.build("llama")
    tok = zoo.tiny_tokenizer()
    windows = sample_windows(calibration_tokens(tok, tiny / "calib.txt"), 8, 32, 0)
    seen = {}
    hooks = [getattr(dense.model.layers[0].self_attn, n).register_forward_pre_hook(
        lambda mod, args, n=n: seen.__setitem__(n, args[0].detach().clone()))
        for n in ("q_proj", "o_proj")]
    with torch.no_grad():
        dense(input_ids=windows, use_cache=False)
    for h in hooks:
        h.remove()
    for n in ("q_proj", "o_proj"):
        w = getattr(dense.model.layers[0].self_attn, n).weight.detach()
        keep = unstructured_mask(ref.ria_metric(w, ref.scaler_row(seen[n])), 0.5, "layer")
        got = getattr(pruned.model.layers[0].self_attn, n).weight != 0
        assert torch.equal(got, keep), n


def test_reconstruction_lowers_the_output_error(tiny, tmp_path):
    """On calibration data, RIA 2:4 + reconstruction is closer to dense than RIA 2:4 alone."""
    from slimgraph.sparsity.calibration import calibration_tokens, sample_windows

    tok = zoo.tiny_tokenizer()
    ids = sample_windows(calibration_tokens(tok, tiny / "calib.txt"), 8, 32, 0)
    dense = zoo.build("llama")
    errs = []
    for i, p in enumerate(["sparsify{score=ria,pattern=2:4}",
                           "sparsify{score=ria,pattern=2:4,reconstruct=true}"]):
        rc, out = _compile(tiny, tmp_path / str(i), p)
        assert rc == 0
        m = load_model(str(out / "hf")).model
        with torch.no_grad():
            a = dense(input_ids=ids, use_cache=False).logits
            b = m(input_ids=ids, use_cache=False).logits
        errs.append(float((a - b).norm() / a.norm()))
    assert errs[1] < errs[0]


def test_nm_mask_matches_kernel_on_magnitude(tiny, tmp_path):
    rc, out = _compile(tiny, tmp_path, "sparsify{score=magnitude,pattern=2:4}")
    assert rc == 0
    pruned = load_model(str(out / "hf")).model
    dense = zoo.build("llama")
    for (name, w), (_, w0) in zip(_linears(pruned), _linears(dense)):
        assert torch.equal(w != 0, nm_mask(w0.abs(), 2, 4)), name


@pytest.mark.parametrize("pipeline,needle", [
    ("sparsify{score=ria,pattern=4:2}", "option 'pattern'"),
    ("sparsify{score=ria,pattern=0:4}", "option 'pattern'"),
    ("sparsify{score=ria,sparsity=1.5}", "option 'sparsity': 1.5 is outside (0, 1)"),
    ("sparsify{score=ria}", "give a sparsity"),
    ("sparsify{score=foo,sparsity=0.5}", "option 'score'"),
    ("sparsify{score=ria,pattern=2:4,scope=row}", "option 'scope'"),
])
def test_bad_options_exit_2(tiny, tmp_path, capsys, pipeline, needle):
    rc, _ = _compile(tiny, tmp_path, pipeline)
    assert rc == 2
    assert needle in capsys.readouterr().err


def test_calibration_shorter_than_one_sample(tiny, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("w1 w2 w3")
    rc = main(["compile", str(tiny / "m"), "-p", "sparsify{score=wanda,sparsity=0.5}", "-o",
               str(tmp_path / "o"), "--calib-file", str(short), "--calib-seqlen", "32"])
    assert rc == 2
    assert "shorter than one sample of 32" in capsys.readouterr().err


def test_alpaca_jsonl_calibration_and_errors(tiny, tmp_path, capsys):
    good = tmp_path / "a.jsonl"
    good.write_text("\n".join(json.dumps({"instruction": zoo.tiny_text(40, s), "input": "",
                                          "output": zoo.tiny_text(60, s + 1)}) for s in range(20)))
    rc = main(["compile", str(tiny / "m"), "-p", "sparsify{score=wanda,sparsity=0.5}", "-o",
               str(tmp_path / "o"), "--calib-file", str(good), "--calib-samples", "4",
               "--calib-seqlen", "32"])
    assert rc == 0
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"instruction": "w1"}\nnot json\n')
    rc = main(["compile", str(tiny / "m"), "-p", "sparsify{score=wanda,sparsity=0.5}", "-o",
               str(tmp_path / "o2"), "--calib-file", str(bad)])
    assert rc == 2 and "b.jsonl:2: not valid JSON" in capsys.readouterr().err


def test_model_without_prunable_linears_is_an_error():
    from torch import nn

    from slimgraph.errors import SlimgraphError
    from slimgraph.frontends.torch_export import trace
    from slimgraph.ir.dependency import analyze
    from slimgraph.structured.recovery import walk_blocks
    from slimgraph.structured.torch_blocks import TorchBlocks

    class NoBlocks(nn.Module):
        def forward(self, x):
            return torch.relu(x) * 2

    model = NoBlocks()
    r = analyze(trace(model, (torch.randn(1, 4, 8),)))
    with pytest.raises(SlimgraphError, match="no decoder blocks with prunable linears"):
        walk_blocks(TorchBlocks(model, r, torch.zeros((1, 2), dtype=torch.long)),
                    lambda *a: None)


def test_prune_structured_activation_importance(tiny, tmp_path):
    rc = main(["compile", str(tiny / "m"), "-p", "prune-structured{mlp=0.5,importance=act,samples=4,"
               "seqlen=32},save-hf", "-o", str(tmp_path / "o"), "--calib-file", str(tiny / "calib.txt")])
    assert rc == 0
    m = load_model(str(tmp_path / "o" / "hf")).model
    assert m.model.layers[0].mlp.down_proj.weight.shape == (zoo.HIDDEN, zoo.INTER // 2)


def test_self_calibration_is_data_free(tiny, tmp_path):
    rc = main(["compile", str(tiny / "m"), "-p", "sparsify{score=wanda,pattern=2:4},save-hf", "-o",
               str(tmp_path / "o"), "--calib-file", "self", "--calib-samples", "4",
               "--calib-seqlen", "16"])
    assert rc == 0
    rep = json.loads((tmp_path / "o" / "report.json").read_text())["passes"][0]["report"]
    assert rep["calibration"]["source"] == "self" and rep["sparsity"] == pytest.approx(0.5)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from _tensors(v)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)


def test_calibration_inputs_hold_one_copy_of_the_shared_kwargs():
    """Batches of the same size get equal rotary tables and position ids: they are kept
    once (the same tensor objects); the hidden states stay per batch, and a shared table
    gives the block the outputs of a fresh one."""
    from slimgraph.sparsity.calibration import capture_block_inputs

    model = zoo.build("llama").eval()
    windows = torch.randint(3, zoo.VOCAB, (5, 16), generator=torch.Generator().manual_seed(0))
    inputs = capture_block_inputs(model, model.model.layers[0], windows, batch=2)
    assert len(inputs) == 3
    first = list(_tensors(inputs[0][1]))
    assert first  # position embeddings at least
    assert all(a is b for a, b in zip(first, _tensors(inputs[1][1])))
    assert inputs[0][0][0] is not inputs[1][0][0]
    with torch.no_grad():  # the shared kwargs give the same block outputs as fresh ones
        x = model.model.embed_tokens(windows[2:4])
        pos = torch.arange(16)[None]
        fresh = model.model.layers[0](x, position_embeddings=model.model.rotary_emb(x, pos),
                                      position_ids=pos)
        shared = model.model.layers[0](*inputs[1][0], **inputs[1][1])
    fresh, shared = (y[0] if isinstance(y, tuple) else y for y in (fresh, shared))
    assert torch.equal(fresh, shared)


def test_run_block_writes_the_outputs_over_the_inputs():
    """One copy of the activations: the next block's inputs replace this block's, batch by
    batch, in the same list, with the values a separate run gives."""
    from slimgraph.sparsity.calibration import capture_block_inputs, observe_block, run_block

    model = zoo.build("llama").eval()
    windows = torch.randint(3, zoo.VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
    block = model.model.layers[0]
    inputs = capture_block_inputs(model, block, windows, batch=2)
    with torch.no_grad():
        want = [block(*a, **k) for a, k in inputs]
    want = [y[0] if isinstance(y, tuple) else y for y in want]
    kwargs = [k for _, k in inputs]
    got = run_block(block, inputs)
    assert got is inputs
    assert all(torch.equal(a[0], w) for (a, _), w in zip(got, want))
    assert all(k is k0 for (_, k), k0 in zip(got, kwargs))
    inputs = capture_block_inputs(model, block, windows, batch=2)
    _, outs = observe_block(block, {"q": block.self_attn.q_proj}, inputs, hessian=False,
                            outputs=True)
    assert outs is inputs and all(torch.equal(a[0], w) for (a, _), w in zip(outs, want))
