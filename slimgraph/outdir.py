"""A compile's output directory: never mixed with an earlier compile's outputs.

An OUTDIR holding ``report.json`` holds an earlier compile. Compiling into it again
without ``--overwrite`` is refused before any work starts (its files would otherwise sit
next to the new ones: a ``model.onnx`` from a pipeline that no longer exports one would
be evaluated as the new model). With ``--overwrite`` the earlier outputs (the files its
report lists, and the report) are moved aside into ``OUTDIR/.slimgraph-previous``;
they are deleted when the new compile succeeds and put back when it fails, so OUTDIR
always holds one compile's outputs. Anything else in OUTDIR (an ``l0-checkpoint`` to
resume from, the user's own files) stays where it is.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from slimgraph.errors import SlimgraphError

REPORT = "report.json"
ASIDE = ".slimgraph-previous"


class OutdirError(SlimgraphError):
    """An output directory that cannot be written as asked."""


def top_level_names(out_dir: Path, files: list[str], *, by_name: bool = False) -> list[str]:
    """The names directly in ``out_dir`` that hold ``files`` (paths as a compile records
    them: relative to the working directory of that run, or absolute). ``by_name``: also
    match a file by its name alone (an earlier run's relative paths, another cwd)."""
    root = Path(out_dir).resolve()
    names = set()
    for f in files:
        for c in (Path(f), root / Path(f).name) if by_name else (Path(f),):
            try:
                rel = c.resolve().relative_to(root)
            except ValueError:
                continue
            if rel.parts and (root / rel.parts[0]).exists():
                names.add(rel.parts[0])
                break
    return sorted(names)


def _entries(out_dir: Path, report: dict) -> list[str]:
    """Top-level names in ``out_dir`` of an earlier compile's outputs: its report's
    ``outputs`` (written since 2026-11-24), else found from its ``files``."""
    outputs = report.get("outputs")
    if not isinstance(outputs, list):
        outputs = top_level_names(out_dir, [str(f) for f in report.get("files", [])],
                                  by_name=True)
    names = {str(n) for n in outputs if "/" not in str(n) and str(n) not in ("", ".", "..")}
    names.add(REPORT)
    return sorted(n for n in names if n != ASIDE and (Path(out_dir) / n).exists())


class PreviousOutputs:
    """An earlier compile's outputs in OUTDIR, moved aside for the new one."""

    def __init__(self, out_dir: Path, names: list[str]) -> None:
        self.out_dir, self.names = out_dir, names
        self.aside = out_dir / ASIDE

    @classmethod
    def claim(cls, out_dir: Path, *, overwrite: bool) -> PreviousOutputs | None:
        """Check ``out_dir`` before any work: None when it holds no earlier compile;
        refuse (OutdirError) when it does and ``overwrite`` is off."""
        out_dir = Path(out_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise OutdirError(f"output directory '{out_dir}' is a file")
        report_path = out_dir / REPORT
        if not report_path.is_file():
            return None
        try:
            report = json.loads(report_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            report = {}
        what = f" ({report.get('model')}: {', '.join(report.get('pipeline', []))})" \
            if isinstance(report, dict) and report.get("model") else ""
        if not overwrite:
            raise OutdirError(f"output directory '{out_dir}' holds an earlier compile{what}; "
                              "pass --overwrite to replace it, or choose another -o")
        if (out_dir / ASIDE).exists():
            raise OutdirError(f"'{out_dir / ASIDE}' is left from an interrupted compile: "
                              "move it away (it holds the compile before that one)")
        return cls(out_dir, _entries(out_dir, report if isinstance(report, dict) else {}))

    def set_aside(self) -> None:
        self.aside.mkdir()
        for n in self.names:
            (self.out_dir / n).rename(self.aside / n)

    def discard(self) -> None:
        shutil.rmtree(self.aside, ignore_errors=True)

    def restore(self, written: list[str]) -> None:
        """Put the earlier outputs back after a failed compile: what it wrote
        (``written``, its files so far) is removed first."""
        for n in top_level_names(self.out_dir, written):
            if n not in self.names and n != ASIDE:
                _remove(self.out_dir / n)
        for n in self.names:
            new, old = self.out_dir / n, self.aside / n
            if not old.exists() and not old.is_symlink():
                continue
            _remove(new)
            old.rename(new)
        shutil.rmtree(self.aside, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
