"""Zero-shot task evaluation through lm-eval (EleutherAI's lm-evaluation-harness).

``slimgraph eval MODEL --tasks NAME[,NAME]`` lands here. The model is loaded by slimgraph
(so a compile output whose ``hf/`` has per-layer sizes loads with slimgraph's own loader)
and handed to lm-eval as an already-built ``HFLM``; lm-eval builds the prompts, scores
the choices and aggregates the metrics. lm-eval is an optional dependency
(``pip install lm_eval``, or ``pip install 'slimgraph[tasks]'``), imported only here and
only when a task runs.

Pieces:

- :func:`split_tasks`: ``"a, b"`` -> ``["a", "b"]``.
- :func:`task_manager`: an lm-eval ``TaskManager`` that knows the names asked for
  (a local ``--tasks-path`` folder alone when it holds them all: no scan of lm-eval's
  thousands of built-in task files).
- :func:`run_tasks`: run tasks on a model object and a tokenizer; returns plain metrics.
- :func:`load_for_tasks`: the PyTorch model and tokenizer of an ``eval`` MODEL spec.
- :func:`task_lines`: one line of text per task.
- :func:`cmd_tasks`: the ``--tasks`` branch of ``slimgraph eval``.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from slimgraph.errors import SlimgraphError

__all__ = [
    "TaskEvalError",
    "cmd_tasks",
    "load_for_tasks",
    "run_tasks",
    "split_tasks",
    "task_lines",
    "task_manager",
]

INSTALL_HINT = "pip install lm_eval (or pip install 'slimgraph[tasks]')"
DEFAULT_BATCH_SIZE = 8


class TaskEvalError(SlimgraphError):
    """Task evaluation cannot run: lm-eval missing, unknown task, bad task folder..."""


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    first = text.splitlines()[0].strip().strip("'\"")
    return first if len(first) <= 300 else first[:297] + "..."


def _import_lm_eval() -> Any:
    try:
        import lm_eval
        import lm_eval.tasks  # noqa: F401 - the TaskManager
    except ModuleNotFoundError as exc:
        if exc.name is not None and exc.name.split(".")[0] == "lm_eval":
            raise TaskEvalError(f"task evaluation needs lm-eval, which is not installed: "
                                f"{INSTALL_HINT}") from None
        raise TaskEvalError(f"lm-eval does not import (missing {exc.name}): reinstall it "
                            f"with {INSTALL_HINT}") from exc
    return lm_eval


def split_tasks(text: str) -> list[str]:
    """Task names from ``--tasks``: comma-separated, blanks ignored, duplicates dropped."""
    names: list[str] = []
    for part in text.split(","):
        name = part.strip()
        if name and name not in names:
            names.append(name)
    if not names:
        raise TaskEvalError(f"--tasks '{text}' names no task")
    return names


def _include_dir(include_path: str | Path) -> Path:
    path = Path(include_path).expanduser()
    if not path.exists():
        raise TaskEvalError(f"--tasks-path '{include_path}' does not exist")
    if path.is_file():
        if path.suffix.lower() not in (".yaml", ".yml"):
            raise TaskEvalError(f"--tasks-path '{include_path}' is neither a folder nor a task "
                                ".yaml file")
        path = path.parent
    if not any(path.rglob("*.yaml")) and not any(path.rglob("*.yml")):
        raise TaskEvalError(f"--tasks-path '{include_path}' holds no task .yaml files")
    return path


def task_manager(names: list[str], include_path: str | Path | None = None) -> Any:
    """An lm-eval ``TaskManager`` that knows every name in ``names``: the tasks of the
    ``include_path`` folder alone when they are all there, else those and lm-eval's
    built-in tasks. An unknown name is an error naming it (and the closest known ones)."""
    lm_eval = _import_lm_eval()
    TaskManager = lm_eval.tasks.TaskManager
    folder = _include_dir(include_path) if include_path is not None else None
    tm = None
    if folder is not None:
        try:
            tm = TaskManager(include_path=str(folder), include_defaults=False)
        except Exception as exc:  # noqa: BLE001 - lm-eval raises many types on bad YAML
            raise TaskEvalError(f"cannot read the tasks in '{include_path}': "
                                f"{_one_line(exc)}") from exc
        if not all(name in tm.all_tasks for name in names):
            tm = None
    if tm is None:
        try:
            tm = TaskManager(include_path=str(folder) if folder is not None else None)
        except Exception as exc:  # noqa: BLE001
            raise TaskEvalError(f"cannot index lm-eval's tasks: {_one_line(exc)}") from exc
    unknown = [name for name in names if name not in tm.all_tasks]
    if unknown:
        name = unknown[0]
        close = difflib.get_close_matches(name, tm.all_tasks, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        where = f"lm-eval's tasks or in '{include_path}'" if include_path else "lm-eval's tasks"
        raise TaskEvalError(f"unknown task '{name}': not in {where}{hint}")
    return tm


def _load_tasks(tm: Any, names: list[str]) -> list[Any]:
    """The Task / Group objects of ``names``, loaded (datasets included) up front, so that
    a task whose data cannot be had fails with one line naming it."""
    objects: list[Any] = []
    for name in names:
        try:
            loaded = tm.load([name])
        except Exception as exc:  # noqa: BLE001 - dataset download, YAML, templates...
            raise TaskEvalError(f"cannot load task '{name}': {_one_line(exc)}") from exc
        if name in loaded["groups"]:
            objects.append(loaded["groups"][name])
        elif name in loaded["tasks"]:
            objects.append(loaded["tasks"][name])
        else:  # a tag: its tasks
            objects.extend(loaded["tasks"].values())
    return objects


def _metrics(entry: dict[str, Any]) -> dict[str, float | None]:
    """``{"acc,none": 0.2, "acc_stderr,none": "N/A"}`` -> ``{"acc": 0.2, "acc_stderr": None}``;
    a filter other than ``none`` stays in the name (``exact_match,strict-match``)."""
    out: dict[str, float | None] = {}
    for key, value in entry.items():
        if "," not in key:
            continue  # name, alias, sample_len
        metric, _, filt = key.partition(",")
        name = metric if filt == "none" else key
        out[name] = float(value) if isinstance(value, (int, float)) else None
    return out


@contextlib.contextmanager
def _quiet(progress: bool):
    """lm-eval and datasets log at INFO/WARNING and draw progress bars; keep warnings
    that matter (ERROR), and with ``progress=False`` no bars either."""
    loggers = [logging.getLogger(name) for name in ("lm_eval", "datasets")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        if progress:
            yield
        else:
            with contextlib.redirect_stderr(io.StringIO()):
                yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def run_tasks(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    include_path: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Run lm-eval ``tasks`` (zero-shot, as their configs say) on ``model`` (a transformers
    causal LM, already loaded) with ``tokenizer``.

    ``include_path``: a folder (or a task .yaml in it) of task configs in lm-eval's format.
    ``limit``: at most this many documents per task. Returns ``{"tasks": {name:
    {"metrics": {metric: value}, "samples": n}}, "lm_eval_version": ...}``; a metric
    lm-eval gives no value for (e.g. a stderr over one sample) is None.
    """
    if limit is not None and limit < 1:
        raise TaskEvalError(f"--limit must be a positive integer, got {limit}")
    lm_eval = _import_lm_eval()
    from lm_eval.models.huggingface import HFLM

    t0 = time.perf_counter()
    with _quiet(progress):
        tm = task_manager(list(tasks), include_path)
        objects = _load_tasks(tm, list(tasks))
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = lm_eval.simple_evaluate(
            model=lm, tasks=objects, task_manager=tm, limit=limit, batch_size=batch_size,
            log_samples=False, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
        )  # fmt: skip
    if out is None:  # not rank 0 of a distributed run: nothing to report
        raise TaskEvalError("lm-eval returned no results")
    samples = out.get("n-samples", {})
    result: dict[str, Any] = {}
    for name, entry in out["results"].items():
        result[name] = {
            "metrics": _metrics(entry),
            "samples": samples.get(name, {}).get("effective", entry.get("sample_len")),
            "n_shot": out.get("n-shot", {}).get(name),
        }
    return {
        "tasks": result,
        "limit": limit,
        "seconds": time.perf_counter() - t0,
        "lm_eval_version": getattr(lm_eval, "__version__", None),
    }


