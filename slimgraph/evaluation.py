"""Perplexity evaluation: the protocol of docs/benchmark-protocol.md, used by ``slimgraph eval``.

Protocol: tokenize the evaluation text without special tokens (no BOS), cut the token list
into non-overlapping windows of ``seqlen`` tokens from its start, keep the first
``windows`` of them, score each window on its own (mean NLL of tokens 1..L-1 given their
prefix: the usual causal-LM shift) and report ``exp(mean over windows of the window mean
NLL)``. Logits are taken in float32 and log-softmaxed in float32; the NLL is averaged in
float64.

Pieces, usable on their own:

- :func:`read_text`: read a text file the protocol's way (CRLF -> LF).
- :func:`perplexity`: the protocol over any ``logits_fn(ids[1, L]) -> logits[1, L, V]``.
- :func:`torch_logits_fn` / :func:`onnx_logits_fn`: such functions for a PyTorch module
  or an ONNX file (ONNX Runtime).
- :func:`resolve_model`: what ``slimgraph eval MODEL`` evaluates (any ``load_model`` spec,
  or a compile output directory with ``hf/`` and/or ``model.onnx``) and with which
  tokenizer.

The ``eval`` subcommand (its options and output) is :mod:`slimgraph.commands.eval`.
"""

from __future__ import annotations

import inspect
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimgraph.backends.ort_session import providers as ort_providers
from slimgraph.frontends.loading import TOKENIZER_FILES
from slimgraph.frontends.model_folder import refuse_custom_code_in
from slimgraph.errors import SlimgraphError
from slimgraph.outdir import unfinished
from slimgraph.protocol import BACKENDS, DEFAULT_SEQLEN, DEFAULT_WINDOWS

__all__ = [
    "EvaluationError",
    "EvalModel",
    "onnx_logits_fn",
    "perplexity",
    "read_text",
    "locate_model",
    "resolve_model",
    "resolve_tokenizer",
    "tokenize",
    "torch_logits_fn",
]


LogitsFn = Callable[[np.ndarray], Any]


class EvaluationError(SlimgraphError):
    """Evaluation cannot run: bad text, too little text, no tokenizer, bad backend..."""


# --------------------------------------------------------------------------- text


def read_text(path: str | Path) -> str:
    """Read a UTF-8 text file with newlines normalised to LF (the protocol's way).

    Raises :class:`EvaluationError` when the file is missing, unreadable, not UTF-8, or
    empty (only whitespace counts as empty).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise EvaluationError(f"text file '{path}' does not exist")
    if p.is_dir():
        raise EvaluationError(f"text file '{path}' is a directory")
    try:
        with open(p, newline="", encoding="utf-8") as f:
            text = f.read().replace("\r\n", "\n")
    except UnicodeDecodeError as exc:
        raise EvaluationError(f"text file '{path}' is not UTF-8 text ({exc.reason})") from exc
    except OSError as exc:
        raise EvaluationError(f"cannot read text file '{path}': {_one_line(exc)}") from exc
    if not text.strip():
        raise EvaluationError(f"text file '{path}' is empty")
    return text


def tokenize(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (no BOS/EOS), in one call."""
    try:
        enc = tokenizer(text, add_special_tokens=False, verbose=False)
    except TypeError:  # a tokenizer-like callable without ``verbose``
        enc = tokenizer(text, add_special_tokens=False)
    ids = enc["input_ids"]
    if ids and isinstance(ids[0], list):  # batched answer for a single text
        ids = ids[0]
    return [int(i) for i in ids]


# --------------------------------------------------------------------------- perplexity


