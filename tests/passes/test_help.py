"""`slimgraph passes [NAME]`: every pass listed; one pass's options, defaults and docs."""

from __future__ import annotations

import dataclasses

from slimgraph.cli import main
from slimgraph.passes import registry


def test_overview_lists_every_pass_with_its_summary(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    for name in registry.names():
        cls = registry.get(name)
        assert cls.summary and f"  {name}" in out and cls.summary in out


def test_one_pass_shows_every_option_with_its_default_and_the_docs(capsys):
    assert main(["passes", "sparsify"]) == 0
    out = capsys.readouterr().out
    cls = registry.get("sparsify")
    lines = out.splitlines()
    assert lines[0] == f"sparsify: {cls.summary}"
    for f in dataclasses.fields(cls):
        assert any(line.split()[:1] == [f.name] for line in lines), f.name
    assert "  reconstruct     bool               default false" in lines
    assert "  a               float              default 0.5" in lines
    assert "  sparsity        float | None       default (unset)" in lines
    assert "permute=mask-only" in out and "sparsify{score=ria,pattern=2:4}" in out


def test_every_pass_can_be_described(capsys):
    for name in registry.names():
        assert main(["passes", name]) == 0
        assert capsys.readouterr().out.startswith(f"{name}: ")


def test_unknown_pass_is_an_error_naming_the_known_ones(capsys):
    assert main(["passes", "prune"]) == 2
    err = capsys.readouterr().err
    assert "unknown pass 'prune'" in err and "prune-structured" in err
