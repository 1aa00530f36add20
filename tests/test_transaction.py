"""A compile is a transaction on OUTDIR: inputs untouched, outputs staged and committed
whole with report.json last, one compile per OUTDIR at a time, nothing loaded from OUTDIR
runs code, and non-finite models fail their checks."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slimgraph.cli import main
from slimgraph.outdir import JOURNAL, LOCK, STAGING_PREFIX, Transaction, unfinished
from tests import zoo

PIPE = "prune-structured{mlp=0.5},save-hf,export-onnx"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("m") / "tiny-llama"
    zoo.build("llama").save_pretrained(d)
    zoo.tiny_tokenizer().save_pretrained(d)
    return d


def digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (or of ``root`` itself)."""
    root = Path(root)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root) if p != root else p.name):
            hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def compile_(model, out, pipeline=PIPE, *extra):
    return main(["compile", str(model), "-p", pipeline, "-o", str(out), *extra])


def strict_json(path: Path) -> dict:
    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


def assert_complete(out: Path) -> dict:
    """``out`` holds one finished compile: a strict report whose outputs all exist,
    and no staging, journal or lock left."""
    report = strict_json(out / "report.json")
    for name in report["outputs"]:
        assert (out / name).exists(), name
    assert not list(out.glob(STAGING_PREFIX + "*")) and not (out / JOURNAL).exists()
    assert not (out / LOCK).exists()
    return report


# ---------------------------------------------------------------- 1. code execution


def test_a_planted_l0_checkpoint_is_not_unpickled(tiny_dir, tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "train.txt").write_text(zoo.tiny_text(400, seed=1))
    ck = tmp_path / "o" / "l0-checkpoint"
    ck.mkdir(parents=True)
    (ck / "l0.pt").write_bytes(pickle.dumps({"fingerprint": Exploit()}))
    pipe = f"l0{{target=0.3,steps=2,data={tmp_path / 'train.txt'},seqlen=32,prompt=none}},remove"
    assert compile_(tiny_dir, tmp_path / "o", pipe) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("slimgraph: error:")]
    assert len(errors) == 1 and "l0.pt" in errors[0] and "never unpickled" in errors[0]
    assert "Traceback" not in err
    assert not marker.exists()


# ---------------------------------------------------------------- 2. the input is safe


def test_an_outdir_overlapping_the_input_is_refused(tiny_dir, tmp_path, capsys):
    user = tmp_path / "userdir"
    (user / "hf").mkdir(parents=True)
    for f in tiny_dir.iterdir():
        (user / "hf" / f.name).write_bytes(f.read_bytes())
    (user / "mine.txt").write_text("keep me")
    before = digest(user)
    for out, how in ((user, "contains"), (user / "hf", "is"), (user / "hf" / "sub", "lies inside")):
        assert compile_(user / "hf", out, "prune-structured{mlp=0.5},save-hf") == 2
        err = capsys.readouterr().err
        assert f"{how} the input" in err and len(err.strip().splitlines()) == 1
    assert digest(user) == before and not (user / "hf" / "sub").exists()


def test_an_onnx_input_is_not_overwritten(tiny_dir, tmp_path, capsys):
    d = tmp_path / "d"
    assert compile_(tiny_dir, d, "export-onnx") == 0
    onnx_before = digest(d)
    os.remove(d / "report.json")  # a user's folder holding an ONNX model
    del onnx_before["report.json"]
    assert compile_(d / "model.onnx", d, "prune-structured{mlp=0.5},export-onnx") == 2
    assert "contains the input" in capsys.readouterr().err
    assert digest(d) == onnx_before


