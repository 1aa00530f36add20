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
