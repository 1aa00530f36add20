"""The README's main job (scripts/main -> scripts/main_job.py) asks for a pipeline
slimgraph accepts, and passes its arguments through."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from slimgraph.passes.pipeline import from_text_or_file

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _main_job():
    spec = importlib.util.spec_from_file_location("main_job", SCRIPTS / "main_job.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_default_pipeline_is_valid_and_recovers():
    passes = from_text_or_file(_main_job().PIPELINE)
    assert [p.name for p in passes] == ["prune-structured", "save-hf", "export-onnx"]
    prune = passes[0]
    assert (prune.mlp, prune.importance) == (0.27, "act")
    assert prune.reconstruct is not False  # the refit is on whenever there is calibration text


def test_scripts_main_hands_its_arguments_to_the_job():
    text = (SCRIPTS / "main").read_text()
    assert 'exec .venv/bin/python scripts/main_job.py "$@"' in text and "scripts/setup" in text


def test_an_argument_replaces_the_pipeline(monkeypatch):
    job = _main_job()
    calls = []

    def fake_run(args, *, capture=False):
        calls.append(args)
        raise SystemExit(0)  # stop after the first command

    monkeypatch.setattr(job, "run", fake_run)
    try:
        job.main(["prune-structured{mlp=0.5},export-onnx", "--calib-samples", "8"])
    except SystemExit:
        pass
    compile_args = calls[0]
    assert compile_args[1:3] == ["compile", "smollm2-135m"]
    assert compile_args[compile_args.index("-p") + 1] == "prune-structured{mlp=0.5},export-onnx"
    assert compile_args[compile_args.index("--calib-samples") + 1] == "8"
