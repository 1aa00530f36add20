"""The command line starts without the heavy libraries: building the parser (what
`slimgraph --help` does) and `slimgraph passes [NAME]` import no PyTorch, transformers,
ONNX, ONNX Runtime or NumPy. Each check runs in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "onnx", "onnxruntime", "numpy")
REPORT = ("import sys; print(sorted(m for m in sys.modules if m.split('.')[0] in %r))" % (HEAVY,))


def heavy_modules_after(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\n{REPORT}"], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    return ast.literal_eval(out.strip().splitlines()[-1])


def test_building_the_parser_imports_no_heavy_library():
    assert heavy_modules_after("import slimgraph.cli, sys; slimgraph.cli._parser()") == []


@pytest.mark.parametrize("argv", [["passes"], ["passes", "sparsify"], ["passes", "export-onnx"]])
def test_passes_imports_no_heavy_library(argv):
    code = ("import contextlib, io, slimgraph.cli\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            f"    assert slimgraph.cli.main({argv!r}) == 0\n"
            "assert out.getvalue().strip()")
    assert heavy_modules_after(code) == []


def test_passes_lists_every_pass_with_its_class_summary():
    from slimgraph.passes import registry
    from slimgraph.passes.help import overview

    text = overview()
    for name in registry.names():
        assert f"{name}  " in text and registry.get(name).summary in text


def test_bench_help_is_the_bench_module_documentation():
    from slimgraph import bench
    from slimgraph.commands import bench as bench_cmd

    doc = bench.__doc__.split("\n", 2)[2].strip().replace("``", "").replace("**", "")
    assert bench_cmd.DESCRIPTION == doc


def test_version_and_compile_help_in_a_fresh_process():
    from slimgraph import __version__
    from slimgraph.passes import registry

    def run(*argv):
        r = subprocess.run([sys.executable, "-m", "slimgraph.cli", *argv], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return r.stdout

    assert run("--version").strip() == f"slimgraph {__version__}"
    assert ", ".join(registry.names()) in run("compile", "--help")
