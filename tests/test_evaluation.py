"""Perplexity evaluation: the protocol on known logits, torch vs ONNX on a tiny LLaMA, model
resolution (compile output directories, bare .onnx files), --prompt, and one-line errors.

The SmolLM2 test is marked ``slow``.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from slimgraph.errors import SlimgraphError
from slimgraph.cli import main
from slimgraph.evaluation import (
    EvaluationError,
    onnx_logits_fn,
    perplexity,
    read_text,
    resolve_model,
    tokenize,
    torch_logits_fn,
)
from tests import zoo
from tests.zoo import tiny_text, tiny_tokenizer

V = zoo.VOCAB  # 128
SEQLEN = 32
# the protocol's evaluation part of WikiText-2 test, shipped with the package
WIKITEXT_EVAL = Path(__file__).resolve().parents[1] / "slimgraph" / "data" / "wikitext2" / "eval.txt"


def run_cli(argv: list[str]) -> int:
    return main(argv)


def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Fast tests never touch the user's model cache."""
    monkeypatch.setenv("SLIMGRAPH_CACHE", str(tmp_path_factory.mktemp("cache")))


# --------------------------------------------------------------------------- known logits


def uniform(ids: np.ndarray) -> np.ndarray:
    return np.zeros((1, ids.shape[1], V), dtype=np.float32)


def successor_oracle(ids: np.ndarray) -> torch.Tensor:
    """All the mass on (id + 1) % V: right for a counting sequence."""
    logits = torch.full((1, ids.shape[1], V), -30.0)
    nxt = torch.as_tensor((ids[0] + 1) % V)
    logits[0, torch.arange(ids.shape[1]), nxt] = 30.0
    return logits


def counting(n: int) -> list[int]:
    return [i % V for i in range(n)]


def test_uniform_logits_give_ppl_vocab():
    r = perplexity(uniform, counting(5 * SEQLEN), seqlen=SEQLEN, windows=3, progress=False)
    assert r["ppl"] == pytest.approx(V, rel=1e-6)  # fp32 log-softmax: log(128) to ~1e-7
    assert r["windows"] == 3 and r["tokens"] == 3 * SEQLEN and r["seqlen"] == SEQLEN
    assert r["nll_per_window"] == pytest.approx([math.log(V)] * 3, rel=1e-6)
    assert r["seconds"] > 0 and r["tokens_per_s"] > 0


def test_oracle_gives_ppl_one():
    r = perplexity(successor_oracle, counting(4 * SEQLEN), seqlen=SEQLEN, windows=4,
                   progress=False)
    assert r["ppl"] == pytest.approx(1.0, abs=1e-12)


