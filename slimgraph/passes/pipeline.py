"""Pipelines as text, and the manager that runs them.

Syntax: passes separated by commas, options in braces::

    prune-structured{heads=0.33,mlp=0.5,importance=l2},export-onnx

A pipeline can also come from a YAML or TOML file: a list ``pipeline`` of entries,
each a pass name or a mapping ``{pass: NAME, OPTION: VALUE, ...}``. The file must be
UTF-8 and at most 1 MiB; YAML anchors and aliases are refused (an alias "bomb" of a few
bytes expands to gigabytes).

Cross-cutting concerns are instruments of the manager, not code inside passes:
verification between passes (on by default), IR dumps after chosen passes, timing.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
import typing
from pathlib import Path
from typing import Any, Callable

from slimgraph.errors import PipelineError, SlimgraphError, VerificationError
from slimgraph.frontends.text_files import read_utf8
from slimgraph.passes import registry
from slimgraph.passes.base import CompileState, Pass, PassResult


def _split_top(text: str, sep: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "{[(":
            depth += 1
        elif ch in "}])":
            depth -= 1
            if depth < 0:
                raise PipelineError(f"unbalanced '{ch}' in pipeline {text!r}")
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise PipelineError(f"unbalanced braces in pipeline {text!r}")
    parts.append("".join(cur))
    return [p.strip() for p in parts]


_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def _check_name(name: Any) -> None:
    """Pass names are quoted plainly in every later message: refuse any other text."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise PipelineError(f"unknown pass {name!r}; known passes: {', '.join(registry.names())}")


def parse(text: str) -> list[tuple[str, dict[str, str]]]:
    """Text -> [(pass name, {option: raw string})]."""
    if not text or not text.strip():
        raise PipelineError("empty pipeline")
    out = []
    for item in _split_top(text.strip(), ","):
        if not item:
            raise PipelineError(f"empty pass in pipeline {text!r}")
        name, brace, rest = item.partition("{")
        name = name.strip()
        _check_name(name)
        opts: dict[str, str] = {}
        if brace:
            if not rest.endswith("}"):
                raise PipelineError(f"pass '{name}': options must end with '}}'")
            body = rest[:-1].strip()
            for kv in _split_top(body, ",") if body else []:
                key, eq, val = kv.partition("=")
                if not eq or not key.strip():
                    raise PipelineError(f"pass '{name}': option {kv!r} is not KEY=VALUE")
                if not _NAME.fullmatch(key.strip()):
                    raise PipelineError(f"pass '{name}': {key.strip()!r} is not an option name")
                if key.strip() in opts:
                    raise PipelineError(f"pass '{name}': option '{key.strip()}' given twice")
                opts[key.strip()] = val.strip()
        out.append((name, opts))
    return out


MAX_FILE_BYTES = 1 << 20


