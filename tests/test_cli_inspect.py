"""`slimgraph inspect` end to end on tiny models, and its one-line errors (exit 2)."""

from __future__ import annotations

import json

import pytest

from slimgraph.cli import main
from slimgraph.errors import TraceError
from slimgraph.frontends.torch_export import trace
from tests import zoo


@pytest.fixture()
def tiny_llama_dir(tmp_path):
    m = zoo.build("llama")
    d = tmp_path / "tiny-llama"
    m.save_pretrained(d)
    return d


def test_inspect_json_has_groups(tiny_llama_dir, capsys):
    assert main(["inspect", str(tiny_llama_dir), "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    kinds = [(g["kind"], g["layer"], g["units"], g["prunable"]) for g in obj["groups"]]
    assert ("heads", 0, zoo.KV, True) in kinds and ("mlp", 1, zoo.INTER, True) in kinds
    assert ("hidden", None, zoo.HIDDEN, True) in kinds
    assert ("qheads", 0, zoo.HEADS // zoo.KV, True) in kinds
    for g in obj["groups"]:
        assert {"kind", "layer", "units", "prunable", "reason", "members"} <= set(g)
        assert g["kind"] in {"heads", "qheads", "mlp", "hidden", "channels"}
        assert (g["reason"] is None) == g["prunable"]
    assert "aten.cumsum.default" in obj["ops"]["unhandled"]


def test_inspect_tables_ops_and_dot(tiny_llama_dir, tmp_path, capsys):
    dot = tmp_path / "g.dot"
    assert main(["inspect", str(tiny_llama_dir), "--ops", "--all", "--dot", str(dot)]) == 0
    out = capsys.readouterr().out
    assert "channel groups" in out and "kv-group (2 q heads)" in out
    assert "ops without a channel rule" in out and "aten.cumsum.default" in out
    text = dot.read_text()
    assert text.startswith('digraph "LlamaForCausalLM"') and "->" in text
    assert "#f4a261" in text  # a heads-coloured linear


def test_inspect_meta_config(tmp_path, capsys):
    cfg = tmp_path / "cfg.json"
    zoo.build("mistral").config.to_json_file(cfg)
    assert main(["inspect", f"hf-config:{cfg}", "--meta", "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["summary"]["prunable_by_kind"] == {"heads": 2, "qheads": 2, "mlp": 2, "hidden": 1}


@pytest.mark.parametrize("make,needle", [
    (lambda p: str(p / "nope"), "does not exist"),
    (lambda p: _write(p / "bad.onnx", b"\x08\x07garbage-not-a-model" * 3), "bad.onnx"),
    (lambda p: "hf-config:" + _write(p / "c.json", b"{not json"), "c.json"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, make, needle):
    assert main(["inspect", make(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("slimgraph: error: ") and needle in err[-1]


def test_example_inputs_that_do_not_fit():
    m = zoo.build("gpt2")  # 64 positions
    import torch

    with pytest.raises(TraceError, match="could not trace GPT2LMHeadModel"):
        trace(m, (torch.zeros(1, 5, 3),), {"use_cache": False})  # float, wrong rank


def test_seq_too_long_from_cli(tmp_path, capsys):
    d = tmp_path / "gpt2"
    zoo.build("gpt2").save_pretrained(d)
    assert main(["inspect", str(d), "--seq", "100"]) == 2
    assert "sequence length 100 exceeds the model's" in capsys.readouterr().err


def _write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("name,approximate", [("gpt2", True), ("gemma3", False)])
def test_hidden_under_layer_norm_is_flagged_approximate(tmp_path, capsys, name, approximate):
    """LayerNorm's mean moves when hidden channels go, RMSNorm is corrected exactly: the
    JSON and the table say which."""
    cfg = tmp_path / "config.json"
    zoo.build(name).config.to_json_file(cfg)
    assert main(["inspect", f"hf-config:{cfg}", "--meta", "--json"]) == 0
    groups = json.loads(capsys.readouterr().out)["groups"]
    (hidden,) = [g for g in groups if g["kind"] == "hidden"]
    assert hidden["prunable"] and hidden["approximate"] is approximate
    assert not any(g["approximate"] for g in groups if g["kind"] in ("heads", "mlp"))
    assert main(["inspect", f"hf-config:{cfg}", "--meta"]) == 0
    assert ("approximately (LayerNorm" in capsys.readouterr().out) is approximate