def test_files_slimgraph_did_not_write_are_never_replaced(tiny_dir, tmp_path, capsys):
    keep = tmp_path / "keep"
    (keep / "hf").mkdir(parents=True)
    (keep / "hf" / "weights.bin").write_bytes(b"the user's own")
    before = digest(keep)
    assert compile_(tiny_dir, keep, "prune-structured{mlp=0.5},save-hf") == 2
    err = capsys.readouterr().err
    assert "is in the way" in err and str(keep / "hf") in err
    assert digest(keep) == before and sorted(p.name for p in keep.iterdir()) == ["hf"]
    # a symlink of the user's named like an output is refused the same way (not followed)
    target = tmp_path / "elsewhere"
    target.mkdir()
    link = tmp_path / "l"
    link.mkdir()
    (link / "hf").symlink_to(target)
    assert compile_(tiny_dir, link, "prune-structured{mlp=0.5},save-hf") == 2
    assert "is in the way" in capsys.readouterr().err
    assert (link / "hf").is_symlink() and not any(target.iterdir())


@pytest.mark.parametrize("out, needle", [("", "is empty"), (" ", "is empty")])
def test_an_empty_outdir_is_refused(tiny_dir, tmp_path, capsys, monkeypatch, out, needle):
    monkeypatch.chdir(tmp_path)
    assert compile_(tiny_dir, out, "prune-structured{mlp=0.5}") == 2
    assert needle in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_an_outdir_below_a_file_is_refused(tiny_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert compile_(tiny_dir, tmp_path / "file" / "sub", "prune-structured{mlp=0.5}") == 2
    err = capsys.readouterr().err
    assert "'" + str(tmp_path / "file") + "' is a file" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- 3. failures leave nothing


def test_a_failed_check_leaves_no_output_and_no_outdir(tiny_dir, tmp_path, capsys):
    out = tmp_path / "new" / "o"
    assert compile_(tiny_dir, out, "prune-structured{mlp=0.5},save-hf,export-onnx{tolerance=0}") == 2
    assert "differs from PyTorch" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # created by the compile, removed again


def test_a_failed_overwrite_leaves_the_earlier_compile_byte_identical(tiny_dir, tmp_path, capsys):
    out = tmp_path / "o"
    assert compile_(tiny_dir, out, "prune-structured{mlp=0.25},save-hf") == 0
    (out / "mine.txt").write_text("mine")
    before = digest(out)
    assert compile_(tiny_dir, out, PIPE + "{tolerance=0}", "--overwrite") == 2
    capsys.readouterr()
    assert digest(out) == before
    assert_complete(out)


def test_report_lists_final_paths_and_is_strict_json(tiny_dir, tmp_path):
    out = tmp_path / "o"
    assert compile_(tiny_dir, out) == 0
    report = assert_complete(out)
    assert {"hf", "model.onnx", "report.json"} <= set(report["outputs"])
    for f in report["files"]:
        assert STAGING_PREFIX not in f and Path(f).exists(), f


def test_a_half_done_commit_is_undone_by_the_next_compile(tiny_dir, tmp_path, monkeypatch, capsys):
    """A commit killed between its renames (SIGKILL) is rolled back by the next compile:
    the compile before it is back, byte for byte."""
    out = tmp_path / "o"
    assert compile_(tiny_dir, out, "prune-structured{mlp=0.25},save-hf") == 0
    before = digest(out)
    real_rename = Path.rename
    calls = []

    def dying_rename(self, target):
        calls.append(self)
        if len(calls) == 3:  # report.json and hf aside, then the first new output
            raise SystemExit("killed")  # stands for SIGKILL: no clean-up runs
        return real_rename(self, target)

    tx = Transaction(out, overwrite=True)
    staging = tx.begin()
    (staging / "hf").mkdir()
    (staging / "hf" / "x").write_text("new")
    (staging / "model.onnx").write_text("new")
    monkeypatch.setattr(Path, "rename", dying_rename)
    with pytest.raises(SystemExit):
        tx.commit({"model": "m", "pipeline": [], "outputs": ["hf", "model.onnx", "report.json"]})
    monkeypatch.setattr(Path, "rename", real_rename)
    os.close(tx.lock_fd)  # the process died: its lock goes with it
    assert not (out / "report.json").exists() and unfinished(out)
    # eval / bench see no result in it, and the next compile repairs it first
    from slimgraph.evaluation import EvaluationError, locate_model

    with pytest.raises(EvaluationError, match="holds an unfinished compile"):
        locate_model(str(out), prefer="onnx")
    assert compile_(tiny_dir, out, "prune-structured{mlp=0.25},save-hf") == 2
    err = capsys.readouterr().err
    assert "undid the half-done commit" in err and "holds an earlier compile" in err
    assert digest(out) == before


# ---------------------------------------------------------------- 4. one compile at a time


def test_a_second_compile_into_a_locked_outdir_is_refused(tiny_dir, tmp_path, capsys):
    out = tmp_path / "o"
    tx = Transaction(out, overwrite=False)
    tx.begin()
    try:
        assert compile_(tiny_dir, out, "prune-structured{mlp=0.5},save-hf") == 2
        err = capsys.readouterr().err
        assert "being written by another compile" in err and f"pid {os.getpid()}" in err
    finally:
        tx.abort()
    assert not out.exists()


def _spawn(args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "slimgraph.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _wait_for(cond, proc, timeout=120.0):
    t0 = time.monotonic()
    while not cond():
        if proc.poll() is not None:
            return False
        if time.monotonic() - t0 > timeout:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)
    return True


def test_two_compiles_at_once_exactly_one_proceeds(tiny_dir, tmp_path):
    out = tmp_path / "o"
    procs = [_spawn(["compile", str(tiny_dir), "-p", p, "-o", str(out)])
             for p in ("prune-structured{mlp=0.5},save-hf", "prune-structured{mlp=0.25},export-onnx")]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    loser = next(err for rc, err in results if rc == 2)
    assert "another compile" in loser or "holds an earlier compile" in loser
    report = assert_complete(out)
    assert len(report["pipeline"]) == 2 and sorted(p.name for p in out.iterdir()) == \
        sorted(report["outputs"])


# ---------------------------------------------------------------- signals


@pytest.mark.parametrize("sig, point", [(signal.SIGINT, "hf staged"), (signal.SIGTERM, "hf staged"),
                                        (signal.SIGKILL, "hf staged"), (signal.SIGKILL, "locked")])
def test_a_signal_leaves_the_earlier_compile_or_an_unfinished_one(tiny_dir, tmp_path, sig, point):
    out = tmp_path / "o"
    assert compile_(tiny_dir, out, "prune-structured{mlp=0.25},save-hf") == 0
    before = digest(out)
    inputs = digest(tiny_dir)

    def reached():
        if point == "locked":
            return (out / LOCK).exists()
        return any((d / "hf" / "config.json").exists() for d in out.glob(STAGING_PREFIX + "*"))

    proc = _spawn(["compile", str(tiny_dir), "-p", PIPE, "-o", str(out), "--overwrite"])
    hit = _wait_for(reached, proc)
    if hit:
        proc.send_signal(sig)
    rc = proc.wait(timeout=300)
    err = proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    assert digest(tiny_dir) == inputs
    if not hit:  # finished before the point was seen: then it must be whole
        assert rc == 0, err
        assert_complete(out)
        return
    if sig == signal.SIGKILL:
        assert rc == -signal.SIGKILL
        # the next compile recognises the leftovers, cleans them, and keeps the result
        assert compile_(tiny_dir, out, "prune-structured{mlp=0.25},save-hf") == 2
    else:
        assert rc == 128 + sig, err
        assert "interrupted" in err and "Traceback" not in err
    assert digest(out) == before
    assert_complete(out)


# ---------------------------------------------------------------- 6. non-finite values


@pytest.fixture(scope="module")
def nan_dir(tmp_path_factory, tiny_dir):
    d = tmp_path_factory.mktemp("nan") / "m"
    d.mkdir()
    for f in tiny_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((d / "config.json").read_text())
    cfg["rms_norm_eps"] = float("nan")
    (d / "config.json").write_text(json.dumps(cfg))  # Python writes a bare NaN
    return d


@pytest.mark.parametrize("pipeline", ["export-onnx", "save-hf"])
def test_an_all_nan_model_fails_the_checks(nan_dir, tmp_path, capsys, pipeline):
    before = digest(nan_dir)
    assert compile_(nan_dir, tmp_path / "o", pipeline) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("slimgraph: error:")]
    assert len(errors) == 1 and "non-finite" in errors[0] and STAGING_PREFIX not in err
    assert not (tmp_path / "o").exists() and digest(nan_dir) == before


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
def test_option_values_must_be_finite(tiny_dir, tmp_path, capsys, value):
    assert compile_(tiny_dir, tmp_path / "o", f"export-onnx{{tolerance={value}}}") == 2
    err = capsys.readouterr().err
    assert "option 'tolerance'" in err and "finite" in err
    assert not (tmp_path / "o").exists()