def test_mean_of_window_means_and_shift():
    """Per window: mean NLL of tokens 1..L-1 under the logits one position earlier; the
    ppl is exp of the mean of the window means (not of all tokens pooled)."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, V, 3 * SEQLEN + 5).tolist()
    table = rng.normal(size=(3, SEQLEN, V)).astype(np.float32) * 3
    calls = []

    def fn(ids):
        calls.append(ids.copy())
        return table[len(calls) - 1][None]

    r = perplexity(fn, tokens, seqlen=SEQLEN, windows=40, progress=False)
    expect = []
    for w in range(3):
        win = np.asarray(tokens[w * SEQLEN : (w + 1) * SEQLEN])
        np.testing.assert_array_equal(calls[w], win[None])  # non-overlapping, from the start
        assert calls[w].dtype == np.int64
        lg = table[w].astype(np.float64)
        logp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
        expect.append(-logp[np.arange(SEQLEN - 1), win[1:]].mean())
    assert r["nll_per_window"] == pytest.approx(expect, rel=1e-6)
    assert r["ppl"] == pytest.approx(math.exp(np.mean(expect)), rel=1e-6)


@pytest.mark.parametrize("n_tokens,windows,expect", [
    (5 * SEQLEN + 10, 40, 5),   # fewer than asked: use what exists
    (5 * SEQLEN + 10, 3, 3),
    (SEQLEN, 40, 1),            # exactly one full window
    (2 * SEQLEN - 1, 40, 1),    # a partial window is not used
])
def test_window_counting(n_tokens, windows, expect):
    r = perplexity(uniform, counting(n_tokens), seqlen=SEQLEN, windows=windows, progress=False)
    assert r["windows"] == expect and len(r["nll_per_window"]) == expect
    assert r["windows_requested"] == windows and r["tokens_available"] == n_tokens
    assert r["tokens"] == expect * SEQLEN


def test_fewer_than_one_window_is_an_error():
    with pytest.raises(EvaluationError, match="fewer than one window of 32 tokens"):
        perplexity(uniform, counting(SEQLEN - 1), seqlen=SEQLEN, progress=False)


def test_prompt_is_prepended_and_not_scored():
    prompt = [7, 99, 3, 50, 11]  # not a counting run: the oracle gets these wrong
    seen = []

    def fn(ids):
        seen.append(ids.copy())
        return successor_oracle(ids)

    tokens = counting(3 * SEQLEN)
    r = perplexity(fn, tokens, seqlen=SEQLEN, windows=2, progress=False, prompt_tokens=prompt)
    assert r["ppl"] == pytest.approx(1.0, abs=1e-12)
    assert r["prompt_tokens"] == 5 and r["tokens"] == 2 * SEQLEN
    for w, ids in enumerate(seen):
        assert ids.shape == (1, len(prompt) + SEQLEN)
        assert ids[0, :5].tolist() == prompt
        assert ids[0, 5:].tolist() == tokens[w * SEQLEN : (w + 1) * SEQLEN]
    # scored tokens are those of the prompt-free protocol: the same count, the same targets
    bad = perplexity(uniform, tokens, seqlen=SEQLEN, windows=2, progress=False,
                     prompt_tokens=prompt)
    assert bad["ppl"] == pytest.approx(V, rel=1e-6)


def test_progress_bar_does_not_break(capsys):
    r = perplexity(uniform, counting(2 * SEQLEN), seqlen=SEQLEN, windows=2, progress=True)
    assert r["windows"] == 2
    assert capsys.readouterr().out == ""  # the bar goes to stderr only


def test_bad_logits_shape_and_token_outside_vocab():
    with pytest.raises(EvaluationError, match=r"logits of shape \[1, 31, 128\]"):
        perplexity(lambda ids: np.zeros((1, ids.shape[1] - 1, V), np.float32),
                   counting(SEQLEN), seqlen=SEQLEN, progress=False)
    with pytest.raises(EvaluationError, match="token id 200 is outside the model's 128 logits"):
        perplexity(uniform, [200] * SEQLEN, seqlen=SEQLEN, progress=False)


def test_bad_seqlen_and_windows():
    with pytest.raises(EvaluationError, match="seqlen must be at least 2"):
        perplexity(uniform, counting(10), seqlen=1, progress=False)
    with pytest.raises(EvaluationError, match="windows must be at least 1"):
        perplexity(uniform, counting(100), seqlen=SEQLEN, windows=0, progress=False)


# --------------------------------------------------------------------------- text


def test_read_text_crlf(tmp_path):
    p = tmp_path / "t.txt"
    p.write_bytes(b" = Title = \r\n\r\n text\r\nend\n")
    assert read_text(p) == " = Title = \n\n text\nend\n"


@pytest.mark.parametrize("make,needle", [
    (lambda d: d / "missing.txt", "does not exist"),
    (lambda d: _write(d / "empty.txt", b""), "is empty"),
    (lambda d: _write(d / "blank.txt", b" \r\n\n"), "is empty"),
    (lambda d: _write(d / "bin.txt", b"\xff\xfe\x00abc"), "not UTF-8"),
    (lambda d: d, "is a directory"),
])
def test_read_text_errors(tmp_path, make, needle):
    with pytest.raises(EvaluationError, match=needle):
        read_text(make(tmp_path))


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------------- tiny model


@pytest.fixture(scope="module")
def outdir(tmp_path_factory):
    """A compile-output-like directory: hf/ checkpoint, model.onnx, tokenizer files."""
    d = tmp_path_factory.mktemp("compiled")
    model = zoo.build("llama")
    model.config.max_position_embeddings = 48  # a limit the CLI must check (rope unaffected)
    model.save_pretrained(d / "hf")
    tiny_tokenizer().save_pretrained(d)
    ids = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(0))
    # kwargs form: every kwarg needs an entry in dynamic_shapes (None = static); an example
    # batch of 2 keeps the batch dim dynamic (a batch of 1 would be specialised to 1)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter deprecation / axis-renaming chatter
        torch.onnx.export(
            model, (ids,), str(d / "model.onnx"), dynamo=True, kwargs={"use_cache": False},
            dynamic_shapes={"input_ids": {0: batch, 1: seq}, "use_cache": None},
            verbose=False,
        )  # fmt: skip
    return d


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "eval.txt"
    p.write_bytes(tiny_text(5 * SEQLEN + 7).encode())
    return p


def test_tokenize_has_no_special_tokens():
    tok = tiny_tokenizer()
    assert tokenize(tok, "w1 w2 nope w3") == [1, 2, 0, 3]


def test_torch_and_onnx_agree(outdir, text_file):
    tokens = tokenize(tiny_tokenizer(), read_text(text_file))
    assert len(tokens) == 5 * SEQLEN + 7
    model = zoo.build("llama")
    r_t = perplexity(torch_logits_fn(model), tokens, seqlen=SEQLEN, windows=4, progress=False)
    r_o = perplexity(onnx_logits_fn(outdir / "model.onnx"), tokens, seqlen=SEQLEN, windows=4,
                     progress=False)
    assert r_t["windows"] == r_o["windows"] == 4
    assert r_o["nll_per_window"] == pytest.approx(r_t["nll_per_window"], rel=1e-5)
    assert r_o["ppl"] == pytest.approx(r_t["ppl"], rel=1e-5)
    # and both equal the HF loss (labels = input ids) averaged per window
    losses = []
    with torch.no_grad():
        for w in range(4):
            x = torch.tensor([tokens[w * SEQLEN : (w + 1) * SEQLEN]])
            losses.append(model(input_ids=x, labels=x, use_cache=False).loss.item())
    assert r_t["nll_per_window"] == pytest.approx(losses, rel=1e-5)
    assert 50 < r_t["ppl"] < 500  # random weights: near the vocabulary size


def test_cli_compile_output_dir_backends(outdir, text_file, capsys):
    results = {}
    for backend in ("auto", "torch", "onnx"):
        argv = ["eval", str(outdir), "--ppl", str(text_file), "--seqlen", str(SEQLEN),
                "--json", "--backend", backend, "--no-progress"]
        assert run_cli(argv) == 0
        results[backend] = json.loads(capsys.readouterr().out)
    assert results["auto"]["backend"] == "torch" and results["onnx"]["backend"] == "onnx"
    assert results["auto"]["ppl"] == results["torch"]["ppl"]
    assert results["onnx"]["ppl"] == pytest.approx(results["torch"]["ppl"], rel=1e-5)
    obj = results["onnx"]
    assert obj["windows"] == 5 and obj["windows_requested"] == 40 and obj["seqlen"] == SEQLEN
    assert obj["model"] == str(outdir) and obj["source"].endswith("model.onnx")
    assert len(obj["nll_per_window"]) == 5 and obj["tokens_per_s"] > 0


def test_cli_human_summary(outdir, text_file, capsys):
    argv = ["eval", str(outdir), "--ppl", str(text_file), "--seqlen", str(SEQLEN),
            "--windows", "2", "--threads", "1"]
    before = torch.get_num_threads()
    try:
        assert run_cli(argv) == 0
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    assert "[torch]: ppl " in out[0] and "2 windows x 32 tokens" in out[0] and "tokens/s" in out[0]


def test_onnx_dir_without_hf_uses_onnx(outdir, text_file, tmp_path, capsys):
    d = tmp_path / "onnx-only"
    d.mkdir()
    for f in outdir.iterdir():
        if f.is_file():
            shutil.copy(f, d / f.name)  # model.onnx (+ .data), tokenizer files
    assert run_cli(["eval", str(d), "--ppl", str(text_file), "--seqlen", str(SEQLEN),
                    "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["backend"] == "onnx"
    assert run_cli(["eval", str(d), "--ppl", str(text_file), "--backend", "torch"]) == 2
    assert "--backend torch needs a PyTorch model" in capsys.readouterr().err


def test_bare_onnx_file_tokenizer(outdir, text_file, tmp_path, capsys):
    # next to the file: found
    assert run_cli(["eval", str(outdir / "model.onnx"), "--ppl", str(text_file),
                    "--seqlen", str(SEQLEN), "--json", "--no-progress"]) == 0
    ppl_beside = json.loads(capsys.readouterr().out)["ppl"]
    # copied away from its tokenizer: a one-line error naming --tokenizer
    d = tmp_path / "lonely"
    d.mkdir()
    for f in outdir.glob("model.onnx*"):
        shutil.copy(f, d / f.name)
    assert run_cli(["eval", str(d / "model.onnx"), "--ppl", str(text_file),
                    "--seqlen", str(SEQLEN)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("slimgraph: error: no tokenizer found") and "--tokenizer" in err[-1]
    # ... and with --tokenizer it runs, with the same result
    assert run_cli(["eval", str(d / "model.onnx"), "--ppl", str(text_file), "--seqlen",
                    str(SEQLEN), "--tokenizer", str(outdir), "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["ppl"] == pytest.approx(ppl_beside, rel=1e-12)


def test_cli_prompt(outdir, text_file, tmp_path, capsys):
    base = ["eval", str(outdir), "--ppl", str(text_file), "--seqlen", str(SEQLEN), "--json",
            "--no-progress", "--windows", "3"]
    assert run_cli(base) == 0
    plain = json.loads(capsys.readouterr().out)
    assert run_cli(base + ["--prompt", "w5 w6 w7 w8"]) == 0
    prompted = json.loads(capsys.readouterr().out)
    pfile = tmp_path / "prompt.txt"
    pfile.write_text("w5 w6 w7 w8\n")
    assert run_cli(base + ["--prompt", str(pfile)]) == 0
    from_file = json.loads(capsys.readouterr().out)
    assert prompted["prompt_tokens"] == from_file["prompt_tokens"] == 4
    assert prompted["ppl"] == from_file["ppl"]
    assert prompted["tokens"] == plain["tokens"] == 3 * SEQLEN
    assert prompted["ppl"] != plain["ppl"]  # more context, different numbers
    # independent check of window 0: HF loss with the prompt and the window's first token
    # masked out of the labels
    model = zoo.build("llama")
    tokens = tokenize(tiny_tokenizer(), read_text(text_file))
    x = torch.tensor([[5, 6, 7, 8] + tokens[:SEQLEN]])
    labels = x.clone()
    labels[0, :5] = -100
    with torch.no_grad():
        loss = model(input_ids=x, labels=labels, use_cache=False).loss.item()
    assert prompted["nll_per_window"][0] == pytest.approx(loss, rel=1e-5)
    # too long for the model's positions: a clear error
    assert run_cli(base[:4] + ["--seqlen", "64", "--prompt", "w1 w2"]) == 2
    assert "exceed the model's" in capsys.readouterr().err


@pytest.mark.parametrize("argv_tail,needle", [
    (["--ppl", "{tmp}/nope.txt"], "text file '{tmp}/nope.txt' does not exist"),
    (["--ppl", "{short}"], "fewer than one window of 32 tokens"),
    (["--ppl", "{text}", "--prompt", "  "], "--prompt is empty"),
])
def test_cli_errors_are_one_line(outdir, text_file, tmp_path, capsys, argv_tail, needle):
    short = tmp_path / "short.txt"
    short.write_text("w1 w2 w3\n")
    fill = {"tmp": str(tmp_path), "short": str(short), "text": str(text_file)}
    argv = ["eval", str(outdir), "--seqlen", str(SEQLEN)] + [a.format(**fill) for a in argv_tail]
    assert run_cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("slimgraph: error: ") and needle.format(**fill) in err[-1]


def test_resolve_errors(tmp_path, outdir):
    with pytest.raises(EvaluationError, match="--backend onnx needs an ONNX model"):
        resolve_model(str(outdir / "hf"), backend="onnx")
    with pytest.raises(SlimgraphError, match="does not exist"):
        resolve_model(str(tmp_path / "nothing"))
    with pytest.raises(EvaluationError, match="cannot load ONNX model"):
        onnx_logits_fn(_write(tmp_path / "bad.onnx", b"not a model"))


def test_ppl_is_required(capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(["eval", "smollm2-135m"])
    assert e.value.code == 2 and "--ppl" in capsys.readouterr().err


# --------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_smollm2_two_windows(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SLIMGRAPH_CACHE", raising=False)  # use the real de-quantized cache
    eval_txt = tmp_path / "eval.txt"
    eval_txt.write_text(read_text(WIKITEXT_EVAL), encoding="utf-8")
    t0 = time.perf_counter()
    assert run_cli(["eval", "smollm2-135m", "--ppl", str(eval_txt), "--windows", "2",
                    "--json", "--no-progress"]) == 0
    wall = time.perf_counter() - t0
    obj = json.loads(capsys.readouterr().out)
    print(f"\nsmollm2-135m, 2 windows: ppl {obj['ppl']:.3f}, eval {obj['seconds']:.1f} s "
          f"({obj['tokens_per_s']:.0f} tok/s), load {obj['load_seconds']:.1f} s, "
          f"total {wall:.1f} s", file=sys.stderr)
    assert obj["windows"] == 2 and obj["seqlen"] == 512 and obj["backend"] == "torch"
    assert math.isfinite(obj["ppl"]) and 10 < obj["ppl"] < 100
