from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest

from slimgraph.bench import (
    BenchError,
    BenchModel,
    measure,
    onnx_counts,
    render,
    summarize,
    torch_counts,
)
from slimgraph.cli import main
from slimgraph.frontends.loading import load_model
from tests import zoo


@pytest.fixture(scope="module")
def outs(tmp_path_factory):
    """A tiny LLaMA's directory, its dense ONNX export and an MLP-halved compile."""
    root = tmp_path_factory.mktemp("bench")
    model = root / "tiny"
    zoo.build("llama").save_pretrained(model)
    for name, pipeline in [("dense", "export-onnx"),
                           ("mlp50", "prune-structured{mlp=0.5},save-hf,export-onnx")]:
        assert main(["compile", str(model), "-p", pipeline, "-o", str(root / name)]) == 0
    return root


def test_onnx_and_torch_count_the_same_linear_macs(outs):
    tiny = load_model(str(outs / "tiny"), verbose=False).model
    params, macs = torch_counts(tiny)
    assert params == sum(p.numel() for p in tiny.parameters())
    cfg = tiny.config
    d, i, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * d // cfg.num_attention_heads
    expected = layers * (2 * d * d + 2 * d * kv + 3 * d * i) + d * cfg.vocab_size
    assert macs == expected
    o_params, o_macs, vocab = onnx_counts(outs / "dense" / "model.onnx")
    assert o_macs == expected and vocab == cfg.vocab_size and o_params >= params
    # the slimmed export: half the MLP MACs gone, in ONNX as in its hf/ checkpoint
    _, slim_macs, _ = onnx_counts(outs / "mlp50" / "model.onnx")
    slim = load_model(str(outs / "mlp50" / "hf"), verbose=False).model
    assert slim_macs == torch_counts(slim)[1] == expected - layers * 3 * d * (i // 2)


def _fake(name, log, vocab=50):
    def run(ids):
        log.append((name, ids.copy()))
    return BenchModel(name, "onnx", name, params=10, linear_macs=100, vocab=vocab, run=run)


def test_measure_is_round_robin_on_the_same_ids():
    log: list = []
    models = [_fake("a", log), _fake("b", log, vocab=20)]
    times = measure(models, [4, 8], batch=2, runs=3, warmup=2)
    assert [n for n, _ in log] == ["a", "b"] * 10  # (2 warm-up + 3) rounds x 2 lengths
    assert [ids.shape for _, ids in log[:10]] == [(2, 4)] * 10
    assert [ids.shape for _, ids in log[10:]] == [(2, 8)] * 10
    for k in range(0, 20, 2):  # both models of a round see the same ids, inside both vocabs
        assert np.array_equal(log[k][1], log[k + 1][1]) and log[k][1].max() < 20
    assert {s: len(t) for s, t in times["0"].items()} == {"4": 3, "8": 3}
    with pytest.raises(BenchError, match="runs >= 1"):
        measure(models, [4], runs=0)
    with pytest.raises(BenchError, match="positive prefill"):
        measure(models, [0])


def test_summary_speedup_and_ideal():
    base = BenchModel("dense", "onnx", "d", params=100, linear_macs=1000, vocab=None)
    slim = BenchModel("slim", "onnx", "s", params=60, linear_macs=500, vocab=None)
    times = {"0": {"16": [0.010, 0.012, 0.011]}, "1": {"16": [0.006, 0.0066, 0.0062]}}
    res = summarize([base, slim], times, batch=1, runs=3, warmup=0, threads=2)
    a, b = res["models"]
    assert a["latency_ms"]["16"] == {"median": 11.0, "min": 10.0, "p90": 12.0}
    assert a["tokens_per_s"]["16"] == pytest.approx(16 / 0.011, abs=0.1)
    assert "speedup" not in a
    assert b["linear_macs_fraction"] == 0.5 and b["ideal_ms"]["16"] == 5.5
    assert b["speedup"]["16"] == pytest.approx(11.0 / 6.2, abs=1e-3)
    assert b["over_ideal_pct"]["16"] == pytest.approx(100 * (6.2 / 5.5 - 1), abs=0.05)
    text = render(res)
    assert "1.77x" in text and "+12.7%" in text and "2 threads" in text


def test_cli_bench_onnx_files_and_compile_dirs(outs, capsys):
    rc = main(["bench", str(outs / "dense"), str(outs / "mlp50" / "model.onnx"),
               "--seqlen", "8,16", "--runs", "2", "--warmup", "1", "--json", "--no-progress"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    base, slim = res["models"]
    assert base["backend"] == slim["backend"] == "onnx"
    assert set(slim["latency_ms"]) == set(slim["over_ideal_pct"]) == {"8", "16"}
    assert 0.5 < slim["linear_macs_fraction"] < 1 and slim["params"] < base["params"]
    # the table form, PyTorch backend on the HF forms
    assert main(["bench", str(outs / "tiny"), str(outs / "mlp50"), "--backend", "torch",
                 "--seqlen", "8", "--runs", "1", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "torch" in text and "median ms" in text and "x " in text


@pytest.mark.parametrize("argv,needle", [
    (["nothere"], "'nothere' does not exist"),
    (["{dense}/model.onnx", "--backend", "torch"], "--backend torch needs a PyTorch model"),
    (["{dense}", "--seqlen", "8,0"], "expected a positive integer, got 0"),
    (["{dense}", "--warmup", "-1"], "--warmup must be 0 or more"),
    (["{bad}"], "cannot read ONNX model"),
])
def test_cli_bench_bad_input(outs, tmp_path, capsys, argv, needle):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    argv = [a.format(dense=outs / "dense", bad=bad) for a in argv]
    with pytest.raises(SystemExit) if "--seqlen" in argv else contextlib.nullcontext():
        rc = main(["bench", *argv, "--no-progress"])
        assert rc == 2
    assert needle in capsys.readouterr().err

