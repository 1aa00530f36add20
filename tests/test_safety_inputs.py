"""Hostile or careless inputs get one line `slimgraph: error: ...` naming the thing at
fault and exit status 2, and stay byte-identical (issue 17, items 5, 7, 8 and 10):
files outside a model folder, tracebacks on bad files and options, resource bombs, and
models that need their own code."""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from slimgraph.cli import main
from slimgraph.errors import ModelLoadError
from slimgraph.frontends import model_folder
from tests import zoo

SPARSIFY = "sparsify{pattern=2:4}"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """One root holding every input: a single-file and a sharded tiny LLaMA (with
    tokenizer), a calibration text and a config JSON."""
    root = tmp_path_factory.mktemp("inputs")
    model = zoo.build("llama")
    model.save_pretrained(root / "single", safe_serialization=True)
    model.save_pretrained(root / "sharded", safe_serialization=True, max_shard_size="20KB")
    for sub in ("single", "sharded"):
        zoo.tiny_tokenizer().save_pretrained(root / sub)
    (root / "calib.txt").write_text(zoo.tiny_text(2000, seed=1))
    shutil.copy(root / "single" / "config.json", root / "config.json")
    return root


def digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (symlinks by their target's name)."""
    out = {}
    for p in sorted(root.rglob("*")):
        key = str(p.relative_to(root))
        if p.is_symlink():
            out[key] = "-> " + os.readlink(p)
        elif p.is_file():
            out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def refused(argv: list[str], capsys, root: Path, *needles: str) -> str:
    """Run the CLI; assert exit 2, one error line holding every needle, no traceback,
    and ``root`` byte-identical afterwards. Returns the error line."""
    before = digest(root)
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("slimgraph: error: ")]
    assert len(errors) == 1, err
    assert errors[0] == err.strip().splitlines()[-1]
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert digest(root) == before
    return errors[0]


def copy_model(inputs: Path, tmp_path: Path, which: str = "sharded") -> Path:
    """A private copy of a fixture model, to make hostile."""
    dst = tmp_path / "in" / "model"
    shutil.copytree(inputs / which, dst)
    return dst


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# --------------------------------------------------------------------------- item 5


@pytest.mark.parametrize("entry", ["../../x.safetensors", "ABS"])
@pytest.mark.parametrize("offload", [True, False])
def test_index_entry_outside_the_folder_refused(inputs, tmp_path, capsys, entry, offload):
    model = copy_model(inputs, tmp_path)
    outside = tmp_path / "in" / "x.safetensors"
    shutil.copy(inputs / "single" / "model.safetensors", outside)
    if entry == "ABS":
        entry = str(outside)
    index = model / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    first = sorted(data["weight_map"])[0]
    data["weight_map"][first] = entry
    index.write_text(json.dumps(data))
    argv = ["compile", str(model), "-p", f"{SPARSIFY},save-hf" if offload else "save-hf",
            "-o", str(tmp_path / "out")]
    if offload:
        argv += ["--offload", "--calib-file", str(inputs / "calib.txt"), "--calib-samples", "2",
                 "--calib-seqlen", "8"]
    refused(argv, capsys, tmp_path / "in", "model.safetensors.index.json", f"'{entry}'",
            "outside")
    assert not (tmp_path / "out" / "hf").exists()


@pytest.mark.parametrize("offload", [True, False])
def test_symlink_leading_outside_refused(inputs, tmp_path, capsys, offload):
    model = copy_model(inputs, tmp_path, "single")
    outside = tmp_path / "in" / "elsewhere.safetensors"
    (model / "model.safetensors").rename(outside)
    (model / "model.safetensors").symlink_to(outside)
    argv = ["compile", str(model), "-p", f"{SPARSIFY},save-hf" if offload else "save-hf",
            "-o", str(tmp_path / "out")]
    if offload:
        argv += ["--offload", "--calib-file", str(inputs / "calib.txt")]
    refused(argv, capsys, tmp_path / "in", "'model.safetensors' is a symlink", "outside")


