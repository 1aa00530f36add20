"""Helpers shared by the benchmark scripts: run a command, write a result file atomically."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import tempfile
import sys
import time
from pathlib import Path


SHIPPED = Path(__file__).resolve().parents[1] / "slimgraph" / "data" / "wikitext2"


def protocol_split(work: Path) -> tuple[Path, Path]:
    """The benchmark protocol's split of WikiText-2 test: the first 75% of the characters
    (evaluation) and the rest (calibration), as shipped with the package
    (slimgraph/data/wikitext2/eval.txt, calib.txt); copied to ``work/eval.txt`` and
    ``work/calib.txt`` so that rows name files in their own work folder; returns both."""
    work.mkdir(parents=True, exist_ok=True)
    ev, cal = work / "eval.txt", work / "calib.txt"
    ev.write_text((SHIPPED / "eval.txt").read_text())
    cal.write_text((SHIPPED / "calib.txt").read_text())
    return ev, cal


def run(cmd: list[str]) -> tuple[str, float]:
    """Run ``cmd``; return its stdout and wall seconds; exit with its stderr on failure."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return proc.stdout, time.perf_counter() - t0


def run_rss(cmd: list[str]) -> tuple[str, float, int]:
    """Like :func:`run`, plus the command's own peak RSS in MB (``wait4`` rusage)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        secs = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"failed: {' '.join(cmd)}\n{err.read()[-3000:]}")
        return out.read(), secs, round(usage.ru_maxrss / 1024)


def write_result(path: str | Path, rows: dict, **extra) -> None:
    """``{"date", "command", **extra, "rows"}`` to ``path`` (temp file, then rename)."""
    result = {"date": dt.date.today().isoformat(), "command": " ".join(sys.argv), **extra,
              "rows": rows}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)