def perplexity(
    logits_fn: LogitsFn,
    tokens: Sequence[int] | np.ndarray,
    seqlen: int = DEFAULT_SEQLEN,
    windows: int = DEFAULT_WINDOWS,
    progress: bool = True,
    *,
    prompt_tokens: Sequence[int] | np.ndarray | None = None,
) -> dict[str, Any]:
    """Perplexity of ``logits_fn`` over the first ``windows`` windows of ``tokens``.

    Window ``i`` is ``tokens[i*seqlen:(i+1)*seqlen]``; only full windows count. When the
    text holds fewer than ``windows`` full windows, all of them are used and the count is
    reported (``windows`` in the result; ``windows_requested`` is what was asked). Fewer
    than one full window is an error.

    Each window is fed alone as ``ids`` of shape ``[1, L]`` (int64) and ``logits_fn`` must
    return logits of shape ``[1, L, V]`` (numpy array or torch tensor). The window's score
    is the mean NLL of tokens 1..L-1, each predicted from the logits one position earlier.

    ``prompt_tokens``: prepended to every window (``ids`` is then ``[1, P + L]``) and never
    scored. The scored tokens stay the same L-1 tokens of each window, so the figure is
    directly comparable with the prompt-free one; only their context grows.

    Returns ``{"ppl", "windows", "seqlen", "tokens", "nll_per_window", "seconds",
    "tokens_per_s", "mean_nll", "windows_requested", "tokens_available",
    "prompt_tokens"}``: ``tokens`` counts the evaluated text tokens (windows × seqlen),
    ``tokens_per_s`` the tokens fed to the model (prompt included) per second of
    ``logits_fn`` + scoring time.
    """
    seqlen, windows = int(seqlen), int(windows)
    if seqlen < 2:
        raise EvaluationError(f"seqlen must be at least 2 (one token to predict), got {seqlen}")
    if windows < 1:
        raise EvaluationError(f"windows must be at least 1, got {windows}")
    toks = np.asarray(tokens, dtype=np.int64).reshape(-1)
    prompt = np.asarray(
        [] if prompt_tokens is None else prompt_tokens, dtype=np.int64
    ).reshape(-1)
    available = len(toks) // seqlen
    if available < 1:
        raise EvaluationError(
            f"the text has {len(toks)} tokens, fewer than one window of {seqlen} tokens "
            "(use a longer text or a smaller --seqlen)"
        )
    used = min(windows, available)
    p = len(prompt)

    nlls: list[float] = []
    t0 = time.perf_counter()
    with progress_bar(used, enabled=progress) as advance:
        for w in range(used):
            window = toks[w * seqlen : (w + 1) * seqlen]
            ids = np.concatenate([prompt, window])[None, :] if p else window[None, :].copy()
            logits = _as_logits(logits_fn(ids), ids.shape[1])
            nlls.append(_window_nll(logits[p : p + seqlen - 1], window[1:]))
            advance(ids.shape[1])
    seconds = time.perf_counter() - t0

    mean_nll = float(np.mean(np.asarray(nlls, dtype=np.float64)))
    fed = used * (p + seqlen)
    return {
        "ppl": _exp(mean_nll),
        "windows": used,
        "seqlen": seqlen,
        "tokens": used * seqlen,
        "nll_per_window": nlls,
        "seconds": seconds,
        "tokens_per_s": fed / seconds if seconds > 0 else float("inf"),
        "mean_nll": mean_nll,
        "windows_requested": windows,
        "tokens_available": int(len(toks)),
        "prompt_tokens": p,
    }


def _as_logits(out: Any, length: int) -> torch.Tensor:
    """``logits_fn``'s answer as a float32 ``[L, V]`` tensor (shape checked)."""
    if isinstance(out, (list, tuple)) and out and not np.isscalar(out[0]):
        out = out[0]
    t = out if isinstance(out, torch.Tensor) else torch.as_tensor(np.asarray(out))
    shape = tuple(t.shape)
    if t.dim() == 3 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 2 or t.shape[0] != length or t.shape[1] < 1:
        raise EvaluationError(
            f"the model returned logits of shape {list(shape)} for input of shape [1, {length}]"
            f" (expected [1, {length}, vocab])"
        )
    return t.detach().to(torch.float32)


def _window_nll(logits: torch.Tensor, targets: np.ndarray) -> float:
    """Mean NLL of ``targets[i]`` under ``logits[i]`` (fp32 ``[T, V]``): log-softmax in
    float32 (a float64 one moves the mean NLL by ~1e-8 for 2.5x the time), NLL gathered and
    averaged in float64."""
    vocab = logits.shape[-1]
    top = int(targets.max())
    if top >= vocab or int(targets.min()) < 0:
        raise EvaluationError(
            f"token id {top} is outside the model's {vocab} logits: the tokenizer does not "
            "match the model (check --tokenizer)"
        )
    tgt = torch.as_tensor(targets, dtype=torch.long, device=logits.device)
    logp = torch.log_softmax(logits, dim=-1)
    nll = -logp.gather(-1, tgt[:, None]).squeeze(-1).to(torch.float64)
    return float(nll.mean().item())


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return float("inf")