def test_load_pruned_refuses_files_outside(inputs, tmp_path):
    from slimgraph.backends.hf_checkpoint import load_pruned

    model = copy_model(inputs, tmp_path)
    edit_json(model / "config.json", slimgraph={"loader": "transformers", "param_shapes": {}})
    index = model / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"] = {k: "../" + v for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))
    with pytest.raises(ModelLoadError, match="lies outside the directory"):
        load_pruned(model)


def test_hub_snapshot_links_into_blobs_accepted(inputs, tmp_path):
    """A Hugging Face cache snapshot links every file to ../../blobs: that is inside."""
    repo = tmp_path / "models--x--tiny"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in (inputs / "single").iterdir():
        shutil.copy(f, blobs / f.name)
        (snap / f.name).symlink_to(Path("../../blobs") / f.name)
    model_folder.check_folder(snap)  # no error
    from slimgraph.frontends.loading import load_model

    assert load_model(str(snap), verbose=False).model is not None


# --------------------------------------------------------------------------- item 7


def test_non_utf8_calibration_file(inputs, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    bad = tmp_path / "in" / "calib.txt"
    bad.write_bytes(b"w1 w2 \xff\xfe w3\n" * 200)
    refused(["compile", str(inputs / "single"), "-p", SPARSIFY, "-o", str(tmp_path / "out"),
             "--calib-file", str(bad), "--calib-samples", "2", "--calib-seqlen", "8"],
            capsys, tmp_path / "in", "calibration file", str(bad), "not UTF-8")


def test_non_utf8_alpaca_calibration_file(inputs, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    bad = tmp_path / "in" / "calib.jsonl"
    bad.write_bytes(b'{"instruction": "w1 \xff", "output": "w2"}\n')
    refused(["compile", str(inputs / "single"), "-p", SPARSIFY, "-o", str(tmp_path / "out"),
             "--calib-file", str(bad), "--calib-samples", "2", "--calib-seqlen", "8"],
            capsys, tmp_path / "in", "calibration file", str(bad), "not UTF-8")


@pytest.mark.parametrize("option", ["data", "prompt_file"])
def test_non_utf8_l0_files(inputs, tmp_path, capsys, option):
    (tmp_path / "in").mkdir()
    bad = tmp_path / "in" / "bad.txt"
    bad.write_bytes(b"\xff\xfe w1 w2\n" * 50)
    data = str(bad) if option == "data" else str(inputs / "calib.txt")
    extra = f",prompt_file={bad}" if option == "prompt_file" else ""
    refused(["compile", str(inputs / "single"), "-p", f"l0{{data={data}{extra},steps=1}}",
             "-o", str(tmp_path / "out")],
            capsys, tmp_path / "in", f"option '{option}'", str(bad), "not UTF-8")


def test_non_utf8_pipeline_file(inputs, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    bad = tmp_path / "in" / "pipe.yaml"
    bad.write_bytes(b"pipeline:\n  - save-hf  # \xff\xfe\n")
    refused(["compile", str(inputs / "single"), "-p", str(bad), "-o", str(tmp_path / "out")],
            capsys, tmp_path / "in", "pipeline file", str(bad), "not UTF-8")


@pytest.mark.parametrize("flag", ["--calib-samples", "--calib-seqlen"])
def test_zero_calibration_sizes(inputs, tmp_path, capsys, flag):
    argv = ["compile", str(inputs / "single"), "-p", SPARSIFY, "-o", str(tmp_path / "out"),
            "--calib-file", str(inputs / "calib.txt"), "--calib-samples", "2",
            "--calib-seqlen", "8"]
    argv[argv.index(flag) + 1] = "0"
    refused(argv, capsys, inputs, flag)


def test_sample_windows_refuses_zero_sizes():
    from slimgraph.sparsity.calibration import CalibrationError, sample_windows

    with pytest.raises(CalibrationError, match="at least 1 sample"):
        sample_windows(list(range(100)), 0, 8)
    with pytest.raises(CalibrationError, match="at least 2 tokens"):
        sample_windows(list(range(100)), 4, 0)


@pytest.mark.parametrize("which", ["single", "sharded"])
def test_truncated_safetensors_with_offload(inputs, tmp_path, capsys, which):
    model = copy_model(inputs, tmp_path, which)
    victim = sorted(model.glob("*.safetensors"))[-1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    refused(["compile", str(model), "--offload", "-p", f"{SPARSIFY},save-hf",
             "-o", str(tmp_path / "out"), "--calib-file", str(inputs / "calib.txt"),
             "--calib-samples", "2", "--calib-seqlen", "8"],
            capsys, tmp_path / "in", f"weights file '{victim}'", "truncated or corrupt")


@pytest.mark.parametrize("subdir", ["report.json", "../x", "/tmp/abs", ".slimgraph-x"])
def test_save_hf_subdir_outside_or_reserved(inputs, tmp_path, capsys, subdir):
    refused(["compile", str(inputs / "single"), "-p", f"save-hf{{subdir={subdir}}}",
             "-o", str(tmp_path / "out")], capsys, inputs, "option 'subdir'", repr(subdir))
    assert not (tmp_path / "out").exists()


def test_inspect_meta_float_hidden_size(inputs, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    cfg = tmp_path / "in" / "cfg.json"
    shutil.copy(inputs / "config.json", cfg)
    edit_json(cfg, hidden_size=1e9)
    refused(["inspect", "--meta", f"hf-config:{cfg}"], capsys, tmp_path / "in",
            "hidden_size", "expected int")


def test_bench_seqlen_beyond_the_model(inputs, capsys):
    refused(["bench", str(inputs / "single"), "--seqlen", "16,100000", "--runs", "1",
             "--warmup", "0", "--no-progress"], capsys, inputs,
            "--seqlen 100000", "2048 positions")


# --------------------------------------------------------------------------- item 8


def test_yaml_alias_bomb_refused(inputs, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    bomb = tmp_path / "in" / "bomb.yaml"
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, cur in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{cur}: &{cur} [" + ", ".join([f"*{prev}"] * 9) + "]")
    lines.append("pipeline: [*i]")
    bomb.write_text("\n".join(lines) + "\n")
    assert bomb.stat().st_size < 1024
    refused(["compile", str(inputs / "single"), "-p", str(bomb), "-o", str(tmp_path / "out")],
            capsys, tmp_path / "in", str(bomb), "anchors and aliases")


def test_oversized_pipeline_file_refused(inputs, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    big = tmp_path / "in" / "big.yaml"
    big.write_text("pipeline:\n" + "  - save-hf\n" * 100_000)
    refused(["compile", str(inputs / "single"), "-p", str(big), "-o", str(tmp_path / "out")],
            capsys, tmp_path / "in", str(big), "larger than")


@pytest.mark.parametrize("meta", [True, False])
def test_absurd_layer_count_refused(inputs, tmp_path, capsys, meta):
    (tmp_path / "in").mkdir()
    cfg = tmp_path / "in" / "cfg.json"
    shutil.copy(inputs / "config.json", cfg)
    edit_json(cfg, num_hidden_layers=10_000_000)
    refused(["inspect", f"hf-config:{cfg}"] + (["--meta"] if meta else []), capsys,
            tmp_path / "in", "num_hidden_layers=10000000", f"at most {model_folder.MAX_LAYERS}")


def test_huge_hidden_size_refused_before_allocating(inputs, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    cfg = tmp_path / "in" / "cfg.json"
    shutil.copy(inputs / "config.json", cfg)
    edit_json(cfg, hidden_size=10**9, vocab_size=10**6)  # >= 4e15 bytes: no machine has it
    refused(["inspect", f"hf-config:{cfg}"], capsys, tmp_path / "in", str(cfg),
            "memory available", "--meta")


def test_model_beyond_available_memory_refused(inputs, tmp_path, capsys, monkeypatch):
    """The estimate is compared with the memory available (here: pretend 64 KiB; the tiny model needs ~230 KB)."""
    monkeypatch.setattr(model_folder, "available_memory", lambda: 1 << 16)
    before = digest(inputs)
    refused(["inspect", str(inputs / "single")], capsys, inputs, "memory available",
            "single/config.json")
    assert digest(inputs) == before
    assert main(["inspect", "--meta", str(inputs / "single"), "--json"]) == 0  # meta: no check
    assert json.loads(capsys.readouterr().out)["groups"]


def test_estimate_is_a_lower_bound_of_the_real_count():
    model = zoo.build("llama")
    params, _ = model_folder.estimate_parameters(model.config)
    assert 0 < params <= sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- item 10


@pytest.fixture
def no_prompt(monkeypatch):
    """Fail the test if anything asks on the terminal."""
    def ask(*args, **kwargs):
        raise AssertionError(f"prompted: {args}")

    monkeypatch.setattr(builtins, "input", ask)


@pytest.mark.parametrize("where", ["config.json", "tokenizer_config.json"])
@pytest.mark.parametrize("command", ["inspect", "compile", "offload"])
def test_custom_code_refused_without_asking(inputs, tmp_path, capsys, no_prompt, where, command):
    model = copy_model(inputs, tmp_path, "single")
    auto_map = ({"AutoConfig": "evil.Config", "AutoModelForCausalLM": "evil.Model"}
                if where == "config.json" else {"AutoTokenizer": ["evil.Tok", None]})
    edit_json(model / where, auto_map=auto_map)
    (model / "evil.py").write_text("raise SystemExit('custom code ran')\n")
    if command == "inspect":
        argv = ["inspect", str(model)]
    else:
        argv = ["compile", str(model), "-p", f"{SPARSIFY},save-hf", "-o", str(tmp_path / "out"),
                "--calib-file", str(inputs / "calib.txt"), "--calib-samples", "2",
                "--calib-seqlen", "8"] + (["--offload"] if command == "offload" else [])
    refused(argv, capsys, tmp_path / "in", f"{where}' has an \"auto_map\"", "never runs")


def test_hf_config_with_auto_map_refused(inputs, tmp_path, capsys, no_prompt):
    (tmp_path / "in").mkdir()
    cfg = tmp_path / "in" / "cfg.json"
    shutil.copy(inputs / "config.json", cfg)
    edit_json(cfg, auto_map={"AutoConfig": "evil.Config"})
    refused(["inspect", "--meta", f"hf-config:{cfg}"], capsys, tmp_path / "in", "auto_map")


def test_eval_tokenizer_with_custom_code_refused(inputs, tmp_path, capsys, no_prompt):
    tok = tmp_path / "in" / "tok"
    shutil.copytree(inputs / "single", tok)
    edit_json(tok / "tokenizer_config.json", auto_map={"AutoTokenizer": ["evil.Tok", None]})
    refused(["eval", str(inputs / "single"), "--ppl", str(inputs / "calib.txt"), "--tokenizer",
             str(tok), "--seqlen", "8", "--windows", "1", "--no-progress"], capsys,
            tmp_path / "in", "auto_map")


def test_the_exact_size_from_a_weightless_build_is_checked_before_allocating(tmp_path, monkeypatch):
    """The config estimate is a lower bound; the model built on meta gives the exact size,
    checked against the memory available before the real model is allocated."""
    import slimgraph.frontends.model_folder as folder
    from slimgraph.errors import ModelLoadError
    from slimgraph.frontends.hf_build import build_from_config
    from tests import zoo

    config = zoo.build("llama").config
    exact = sum(p.numel() for p in zoo.build("llama").parameters()) * 4
    monkeypatch.setattr(folder, "available_memory", lambda: int(exact * 1.1))
    with pytest.raises(ModelLoadError, match="GiB of parameters, more than"):
        build_from_config(config, meta=False, dtype=torch.float32, label="tiny")
    monkeypatch.setattr(folder, "available_memory", lambda: exact * 2)
    assert sum(p.numel() for p in build_from_config(config, meta=False, dtype=torch.float32,
                                                     label="tiny").parameters()) * 4 == exact
