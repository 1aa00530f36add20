"""`check-sparsity`: verify an N:M pattern on the model and on the ONNX files written so far.

    sparsify{score=ria,pattern=2:4},export-onnx,check-sparsity{pattern=2:4}

Checks the in-memory PyTorch model (or, for ONNX input, the input file -- unless an
earlier pass such as ``sparsify`` modified the model in memory) and every ONNX
file an earlier pass of this pipeline wrote (``export-onnx``: ``OUTDIR/model.onnx``) with
:mod:`slimgraph.sparsity.check`: the decoder-block linears by default, every linear with
``all_linear=true``. The report (per layer: axis, zero fraction, violating groups,
TensorRT eligibility) goes into the pass result; the pass modifies nothing and fails with
an error naming the layers when the pattern does not hold. ``pattern=none`` only records
zero fractions. In a YAML pipeline quote the pattern (``pattern: "2:4"``): unquoted, YAML
reads 2:4 as the base-60 integer 124.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from slimgraph.errors import PipelineError, SlimgraphError
from slimgraph.passes.base import CompileState, Pass, PassResult
from slimgraph.passes.registry import register


@dataclass
class CheckSparsity(Pass):
    name = "check-sparsity"
    summary = "verify an N:M pattern (default 2:4) on the PyTorch model and the exported ONNX"
    pattern: str = "2:4"
    all_linear: bool = False
    onnx: bool = True

    def nm(self) -> tuple[int, int] | None:
        from slimgraph.sparsity.check import SparsityCheckError, parse_pattern

        try:
            return parse_pattern(self.pattern)
        except SparsityCheckError as e:
            hint = " (in YAML, quote it: \"2:4\")" if str(self.pattern).strip().isdigit() else ""
            raise self.option_error("pattern", f"{e}{hint}") from None

    def check_options(self) -> None:
        self.nm()

    def requires(self, state: CompileState) -> None:
        if state.model is None and getattr(state.loaded, "onnx_path", None) is None:
            raise PipelineError(f"pass '{self.name}' needs a PyTorch model or an ONNX file")
        state.kind.check_input(state)

    def run(self, state: CompileState) -> PassResult:
        from slimgraph.sparsity.check import check_onnx, format_pattern

        pattern = self.nm()
        targets = "all-linear" if self.all_linear else "blocks"
        reports, notes, checked = state.kind.input_sparsity_reports(state, pattern, targets)
        if self.onnx:
            for f in state.files:
                path = Path(f).resolve()
                if path.suffix.lower() == ".onnx" and path.is_file() and path not in checked:
                    checked.add(path)
                    reports.append(check_onnx(path, pattern, targets=targets))
            stale = state.out_dir / "model.onnx" if state.out_dir is not None else None
            if stale is not None and stale.is_file() and stale.resolve() not in checked:
                notes.append(f"{stale} was not written by this pipeline; not checked")
        if not reports:
            raise PipelineError(f"pass '{self.name}': the ONNX input was modified in memory and "
                                "no ONNX file has been written from it yet: put export-onnx "
                                "before check-sparsity")
        notes.extend(r.headline() for r in reports)
        for r in reports:
            notes.extend(f"{r.source}: {n}" for n in r.notes)
        ok = all(r.ok for r in reports)
        report = {"pattern": format_pattern(pattern), "targets": targets, "ok": ok,
                  "notes": notes, "reports": [r.to_dict() for r in reports]}
        if not ok:
            raise SlimgraphError(_failure_message(reports, format_pattern(pattern)))
        return PassResult(False, report)


def _failure_message(reports, pattern: str | None) -> str:
    parts = []
    for r in reports:
        if r.ok:
            continue
        if not r.layers:
            parts.append(f"{r.source} {r.model}: no targeted layers ({r.targets})")
            continue
        fails = r.failures()
        if not fails:
            parts.append(f"{r.source} {r.model}: no layer could be checked for {pattern} "
                         f"({r.count('skipped')} skipped)")
            continue
        shown = ", ".join(f"{f.name} ({f.groups_violating} of {f.groups_total} groups)"
                          if f.status == "violates" else f"{f.name} (not TensorRT-visible)"
                          for f in fails[:5])
        more = f" and {len(fails) - 5} more" if len(fails) > 5 else ""
        parts.append(f"{r.source} {r.model}: {pattern} does not hold on {len(fails)} of "
                     f"{len(r.layers)} layers: {shown}{more}")
    return "; ".join(parts)


register(CheckSparsity)