def test_report_json_never_holds_nan(tmp_path):
    from slimgraph.io import atomic_write_json

    path = atomic_write_json(tmp_path / "r.json", {"a": float("nan"), "b": [1.0, float("inf")]})
    assert strict_json(path) == {"a": None, "b": [1.0, None]}


# ---------------------------------------------------------------- 9. files checked first


@pytest.mark.parametrize("args, needle", [
    (["--calib-file", "{tmp}/missing.txt"], "--calib-file: '{tmp}/missing.txt' does not exist"),
    (["-p", "l0{{steps=2,data={tmp}/nope.jsonl}},remove"], "option 'data': '{tmp}/nope.jsonl' does not exist"),
    (["-p", "sparsify{{score=wanda,sparsity=0.5,calib={tmp}/c.txt}}"], "option 'calib': '{tmp}/c.txt' does not exist"),
    (["--calib-samples", "0"], "--calib-samples must be a positive"),
    (["--calib-seqlen", "0"], "--calib-seqlen must be a positive"),
])
def test_bad_file_arguments_fail_before_loading(tmp_path, capsys, monkeypatch, args, needle):
    import slimgraph.frontends.loading as loading

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(loading, "load_model", no_load)
    args = [a.format(tmp=tmp_path) for a in args]
    if "-p" not in args:
        args = ["-p", "prune-structured{mlp=0.5,importance=act}", *args]
    rc = main(["compile", "hf-config:llama-2-7b", *args, "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and needle.format(tmp=tmp_path) in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_a_two_process_launch_writes_one_outdir(tiny_dir, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` (gloo on CPU): the helper process
    trains along but neither locks nor writes OUTDIR; the main process commits it."""
    (tmp_path / "train.txt").write_text(zoo.tiny_text(2000, seed=3))
    out = tmp_path / "o"
    launcher = Path(sys.executable).with_name("accelerate")
    proc = subprocess.run(
        [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "slimgraph.cli", "compile",
         str(tiny_dir), "-p", f"prune-structured{{mlp=0.5}},distill{{steps=4,batch=2,seqlen=32,"
         f"data={tmp_path / 'train.txt'}}},save-hf", "-o", str(out)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = assert_complete(out)
    assert [p["name"] for p in report["passes"]] == ["prune-structured", "distill", "save-hf"]


def test_an_interrupt_swallowed_by_a_library_still_stops_the_commit():
    """Ctrl-C that lands in code catching BaseException (an exporter's fallback) is
    remembered: the compile raises it again before committing."""
    from slimgraph.outdir import raise_if_interrupted, termination_as_interrupt

    with termination_as_interrupt():
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)  # the handler runs here
        except BaseException:  # noqa: BLE001 - what a careless library does
            pass
        with pytest.raises(KeyboardInterrupt):
            raise_if_interrupted()
    with termination_as_interrupt():  # a new run starts clean
        raise_if_interrupted()
