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


def test_compile_prune_save_and_report(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["compile", str(tiny_dir), "-p", "prune-structured{heads=0.5,mlp=0.5},save-hf",
               "-o", str(out), "--time-passes", "--print-after", "prune-structured"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "// IR after prune-structured{heads=0.5,mlp=0.5}" in text and "pass " in text
    report = json.loads((out / "report.json").read_text())
    assert [p["name"] for p in report["passes"]] == ["prune-structured", "save-hf"]
    assert report["passes"][0]["modified"] is True and report["passes"][1]["modified"] is False
    assert all(isinstance(p["seconds"], float) for p in report["passes"])
    assert report["parameters"]["after"] < report["parameters"]["before"]
    assert report["after"]["params"]["mlp"] == report["before"]["params"]["mlp"] // 2
    assert (out / "hf" / "model.safetensors").exists()
    # the output reloads and inspects: 1 KV-group left per layer, 48 MLP channels
    assert main(["inspect", str(out / "hf"), "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert {(g["kind"], g["units"]) for g in obj["groups"] if g["kind"] == "mlp"} == {("mlp", 48)}


def test_compile_query_heads_reloads_with_plain_transformers(tiny_dir, tmp_path, capsys):
    """qheads=0.5: one of the 2 query heads of each KV-group goes; 2 KV heads stay."""
    import transformers

    out = tmp_path / "out"
    assert main(["compile", str(tiny_dir), "-p", "prune-structured{qheads=0.5},save-hf",
                 "-o", str(out)]) == 0
    cfg = json.loads((out / "hf" / "config.json").read_text())
    assert cfg["num_attention_heads"] == zoo.HEADS // 2 and cfg["num_key_value_heads"] == zoo.KV
    assert cfg["slimgraph"]["loader"] == "transformers"
    plain = transformers.LlamaForCausalLM.from_pretrained(out / "hf").eval()
    assert plain.model.layers[0].self_attn.q_proj.out_features == zoo.KV * zoo.HEAD_DIM
    capsys.readouterr()
    assert main(["inspect", str(out / "hf"), "--all", "--json"]) == 0
    groups = json.loads(capsys.readouterr().out)["groups"]
    assert not [g for g in groups if g["kind"] == "qheads"]  # one query head per group left


@pytest.mark.parametrize("pipeline,needle", [
    ("prune-structured{mlp=1.5}", "option 'mlp': ratio 1.5 is outside [0, 1)"),
    ("prune-structured{qheads=1}", "option 'qheads': ratio 1.0 is outside [0, 1)"),
    ("frobnicate", "unknown pass 'frobnicate'"),
    ("prune-structured{heads=0.9}", "would remove all 2 units"),
])
def test_compile_bad_pipeline_exit_2(tiny_dir, tmp_path, capsys, pipeline, needle):
    out = tmp_path / "o"
    assert main(["compile", str(tiny_dir), "-p", pipeline, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("slimgraph: error: ") and needle in err
    assert not (out / "report.json").exists()


def test_inspect_diff_after_compile(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compile", str(tiny_dir), "-p", "prune-structured{mlp=0.25},save-hf",
                 "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["inspect", "--diff", str(tiny_dir), str(out / "hf"), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["parameters"]["b"] < d["parameters"]["a"]
    changed = {r["param"]: (r["a"], r["b"]) for r in d["changed_shapes"]}
    assert changed["model.layers.0.mlp.gate_proj.weight"] == ([96, 64], [72, 64])
    assert changed["model.layers.1.mlp.down_proj.weight"] == ([64, 96], [64, 72])
    assert len(changed) == 6
    mlp = [g for g in d["changed_groups"] if g["kind"] == "mlp"]
    assert [(g["units_a"], g["units_b"]) for g in mlp] == [(96, 72), (96, 72)]
    assert main(["inspect", "--diff", str(tiny_dir), str(out / "hf")]) == 0
    assert "groups that changed (2)" in capsys.readouterr().out


def test_no_verify_skips_the_verifier(tiny_dir, tmp_path, monkeypatch, capsys):
    import slimgraph.ir.verifier as verifier
    from slimgraph.errors import VerificationError

    def refuse(graph):
        raise VerificationError("verifier ran")

    monkeypatch.setattr(verifier, "verify", refuse)
    pipeline = "prune-structured{mlp=0.5}"
    assert main(["compile", str(tiny_dir), "-p", pipeline, "-o", str(tmp_path / "a")]) == 2
    assert "verifier ran" in capsys.readouterr().err
    assert main(["compile", str(tiny_dir), "-p", pipeline, "-o", str(tmp_path / "b"),
                 "--no-verify"]) == 0
