"""The WikiText-2 texts shipped with slimgraph: present, attributed, usable by name."""

from __future__ import annotations

import json

from slimgraph.cli import main
from slimgraph.data import TEXTS, packaged_text, resolve_text
from tests import zoo


def test_shipped_texts_exist_with_their_licence():
    for name, path in TEXTS.items():
        assert path.is_file() and path.stat().st_size > 100_000, name
        text = path.read_text(encoding="utf-8")
        assert "\r\n" not in text and " = " in text  # WikiText headings, LF endings
    readme = (packaged_text("wikitext2").parent / "README.md").read_text()
    assert "Attribution-ShareAlike 3.0" in readme and "Merity" in readme
    assert resolve_text("not-a-name.txt") == "not-a-name.txt" and resolve_text(None) is None


def test_a_compile_reads_the_shipped_calibration_text_by_name(tmp_path):
    d = tmp_path / "m"
    zoo.build("llama").save_pretrained(d)
    zoo.tiny_tokenizer().save_pretrained(d)
    out = tmp_path / "o"
    assert main(["compile", str(d), "-p", "prune-structured{mlp=0.5,importance=act,samples=2,"
                 "seqlen=16}", "-o", str(out), "--calib-file", "wikitext2-calib"]) == 0
    text = (out / "report.json").read_text()
    assert str(packaged_text("wikitext2-calib")) in text
    assert json.loads(text)["parameters"]["after"] < json.loads(text)["parameters"]["before"]
