from __future__ import annotations

import pytest

from slimgraph.errors import PipelineError
from slimgraph.passes import registry
from slimgraph.passes.pipeline import build, from_text_or_file, parse


def test_parse_text_pipeline():
    assert parse("prune-structured{heads=0.33,mlp=0.5,importance=l2},export-onnx") == [
        ("prune-structured", {"heads": "0.33", "mlp": "0.5", "importance": "l2"}),
        ("export-onnx", {}),
    ]


def test_build_converts_typed_options_and_describes_them():
    (p, e) = build(parse("prune-structured{heads=0.33,mlp=0.5,round_to=8,protect=0 29},export-onnx"))
    assert p.heads == pytest.approx(0.33) and p.mlp == 0.5 and p.round_to == 8
    assert p.describe() == "prune-structured{heads=0.33,mlp=0.5,round_to=8,protect=0 29}"
    assert e.describe() == "export-onnx"
    assert "prune-structured" in registry.names() and "save-hf" in registry.names()


@pytest.mark.parametrize("text,message", [
    ("prune-structurd{mlp=0.5}", "unknown pass 'prune-structurd'"),
    ("prune-structured{mlp=0.5,colour=red}", "pass 'prune-structured': unknown option 'colour'"),
    ("prune-structured{mlp=1.0}", "pass 'prune-structured', option 'mlp': ratio 1.0 is outside [0, 1)"),
    ("prune-structured{heads=-0.1}", "option 'heads': ratio -0.1 is outside"),
    ("prune-structured{mlp=half}", "option 'mlp': 'half' is not a valid float"),
    ("prune-structured{mlp=0.5,importance=l3}", "option 'importance': 'l3' is not one of"),
    ("prune-structured{mlp=0.5,round_to=0}", "option 'round_to': must be >= 1"),
    ("prune-structured{mlp=0.5,protect=first}", "option 'protect': 'first' is not a layer"),
    ("prune-structured", "nothing to remove"),
    ("prune-structured{mlp=0.5", "unbalanced braces"),
    ("prune-structured{mlp}", "option 'mlp' is not KEY=VALUE"),
    ("export-onnx{filename=../x.onnx}", "option 'filename'"),
    ("", "empty pipeline"),
    ("export-onnx,,save-hf", "empty pass"),
])
def test_bad_pipelines_name_the_pass_and_option(text, message):
    with pytest.raises(PipelineError, match=message.replace("[", r"\[").replace("(", r"\(")
                       .replace(")", r"\)").replace("'", "'")):
        build(parse(text))


def test_yaml_and_toml_files(tmp_path):
    y = tmp_path / "p.yaml"
    y.write_text("pipeline:\n  - pass: prune-structured\n    mlp: 0.25\n  - export-onnx\n")
    t = tmp_path / "p.toml"
    t.write_text('[[pipeline]]\npass = "prune-structured"\nheads = 0.5\n\n[[pipeline]]\npass = "save-hf"\n')
    a = from_text_or_file(str(y))
    assert [p.name for p in a] == ["prune-structured", "export-onnx"] and a[0].mlp == 0.25
    b = from_text_or_file(str(t))
    assert [p.name for p in b] == ["prune-structured", "save-hf"] and b[0].heads == 0.5
    bad = tmp_path / "bad.yaml"
    bad.write_text("pipeline: [\n")
    with pytest.raises(PipelineError, match="bad.yaml"):
        from_text_or_file(str(bad))


# --------------------------------------------------------------------------- PassManager

from dataclasses import dataclass  # noqa: E402
from typing import ClassVar  # noqa: E402

from slimgraph.errors import VerificationError  # noqa: E402
from slimgraph.passes.base import CompileState, Pass, PassResult  # noqa: E402
from slimgraph.passes.pipeline import PassManager  # noqa: E402


@dataclass
class _BreakShape(Pass):
    """Claims a parameter has a shape its weight does not have (an IR a buggy pass leaves)."""

    name: ClassVar[str] = "test-break-shape"
    modified: bool = True

    def run(self, state):
        v = next(iter(state.graph.params.values()))
        v.shape = tuple(v.shape[:-1]) + (v.shape[-1] + 1,)
        return PassResult(modified=self.modified, report={"broke": v.name})


@dataclass
class _ReturnsNothing(Pass):
    name: ClassVar[str] = "test-returns-nothing"

    def run(self, state):
        return None


@pytest.fixture
def tiny_state():
    from slimgraph.frontends.build import graph_of
    from slimgraph.frontends.loading import wrap_module
    from tests import zoo

    loaded = wrap_module(zoo.build("llama"))
    return CompileState(loaded=loaded, graph=graph_of(loaded))


def test_verifier_runs_after_a_modifying_pass_and_names_it(tiny_state):
    with pytest.raises(VerificationError, match=r"after pass 'test-break-shape'.*IR shape"):
        PassManager([_BreakShape()]).run(tiny_state)


def test_no_verify_and_unmodified_results_skip_the_verifier(tiny_state):
    [rec] = PassManager([_BreakShape()], verify=False).run(tiny_state)
    assert rec.modified and rec.report["broke"]
    # a pass that says it changed nothing is not verified (its result flag is trusted)
    [rec] = PassManager([_BreakShape(modified=False)]).run(tiny_state)
    assert rec.modified is False


def test_print_after_prints_the_ir_and_rejects_unknown_passes(tiny_state):
    out: list[str] = []
    PassManager([_BreakShape()], verify=False, print_after={"test-break-shape"},
                printer=out.append).run(tiny_state)
    assert len(out) == 1 and out[0].startswith("// IR after test-break-shape")
    with pytest.raises(PipelineError, match="--print-after names passes not in the pipeline"):
        PassManager([_BreakShape()], print_after={"export-onnx"})


def test_a_pass_must_return_a_pass_result(tiny_state):
    with pytest.raises(TypeError, match="test-returns-nothing returned NoneType"):
        PassManager([_ReturnsNothing()]).run(tiny_state)


def test_library_errors_are_named_by_the_pass_that_raised_them():
    from slimgraph.passes.pipeline import name_error
    from slimgraph.structured.selection import NothingToPruneError

    # raised in check_options by a helper that does not know the pass
    with pytest.raises(PipelineError) as info:
        build(parse("prune-structured{mlp=0.5,protect=first}"))
    assert str(info.value).startswith("pass 'prune-structured', option 'protect': 'first'")
    cases = [(PipelineError("option 'mlp': bad"), "pass 'p', option 'mlp': bad"),
             (PipelineError("needs an output directory"), "pass 'p' needs an output directory"),
             (PipelineError("no linear could be pruned"), "pass 'p': no linear could be pruned"),
             (PipelineError("pass 'p': already named"), "pass 'p': already named")]
    for error, message in cases:
        name_error("p", error)
        assert str(error) == message
    # the error keeps its type and fields (callers branch on them, not on the text)
    e = NothingToPruneError("option 'mlp': the model has no mlp groups", "mlp", "no-groups")
    name_error("prune-structured", e)
    assert isinstance(e, NothingToPruneError) and (e.kind, e.reason) == ("mlp", "no-groups")
    assert str(e) == "pass 'prune-structured', option 'mlp': the model has no mlp groups"
