"""``slimgraph eval MODEL --tasks``: lm-eval tasks on a tiny model, with a local 5-item
multiple-choice task in lm-eval's format (a task YAML and a JSONL file)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from slimgraph.cli import main
from tests import zoo

ITEMS = [
    {"q": "w1 w2 w3", "choices": ["w4", "w5", "w6", "w7"], "label": 0},
    {"q": "w8 w9", "choices": ["w10", "w11", "w12", "w13"], "label": 1},
    {"q": "w14 w15 w16 w17", "choices": ["w18", "w19", "w20", "w21"], "label": 2},
    {"q": "w22", "choices": ["w23", "w24", "w25", "w26"], "label": 3},
    {"q": "w27 w28 w29", "choices": ["w30 w31", "w32", "w33 w34", "w35"], "label": 0},
]

TASK_YAML = """\
task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{q}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    data = d / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in ITEMS), encoding="utf-8")
    (d / "tiny_mc.yaml").write_text(
        TASK_YAML.format(data=data, cache=tmp_path_factory.mktemp("hf-datasets")),
        encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("m") / "tiny-llama"
    zoo.build("llama").save_pretrained(d)
    zoo.tiny_tokenizer().save_pretrained(d)
    return d


def _eval_json(capsys, model, task_dir, *extra) -> dict:
    rc = main(["eval", str(model), "--tasks", "tiny_mc", "--tasks-path", str(task_dir),
               "--json", "--no-progress", *extra])
    assert rc == 0
    return json.loads(capsys.readouterr().out)


def _hand_accuracy(model, tok) -> float:
    """The task by hand: the choice whose tokens (after "question choice") have the
    highest summed log-probability, as lm-eval scores a multiple_choice task."""
    right = 0
    for item in ITEMS:
        ctx = tok(item["q"], add_special_tokens=False)["input_ids"]
        scores = []
        for choice in item["choices"]:
            whole = tok(item["q"] + " " + choice, add_special_tokens=False)["input_ids"]
            cont = whole[len(ctx):]
            with torch.no_grad():
                logits = model(torch.tensor([whole[:-1]])).logits[0].float()
            logp = torch.log_softmax(logits, dim=-1)[len(ctx) - 1:]
            scores.append(sum(logp[i, t].item() for i, t in enumerate(cont)))
        right += int(max(range(len(scores)), key=scores.__getitem__) == item["label"])
    return right / len(ITEMS)


def test_dense_model_reports_accuracy_lm_eval_agrees_with_hand(dense_dir, task_dir, capsys):
    pytest.importorskip("lm_eval")
    obj = _eval_json(capsys, dense_dir, task_dir)
    entry = obj["tasks"]["tiny_mc"]
    acc = entry["metrics"]["acc"]
    assert 0.0 <= acc <= 1.0
    assert entry["samples"] == len(ITEMS) and obj["backend"] == "torch"
    model = zoo.build("llama")
    assert acc == pytest.approx(_hand_accuracy(model, zoo.tiny_tokenizer()))

    # the text form: one line per task, --limit takes fewer documents
    rc = main(["eval", str(dense_dir), "--tasks", "tiny_mc", "--tasks-path", str(task_dir),
               "--limit", "3", "--no-progress"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"{dense_dir} [torch] tiny_mc: acc ") and "(3 samples)" in lines[0]


def test_compile_output_reports_accuracy(dense_dir, task_dir, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    out = tmp_path / "out"
    assert main(["compile", str(dense_dir), "-p", "prune-structured{mlp=0.5},save-hf",
                 "-o", str(out)]) == 0
    capsys.readouterr()
    obj = _eval_json(capsys, out, task_dir)
    assert obj["source"] == str(out / "hf")
    acc = obj["tasks"]["tiny_mc"]["metrics"]["acc"]
    assert 0.0 <= acc <= 1.0 and obj["tasks"]["tiny_mc"]["samples"] == len(ITEMS)
    # the pruned model that ran is the compile output's (half the MLP channels)
    from slimgraph.tasks import load_for_tasks

    model, _, _ = load_for_tasks(str(out))
    assert model.model.layers[0].mlp.up_proj.out_features == zoo.INTER // 2


def _one_line_error(capsys, argv) -> str:
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


def test_unknown_task_is_one_line_exit_2(dense_dir, task_dir, capsys):
    pytest.importorskip("lm_eval")
    line = _one_line_error(capsys, ["eval", str(dense_dir), "--tasks", "tiny_mcq",
                                    "--tasks-path", str(task_dir), "--no-progress"])
    assert "unknown task 'tiny_mcq'" in line and "tiny_mc" in line.split("did you mean")[1]


def test_without_lm_eval_says_pip_install(dense_dir, task_dir, capsys, monkeypatch):
    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ModuleNotFoundError
    line = _one_line_error(capsys, ["eval", str(dense_dir), "--tasks", "tiny_mc",
                                    "--tasks-path", str(task_dir)])
    assert "pip install lm_eval" in line


def test_bad_tasks_path_and_missing_mode_are_one_line(dense_dir, tmp_path, capsys):
    line = _one_line_error(capsys, ["eval", str(dense_dir), "--tasks", "tiny_mc",
                                    "--tasks-path", str(tmp_path / "nowhere")])
    assert "--tasks-path" in line and "does not exist" in line
    (tmp_path / "empty").mkdir()
    line = _one_line_error(capsys, ["eval", str(dense_dir), "--tasks", "tiny_mc",
                                    "--tasks-path", str(tmp_path / "empty")])
    assert "no task .yaml files" in line
    # one of --ppl / --tasks, not both: argparse's usage error, exit 2
    for argv in (["eval", str(dense_dir)], ["eval", str(dense_dir), "--ppl", "wikitext2",
                                            "--tasks", "tiny_mc"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and "--ppl" in err and "--tasks" in err