class progress_bar:  # noqa: N801 - used like a function
    """A rich progress bar on stderr (steps done, tokens/s); a no-op when disabled. Entering
    it gives ``advance(tokens)``, called once per step."""

    def __init__(self, total: int, *, enabled: bool, label: str = "perplexity",
                 unit: str = "windows") -> None:
        self.total, self.enabled, self.label, self.unit = total, enabled, label, unit
        self._progress: Any = None
        self._tokens = 0
        self._t0 = 0.0

    def __enter__(self) -> Callable[[int], None]:
        if self.enabled:
            try:
                from rich.console import Console
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    Progress,
                    TextColumn,
                    TimeElapsedColumn,
                    TimeRemainingColumn,
                )

                self._progress = Progress(
                    TextColumn(self.label),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TextColumn(self.unit),
                    TimeElapsedColumn(),
                    TextColumn("eta"),
                    TimeRemainingColumn(),
                    TextColumn("{task.fields[rate]}"),
                    console=Console(stderr=True),
                    transient=True,
                )
                self._task = self._progress.add_task("eval", total=self.total, rate="")
                self._progress.start()
            except Exception:  # noqa: BLE001 - a progress bar must never break an evaluation
                self._progress = None
        self._t0 = time.perf_counter()
        return self._advance

    def _advance(self, tokens: int) -> None:
        if self._progress is None:
            return
        self._tokens += tokens
        dt = time.perf_counter() - self._t0
        rate = f"{self._tokens / dt:,.0f} tok/s" if dt > 0 else ""
        self._progress.update(self._task, advance=1, rate=rate)

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.stop()


# --------------------------------------------------------------------------- backends


def torch_logits_fn(model: torch.nn.Module, *, threads: int | None = None) -> LogitsFn:
    """``logits_fn`` for a PyTorch causal LM: ``model(input_ids=ids, use_cache=False).logits``
    under ``torch.no_grad()``, on the model's device.

    ``threads``: when given, sets ``torch.set_num_threads(threads)`` (a process-wide
    setting); by default torch's threading is left alone.
    """
    if threads is not None:
        if threads < 1:
            raise EvaluationError(f"threads must be at least 1, got {threads}")
        torch.set_num_threads(int(threads))
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    kwargs = {"use_cache": False} if _accepts(model, "use_cache") else {}

    def logits_fn(ids: np.ndarray) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(ids, dtype=np.int64), device=device)
        with torch.no_grad():
            out = model(input_ids=x, **kwargs)
        logits = getattr(out, "logits", None)
        if logits is None:
            logits = out[0] if isinstance(out, (tuple, list)) else out
        return logits

    return logits_fn


def _accepts(model: torch.nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def onnx_logits_fn(
    path: str | Path,
    *,
    threads: int | None = None,
    providers: Sequence[str] | None = None,
) -> LogitsFn:
    """``logits_fn`` for an ONNX causal LM run with ONNX Runtime.

    The token ids go to the input whose name contains ``input_ids`` (else the first input),
    cast to its integer type; an ``attention_mask`` input gets ones and a ``position_ids``
    input gets ``0..L-1``. Logits are the output named ``logits``, else the first output.
    ``threads`` sets the session's intra-op threads; ``providers`` defaults to
    :func:`slimgraph.backends.ort_session.providers`.
    """
    import onnxruntime as ort

    p = Path(path).expanduser()
    if not p.is_file():
        raise EvaluationError(f"ONNX model '{path}' does not exist")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads is not None:
        if threads < 1:
            raise EvaluationError(f"threads must be at least 1, got {threads}")
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    try:
        sess = ort.InferenceSession(
            str(p), sess_options=opts, providers=list(providers or ort_providers())
        )
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise EvaluationError(f"cannot load ONNX model '{path}': {_one_line(exc)}") from exc

    inputs = sess.get_inputs()
    if not inputs:
        raise EvaluationError(f"ONNX model '{path}' has no inputs")
    ids_in = next((i for i in inputs if "input_ids" in i.name), inputs[0])
    extra: dict[str, Callable[[int], np.ndarray]] = {}
    for inp in inputs:
        if inp is ids_in:
            continue
        dtype = _ORT_INT_TYPES.get(inp.type, np.int64)
        if "attention_mask" in inp.name:
            extra[inp.name] = lambda n, dt=dtype: np.ones((1, n), dtype=dt)
        elif "position_ids" in inp.name:
            extra[inp.name] = lambda n, dt=dtype: np.arange(n, dtype=dt)[None, :]
        else:
            raise EvaluationError(
                f"ONNX model '{path}' needs input '{inp.name}', which eval cannot feed "
                "(export the model with use_cache=False and input_ids only)"
            )
    if ids_in.type not in _ORT_INT_TYPES:
        raise EvaluationError(
            f"ONNX model '{path}': input '{ids_in.name}' is {ids_in.type}, not token ids"
        )
    ids_dtype = _ORT_INT_TYPES[ids_in.type]
    outputs = [o.name for o in sess.get_outputs()]
    out_name = "logits" if "logits" in outputs else outputs[0]

    def logits_fn(ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids).astype(ids_dtype, copy=False)
        feed = {ids_in.name: ids}
        for name, make in extra.items():
            feed[name] = make(ids.shape[1])
        return sess.run([out_name], feed)[0]

    logits_fn.session = sess  # type: ignore[attr-defined]  # for callers who want to look
    return logits_fn


_ORT_INT_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}