def task_lines(result: dict[str, Any]) -> list[str]:
    """``hellaswag: acc 0.2891 ± 0.0045, acc_norm 0.3052 ± 0.0046 (10042 samples)``."""
    lines = []
    for name, entry in result["tasks"].items():
        metrics = entry["metrics"]
        parts = []
        for metric, value in metrics.items():
            base, _, filt = metric.partition(",")
            if base.endswith("_stderr"):
                continue
            text = f"{metric} {value:.4f}" if value is not None else f"{metric} n/a"
            err = metrics.get(f"{base}_stderr" + (f",{filt}" if filt else ""))
            if value is not None and err is not None:
                text += f" ± {err:.4f}"
            parts.append(text)
        n = entry.get("samples")
        tail = f" ({n} samples)" if n is not None else ""
        lines.append(f"{name}: {', '.join(parts) or 'no metrics'}{tail}")
    return lines


# --------------------------------------------------------------------------- model


def load_for_tasks(spec: str, tokenizer: str | None = None) -> tuple[Any, Any, str]:
    """``(model, tokenizer, source)`` for ``slimgraph eval MODEL --tasks``: a PyTorch
    model from anything ``load_model`` accepts, or from the ``hf/`` of a compile output
    directory (per-layer sizes load with slimgraph's loader). The tokenizer is
    ``tokenizer`` (a folder with tokenizer files or a model spec), else the model's own,
    else the one in the compile output directory."""
    from slimgraph.frontends.loading import load_model, try_tokenizer
    from slimgraph.outdir import unfinished

    path = Path(spec).expanduser()
    source = spec
    tok_dirs: list[Path] = []
    if path.is_file() and path.suffix.lower() == ".onnx":
        raise TaskEvalError(f"--tasks runs the PyTorch model, and '{spec}' is an ONNX file "
                            "(give its compile output directory or HF checkpoint)")
    if path.is_dir():
        why = unfinished(path)
        if why:
            raise TaskEvalError(f"{why}: it holds no result to run")
        if (path / "hf" / "config.json").is_file():
            source = str(path / "hf")
            tok_dirs = [path]
        elif (path / "model.onnx").is_file() and not (path / "config.json").is_file():
            raise TaskEvalError(f"--tasks runs the PyTorch model, and '{spec}' has only "
                                "model.onnx (compile with save-hf for an hf/ folder)")
    loaded = load_model(source, verbose=False)
    if loaded.model is None:
        raise TaskEvalError(f"'{spec}' is not a PyTorch model")
    tok = None
    if tokenizer:
        tpath = Path(tokenizer).expanduser()
        if tpath.is_dir():
            tok = try_tokenizer(tpath)
        else:
            tok = load_model(tokenizer, verbose=False).tokenizer
        if tok is None:
            raise TaskEvalError(f"--tokenizer '{tokenizer}' has no tokenizer")
    if tok is None:
        tok = loaded.tokenizer
    for d in tok_dirs:
        if tok is None:
            tok = try_tokenizer(d)
    if tok is None:
        raise TaskEvalError(f"no tokenizer found for '{spec}': pass --tokenizer SPEC "
                            "(a tokenizer directory or a model spec such as smollm2-135m)")
    return loaded.model, tok, source


# --------------------------------------------------------------------------- CLI


def cmd_tasks(args: Any) -> int:
    """The ``--tasks`` branch of ``slimgraph eval``: a line per task, or a JSON object."""
    names = split_tasks(args.tasks)
    if getattr(args, "backend", "auto") == "onnx":
        raise TaskEvalError("--tasks runs the PyTorch model; --backend onnx is for --ppl")
    include_path = getattr(args, "tasks_path", None)
    if include_path is not None:
        _include_dir(include_path)  # fail fast, before loading a model
    _import_lm_eval()
    progress = not getattr(args, "no_progress", False)
    threads = getattr(args, "threads", None)
    if threads:
        import torch

        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model, tok, source = load_for_tasks(args.model, getattr(args, "tokenizer", None))
    load_s = time.perf_counter() - t0
    result = run_tasks(model, tok, names, include_path, getattr(args, "limit", None),
                       getattr(args, "batch_size", None) or DEFAULT_BATCH_SIZE,
                       progress=progress)
    if getattr(args, "json", False):
        obj = {"model": args.model, "backend": "torch", "source": source, **result,
               "load_seconds": load_s, "threads": threads}
        json.dump(obj, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        for line in task_lines(result):
            print(f"{args.model} [torch] {line}")
    return 0
