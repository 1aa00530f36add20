"""An OUTDIR holds one compile's outputs: an earlier compile is refused without
--overwrite, replaced with it, and put back when the new compile fails."""

from __future__ import annotations

import json

import pytest

from slimgraph.cli import main
from tests import zoo


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("m") / "tiny-llama"
    zoo.build("llama").save_pretrained(d)
    return d


def _compile(tiny_dir, out, pipeline, *extra):
    return main(["compile", str(tiny_dir), "-p", pipeline, "-o", str(out), *extra])


def test_an_earlier_compile_is_refused_then_replaced(tiny_dir, tmp_path, capsys):
    out = tmp_path / "o"
    assert _compile(tiny_dir, out, "prune-structured{mlp=0.5},save-hf,export-onnx") == 0
    (out / "notes.txt").write_text("mine")
    before = (out / "report.json").read_bytes()
    capsys.readouterr()
    assert _compile(tiny_dir, out, "prune-structured{mlp=0.25},save-hf") == 2
    err = capsys.readouterr().err
    assert "holds an earlier compile" in err and "--overwrite" in err
    assert (out / "report.json").read_bytes() == before and (out / "model.onnx").is_file()
    # --overwrite: the earlier model.onnx (not written this time) goes, the user's file stays
    assert _compile(tiny_dir, out, "prune-structured{mlp=0.25},save-hf", "--overwrite") == 0
    report = json.loads((out / "report.json").read_text())
    assert report["pipeline"] == ["prune-structured{mlp=0.25}", "save-hf"]
    assert report["outputs"] == ["hf", "report.html", "report.json"]
    assert sorted(p.name for p in out.iterdir()) == ["hf", "notes.txt", "report.html", "report.json"]


def test_a_failed_overwrite_puts_the_earlier_compile_back(tiny_dir, tmp_path, capsys):
    out = tmp_path / "o"
    assert _compile(tiny_dir, out, "prune-structured{mlp=0.5},save-hf") == 0
    report = (out / "report.json").read_bytes()
    weights = (out / "hf" / "model.safetensors").read_bytes()
    # export-onnx writes model.onnx, then check-sparsity fails (nothing is 2:4)
    rc = _compile(tiny_dir, out, "prune-structured{mlp=0.25},save-hf,export-onnx,"
                  "check-sparsity{pattern=2:4}", "--overwrite")
    assert rc == 2 and "2:4 does not hold" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["hf", "report.html", "report.json"]
    assert (out / "report.json").read_bytes() == report
    assert (out / "hf" / "model.safetensors").read_bytes() == weights


def test_reports_without_an_outputs_list_are_read_from_their_files(tiny_dir, tmp_path):
    out = tmp_path / "o"
    assert _compile(tiny_dir, out, "prune-structured{mlp=0.5},save-hf,export-onnx") == 0
    report = json.loads((out / "report.json").read_text())
    del report["outputs"]  # as written before 2026-11-24
    (out / "report.json").write_text(json.dumps(report))
    assert _compile(tiny_dir, out, "prune-structured{mlp=0.5},save-hf", "--overwrite") == 0
    assert not (out / "model.onnx").exists()


def test_leftovers_and_files_are_named(tiny_dir, tmp_path, capsys):
    out = tmp_path / "o"
    assert _compile(tiny_dir, out, "prune-structured{mlp=0.5}") == 0
    (out / ".slimgraph-previous").mkdir()
    assert _compile(tiny_dir, out, "prune-structured{mlp=0.5}", "--overwrite") == 2
    assert "left from an interrupted compile" in capsys.readouterr().err
    f = tmp_path / "afile"
    f.write_text("x")
    assert _compile(tiny_dir, f, "prune-structured{mlp=0.5}") == 2
    assert "is a file" in capsys.readouterr().err