# --------------------------------------------------------------------------- resolution


@dataclass
class EvalModel:
    """What ``slimgraph eval MODEL`` evaluates."""

    spec: str  # what the user typed
    backend: str  # "torch" | "onnx"
    source: str  # the file/directory/spec actually run
    logits_fn: LogitsFn
    tokenizer: Any
    max_positions: int | None  # from the config, when known


_WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json")


def _has_weights(d: Path) -> bool:
    return (d / "config.json").is_file() and any(any(d.glob(g)) for g in _WEIGHT_GLOBS)


def _has_tokenizer_files(d: Path) -> bool:
    return d.is_dir() and any((d / name).is_file() for name in TOKENIZER_FILES)


def _tokenizer_from_dir(d: Path) -> Any:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    refuse_custom_code_in(d)  # a tokenizer with its own code (auto_map) is never run
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(str(d), local_files_only=True,
                                             trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types
        raise EvaluationError(f"cannot load the tokenizer in '{d}': {_one_line(exc)}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)


def resolve_tokenizer(spec: str) -> Any:
    """A tokenizer from ``--tokenizer SPEC``: a directory with tokenizer files (an HF
    directory, a compile output directory), or any :func:`load_model` spec that carries a
    tokenizer (e.g. ``smollm2-135m``)."""
    from slimgraph.frontends.loading import load_model

    path = Path(spec).expanduser()
    if path.is_dir() and _has_tokenizer_files(path):
        return _tokenizer_from_dir(path)
    if path.is_file() and path.suffix.lower() == ".onnx":
        if _has_tokenizer_files(path.parent):
            return _tokenizer_from_dir(path.parent)
        raise EvaluationError(f"--tokenizer '{spec}': no tokenizer files next to this ONNX file")
    loaded = load_model(spec, verbose=False)
    if loaded.tokenizer is None:
        raise EvaluationError(f"--tokenizer '{spec}' has no tokenizer")
    return loaded.tokenizer


@dataclass
class ModelLocation:
    """Where the runnable forms of a model spec are (see :func:`locate_model`)."""

    spec: str
    backend: str  # "torch" | "onnx": the one chosen
    torch_spec: str | None  # a load_model spec for the PyTorch form, if any
    onnx_file: Path | None
    hf_dir: Path | None
    tok_dirs: list[Path]  # where tokenizer files may be, in order


def locate_model(spec: str, backend: str = "auto", *, prefer: str = "torch") -> ModelLocation:
    """Find what to run for ``spec``: anything :func:`~slimgraph.frontends.loading.load_model`
    accepts, a ``.onnx`` file, or a compile output directory holding ``hf/`` and/or
    ``model.onnx``. ``backend="auto"`` takes ``prefer`` when the spec has that form, else
    the other; an explicit backend the spec lacks is an error naming the spec."""
    if backend not in BACKENDS:
        raise EvaluationError(f"unknown backend '{backend}' (choose from {', '.join(BACKENDS)})")
    path = Path(spec).expanduser()
    hf_dir: Path | None = None
    onnx_file: Path | None = None
    tok_dirs: list[Path] = []
    torch_spec: str | None = None

    if path.is_dir():
        why = unfinished(path)
        if why:  # an interrupted compile's leftovers are not a model
            raise EvaluationError(f"{why}: it holds no result to run")
        if (path / "hf" / "config.json").is_file():
            hf_dir = path / "hf"
        elif _has_weights(path):
            hf_dir = path
        if (path / "model.onnx").is_file():
            onnx_file = path / "model.onnx"
        if hf_dir is None and onnx_file is None:
            torch_spec = spec  # let load_model say what is wrong with it
        else:
            torch_spec = str(hf_dir) if hf_dir is not None else None
        tok_dirs = [path] + ([hf_dir] if hf_dir is not None and hf_dir != path else [])
    elif path.is_file() and path.suffix.lower() == ".onnx":
        onnx_file = path
        tok_dirs = [path.parent]
    else:
        torch_spec = spec  # alias, .gguf, hf-config:..., or a path load_model will reject

    if backend == "auto":
        if prefer == "onnx":
            backend = "onnx" if onnx_file is not None else "torch"
        else:
            backend = "torch" if torch_spec is not None else "onnx"
    if backend == "torch" and torch_spec is None:
        raise EvaluationError(
            f"--backend torch needs a PyTorch model, but '{spec}' has none "
            "(a compile output directory needs hf/; or use --backend onnx)"
        )
    if backend == "onnx" and onnx_file is None:
        raise EvaluationError(
            f"--backend onnx needs an ONNX model, but '{spec}' is neither a .onnx file nor "
            "a directory with model.onnx"
        )
    return ModelLocation(spec, backend, torch_spec, onnx_file, hf_dir, tok_dirs)


def resolve_model(
    spec: str,
    *,
    backend: str = "auto",
    tokenizer: str | None = None,
    threads: int | None = None,
) -> EvalModel:
    """Resolve ``slimgraph eval MODEL`` into a backend, a ``logits_fn`` and a tokenizer.

    ``spec`` is anything :func:`~slimgraph.frontends.loading.load_model` accepts, or a
    compile output directory holding ``hf/`` (an HF checkpoint) and/or ``model.onnx`` with
    the tokenizer files beside it. ``backend``: ``auto`` runs ``hf/`` (or a PyTorch spec)
    with PyTorch and ``model.onnx`` (or a ``.onnx`` file) with ONNX Runtime. The tokenizer
    is ``tokenizer`` (a :func:`resolve_tokenizer` spec) when given, else the model's own,
    else the one in the model's directory.
    """
    from slimgraph.frontends.loading import load_model

    loc = locate_model(spec, backend)

    tok = resolve_tokenizer(tokenizer) if tokenizer else None
    max_positions: int | None = None
    if loc.backend == "torch":
        loaded = load_model(loc.torch_spec, verbose=False)
        if loaded.model is None:
            raise EvaluationError(f"'{spec}' is not a PyTorch model (use --backend onnx)")
        if tok is None:
            tok = loaded.tokenizer
        max_positions = positions_of_config(loaded.config)
        fn = torch_logits_fn(loaded.model, threads=threads)
        source = loc.torch_spec
    else:
        if loc.hf_dir is not None:
            max_positions = positions_of_config_file(loc.hf_dir / "config.json")
        fn = onnx_logits_fn(loc.onnx_file, threads=threads)
        source = str(loc.onnx_file)
    if tok is None:
        for d in loc.tok_dirs:
            if _has_tokenizer_files(d):
                tok = _tokenizer_from_dir(d)
                break
    if tok is None:
        where = f" (none in {loc.tok_dirs[0]})" if loc.tok_dirs else ""
        raise EvaluationError(
            f"no tokenizer found for '{spec}'{where}: pass --tokenizer SPEC "
            "(a tokenizer directory or a model spec such as smollm2-135m)"
        )
    return EvalModel(spec, loc.backend, source, fn, tok, max_positions)


def positions_of_config(config: Any) -> int | None:
    """The longest input the model takes, from a config object or a config dict."""
    for name in ("max_position_embeddings", "n_positions"):
        if isinstance(config, dict):
            value = config.get(name)
        else:
            value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def positions_of_config_file(path: Path) -> int | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return positions_of_config(data) if isinstance(data, dict) else None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    first = text.splitlines()[0].strip()
    return first if len(first) <= 300 else first[:297] + "..."