def _safe_yaml(raw: str, path: Path) -> Any:
    """``yaml.safe_load`` without anchors and aliases."""
    import yaml

    class NoAliasLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                line = event.start_mark.line + 1
                raise PipelineError(f"pipeline file '{path}', line {line}: YAML anchors and "
                                    "aliases (&name, *name) are not allowed")
            return super().compose_node(parent, index)

    loader = NoAliasLoader(raw)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def load_file(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    path = Path(path)
    raw = read_utf8(path, "pipeline file", PipelineError, max_bytes=MAX_FILE_BYTES)
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(raw)
        else:
            data = _safe_yaml(raw, path)
    except PipelineError:
        raise
    except Exception as e:
        msg = " ".join(str(e).split())[:300]
        raise PipelineError(f"pipeline file '{path}' is not valid {path.suffix[1:]}: {msg}") from e
    steps = data.get("pipeline") if isinstance(data, dict) else data
    if not isinstance(steps, list) or not steps:
        raise PipelineError(f"pipeline file '{path}' needs a non-empty list 'pipeline'")
    out = []
    for step in steps:
        if isinstance(step, str):
            out.extend(parse(step))
        elif isinstance(step, dict) and "pass" in step:
            opts = {k: v for k, v in step.items() if k != "pass"}
            out.append((str(step["pass"]), opts))
        else:
            raise PipelineError(f"pipeline file '{path}': bad entry {step!r}")
    return out


def _convert(p: type, field: dataclasses.Field, raw: Any) -> Any:
    hints = typing.get_type_hints(p)
    typ = hints.get(field.name, str)
    args = typing.get_args(typ)
    base = typing.get_origin(typ)
    if base in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if isinstance(raw, str) and raw.lower() in ("none", "null", ""):
            return None
        typ = next(a for a in args if a is not type(None))
        base = typing.get_origin(typ)
    name = f"pass '{p.name}', option '{field.name}'"
    try:
        if typ is bool:
            if isinstance(raw, bool):
                return raw
            low = str(raw).lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError
            return int(raw)
        if typ is float:
            value = float(raw)
            if not math.isfinite(value):  # nan would switch a tolerance check off
                tname = "finite number"
                raise PipelineError(f"{name}: {raw!r} is not a {tname}")
            return value
        if base is list or typ is list:
            if isinstance(raw, list):
                return [str(x) for x in raw]
            return [s.strip() for s in str(raw).strip("[]").split(";" if ";" in str(raw) else " ")
                    if s.strip()]
        return str(raw)
    except (TypeError, ValueError):
        tname = getattr(typ, "__name__", str(typ))
        raise PipelineError(f"{name}: {raw!r} is not a valid {tname}") from None


def name_error(pass_name: str, e: SlimgraphError) -> None:
    """Begin ``e``'s message with the pass that raised it. Library code does not know
    which pass calls it and words its errors as "option 'X': ...", "needs ..." or plain
    text; they read "pass 'P', option 'X': ...", "pass 'P' needs ..." and "pass 'P': ..."."""
    message = str(e)
    if message.startswith(f"pass '{pass_name}'"):
        return
    sep = ", " if message.startswith("option '") else " " if message.startswith("needs ") else ": "
    e.args = (f"pass '{pass_name}'{sep}{message}",)


def build(steps: list[tuple[str, dict[str, Any]]]) -> list[Pass]:
    passes = []
    for name, opts in steps:
        _check_name(name)
        cls = registry.get(name)
        fields = {f.name: f for f in cls.options()}
        kwargs = {}
        for key, raw in opts.items():
            if key not in fields:
                known = ", ".join(fields) or "none"
                raise PipelineError(f"pass '{name}': unknown option {str(key)!r} (options: {known})")
            kwargs[key] = _convert(cls, fields[key], raw)
        p = cls(**kwargs)
        try:
            p.check_options()
        except SlimgraphError as e:
            name_error(name, e)
            raise
        passes.append(p)
    return passes


def from_text_or_file(spec: str) -> list[Pass]:
    if spec.endswith((".yaml", ".yml", ".toml")) and "{" not in spec:
        return build(load_file(spec))
    return build(parse(spec))


@dataclasses.dataclass
class PassRecord:
    name: str
    options: str
    seconds: float
    modified: bool
    report: dict[str, Any]


class PassManager:
    def __init__(self, passes: list[Pass], *, verify: bool = True,
                 print_after: set[str] | None = None,
                 on_start: Callable[[Pass, int, int], None] | None = None,
                 printer: Callable[[str], None] = print) -> None:
        self.passes = passes
        self.verify = verify
        self.print_after = set(print_after or ())
        unknown = self.print_after - {p.name for p in passes}
        if unknown:
            raise PipelineError(f"--print-after names passes not in the pipeline: {sorted(unknown)}")
        self.on_start = on_start
        self.printer = printer
        self.records: list[PassRecord] = []

    def run(self, state: CompileState) -> list[PassRecord]:
        from slimgraph.ir.printer import print_graph
        from slimgraph.ir.verifier import verify

        for i, p in enumerate(self.passes):
            if self.on_start:
                self.on_start(p, i, len(self.passes))
            t0 = time.perf_counter()
            try:
                p.requires(state)
                result = p.run(state)
                if not isinstance(result, PassResult):
                    raise TypeError(f"pass {p.name} returned {type(result).__name__}")
                p.ensures(state, result)
            except SlimgraphError as e:
                name_error(p.name, e)
                raise
            seconds = time.perf_counter() - t0
            if self.verify and result.modified and state.graph is not None:
                try:
                    verify(state.graph)
                except VerificationError as e:
                    raise VerificationError(f"IR invalid after pass '{p.name}' "
                                            f"(--no-verify skips this check): {e}") from e
            self.records.append(PassRecord(p.name, p.describe(), seconds, result.modified,
                                           result.report))
            if p.name in self.print_after and state.graph is not None:
                self.printer(f"// IR after {p.describe()}\n{print_graph(state.graph)}")
        return self.records


def timing_table(records: list[PassRecord]) -> str:
    total = sum(r.seconds for r in records) or 1e-9
    lines = [f"{'pass':<40} {'seconds':>9} {'share':>7}  modified"]
    for r in records:
        lines.append(f"{r.options[:40]:<40} {r.seconds:>9.3f} {100 * r.seconds / total:>6.1f}%  "
                     f"{'yes' if r.modified else 'no'}")
    lines.append(f"{'total':<40} {total:>9.3f}")
    return "\n".join(lines)
