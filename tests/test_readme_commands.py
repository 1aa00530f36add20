"""Every command of the README's examples runs as written (real model: the slow tier).

The fenced ``bash`` block under "## Examples" is read from README.md, its lines joined
where they end in a backslash, comments stripped, and each command run with bash in an
empty folder, with the project's virtualenv first on PATH (what ``. .venv/bin/activate``,
the block's first line, does). Each must exit 0; the outputs the block's later commands
read must exist, and ``eval`` must print a perplexity.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_example_commands(text: str) -> list[str]:
    """The commands of the first ``bash`` block after the "## Examples" heading."""
    section = text.split("\n## Examples", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands, current = [], ""
    for line in block.splitlines():
        line = re.sub(r"\s+#.*$", "", line) if not line.lstrip().startswith("#") else ""
        if not line.strip():
            continue
        current += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            commands.append(" ".join(current.split()))
            current = ""
    return commands


def test_the_example_block_is_read_whole():
    commands = readme_example_commands((ROOT / "README.md").read_text())
    assert commands[0] == ". .venv/bin/activate"
    assert any(c.startswith("slimgraph compile smollm2-135m -o out/mlp27 ") and "-p '" in c
               for c in commands)  # a continued line joined into one command
    assert all(not c.endswith("\\") and "#" not in c.split("'")[0] for c in commands)


@pytest.mark.slow  # compiles SmolLM2 four times (distillation, SparseGPT 2:4): ~15 minutes
def test_every_readme_example_runs_as_written(tmp_path):
    commands = readme_example_commands((ROOT / "README.md").read_text())
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    outputs = {}
    for cmd in commands:
        if cmd == ". .venv/bin/activate":
            continue  # the venv's bin is first on PATH already
        proc = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=3600)
        assert proc.returncode == 0, f"{cmd}\n{proc.stderr[-2000:]}"
        outputs[cmd] = proc.stdout
    for out in ("out/mlp27", "out/dense", "out/sg24"):
        assert (tmp_path / out / "report.json").is_file(), out
    assert (tmp_path / "out/mlp27/hf").is_dir() and (tmp_path / "out/sg24/model.trt.onnx").is_file()
    ppl = next(v for c, v in outputs.items() if c.startswith("slimgraph eval "))
    assert re.search(r"ppl \d+\.\d+ over 40 windows", ppl), ppl
