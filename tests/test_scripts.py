"""The README's main job (scripts/main) asks for a pipeline slimgraph accepts."""

from __future__ import annotations

import subprocess
from pathlib import Path

from slimgraph.passes.pipeline import from_text_or_file

MAIN = Path(__file__).resolve().parents[1] / "scripts" / "main"


def _pipeline(*args: str) -> str:
    """What scripts/main sets PIPELINE to for ``args``: its own assignment lines, run by
    bash (a '}' inside "${1:-...}" once cut the default short)."""
    lines = [ln for ln in MAIN.read_text().splitlines()
             if ln.startswith(("DEFAULT_PIPELINE=", "PIPELINE="))]
    assert len(lines) == 2, lines
    script = "set -eu\n" + "\n".join(lines) + '\nprintf %s "$PIPELINE"\n'
    out = subprocess.run(["bash", "-c", script, "main", *args], capture_output=True,
                         text=True, check=True)
    return out.stdout


def test_default_pipeline_is_valid():
    text = _pipeline()
    passes = from_text_or_file(text)
    assert [p.name for p in passes] == ["prune-structured", "save-hf", "export-onnx"]
    prune = passes[0]
    assert (prune.heads, prune.mlp, prune.importance) == (0.33, 0.25, "act")


def test_an_argument_replaces_the_pipeline():
    assert _pipeline("prune-structured{mlp=0.5},export-onnx") == \
        "prune-structured{mlp=0.5},export-onnx"
