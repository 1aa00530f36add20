"""A compile's output directory, written as one transaction.

A compile never writes its results straight into OUTDIR. It takes the directory's lock
(``OUTDIR/.slimgraph.lock``: a second compile into the same OUTDIR is refused while the
first runs), stages every output in ``OUTDIR/.slimgraph-staging-*``, runs every check
there, and only then commits: the earlier compile's outputs (those its ``report.json``
lists) are moved aside, the staged outputs moved in, and ``report.json`` is written
last. A folder without ``report.json`` therefore never passes for a result.

A commit is a handful of renames, with signals held off while they run; a journal
(``OUTDIR/.slimgraph-journal.json``) written before the first rename lets the next
compile finish or undo a commit that was killed half-way (SIGKILL, power loss). A
compile that fails or is interrupted before its commit leaves OUTDIR as it found it:
the staging folder is removed, and an OUTDIR the compile created is removed again.

Nothing slimgraph did not write is ever deleted: a staged output whose name is taken in
OUTDIR by something the earlier compile did not write (the user's own ``hf/``, a
symlink) fails the commit, and everything else in OUTDIR (an ``l0-checkpoint`` to
resume from, the user's files) stays where it is. OUTDIR may not be, contain or lie
inside the model being compiled.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import signal
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from slimgraph.errors import SlimgraphError
from slimgraph.io import atomic_write_json, make_temp_dir

REPORT = "report.json"
ASIDE = ".slimgraph-previous"
LOCK = ".slimgraph.lock"
JOURNAL = ".slimgraph-journal.json"
STAGING_PREFIX = ".slimgraph-staging-"
OURS = (ASIDE, LOCK, JOURNAL)


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


def earlier_outputs(out_dir: Path, report: dict) -> list[str]:
    """Top-level names in ``out_dir`` of an earlier compile's outputs: its report's
    ``outputs`` (written since 2026-11-24), else found from its ``files``."""
    outputs = report.get("outputs")
    if not isinstance(outputs, list):
        outputs = top_level_names(out_dir, [str(f) for f in report.get("files", [])],
                                  by_name=True)
    names = {str(n) for n in outputs if plain_name(str(n))}
    names.add(REPORT)
    return sorted(n for n in names if n not in OURS and not n.startswith(STAGING_PREFIX)
                  and _exists(Path(out_dir) / n))


def plain_name(name: str) -> bool:
    return bool(name) and "/" not in name and "\\" not in name and name not in (".", "..")


def unfinished(out_dir: Path) -> str | None:
    """Why ``out_dir`` holds no finished compile but the traces of one, or None."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir() or (out_dir / REPORT).is_file():
        return None
    if (out_dir / JOURNAL).exists() or any(out_dir.glob(STAGING_PREFIX + "*")):
        return f"'{out_dir}' holds an unfinished compile (interrupted or still running)"
    return None


def check_not_input(out_dir: Path, inputs: list[Path]) -> None:
    """Refuse an OUTDIR that is, contains or lies inside one of the ``inputs``."""
    out = Path(out_dir).expanduser().resolve()
    for p in inputs:
        src = Path(p).expanduser().resolve()
        if out == src or src.is_relative_to(out) or (src.is_dir() and out.is_relative_to(src)):
            how = "is" if out == src else ("contains" if src.is_relative_to(out) else "lies inside")
            raise OutdirError(f"output directory '{out_dir}' {how} the input '{p}': "
                              "choose an -o outside the model being compiled")


class Transaction:
    """One compile's hold on OUTDIR: lock, staging folder, commit or abort."""

    def __init__(self, out_dir: Path, *, overwrite: bool) -> None:
        self.out_dir = Path(out_dir)
        self.overwrite = overwrite
        self.staging: Path | None = None
        self.previous: list[str] = []
        self.created: list[Path] = []  # directories this compile made (removed on abort)
        self.lock_fd: int | None = None
        self.id = uuid.uuid4().hex
        self.keep_dir = self.out_dir  # what must outlive a failed compile goes here

    # ------------------------------------------------------------------ begin

    def begin(self) -> Path:
        """Check, lock and clean OUTDIR; return the staging folder to write into."""
        self._make_dir()
        try:
            self._lock()
            self._recover()
            self.previous = self._claim_previous()
            self.staging = make_temp_dir(self.out_dir, STAGING_PREFIX)
        except BaseException:
            self.abort()
            raise
        return self.staging

    def _make_dir(self) -> None:
        out = self.out_dir
        for p in [out, *out.parents]:
            if p.exists() or p.is_symlink():
                if not p.is_dir():
                    what = "output directory" if p == out else "path"
                    raise OutdirError(f"{what} '{p}' is a file, not a directory")
                break
        missing = [p for p in [out, *out.parents] if not p.exists()]
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutdirError(f"cannot create output directory '{out}': {e.strerror}") from None
        self.created = missing  # innermost first

    def _lock(self) -> None:
        path = self.out_dir / LOCK
        for _ in range(5):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
            except OSError as e:
                raise OutdirError(f"cannot create the lock file '{path}': {e.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
                os.close(fd)
                if e.errno in (errno.EAGAIN, errno.EACCES):
                    raise OutdirError(f"output directory '{self.out_dir}' is being written by "
                                      f"another compile ({holder or 'lock file ' + LOCK}); "
                                      "wait for it to finish or choose another -o") from None
                raise
            try:  # the file may have been removed by its holder between open and flock
                same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
                self.lock_fd = fd
                return
            os.close(fd)
        raise OutdirError(f"cannot lock output directory '{self.out_dir}'")

    def _recover(self) -> None:
        """Finish or undo what an earlier, killed compile left (we hold the lock)."""
        out = self.out_dir
        journal = _read_json(out / JOURNAL)
        if journal is not None:
            report = _read_json(out / REPORT) or {}
            staging = out / str(journal.get("staging", ""))
            if report.get("compile_id") == journal.get("id"):
                note(f"finished the commit of an interrupted compile in '{out}'")
            else:
                for n in _names(journal.get("new")):
                    if not _exists(staging / n) and _exists(out / n):
                        _remove(out / n)  # moved in by that commit
                for n in _names(journal.get("previous")):
                    if _exists(out / ASIDE / n) and not _exists(out / n):
                        (out / ASIDE / n).rename(out / n)
                note(f"undid the half-done commit of an interrupted compile in "
                                  f"'{out}'; the compile before it is back in place")
            shutil.rmtree(out / ASIDE, ignore_errors=True)
            (out / JOURNAL).unlink(missing_ok=True)
        for d in out.glob(STAGING_PREFIX + "*"):
            if d.is_dir() and not d.is_symlink():
                shutil.rmtree(d, ignore_errors=True)
                note(f"removed '{d.name}', left by an interrupted compile")

    def _claim_previous(self) -> list[str]:
        out = self.out_dir
        if _exists(out / ASIDE):
            raise OutdirError(f"'{out / ASIDE}' is left from an interrupted compile: "
                              "move it away (it holds the compile before that one)")
        report = _read_json(out / REPORT)
        if report is None:
            if _exists(out / REPORT):
                raise OutdirError(f"'{out / REPORT}' is not a compile report; move it away "
                                  "or choose another -o")
            return []
        what = f" ({report.get('model')}: {', '.join(map(str, report.get('pipeline', [])))})" \
            if report.get("model") else ""
        if not self.overwrite:
            raise OutdirError(f"output directory '{out}' holds an earlier compile{what}; "
                              "pass --overwrite to replace it, or choose another -o")
        return earlier_outputs(out, report)

    # ------------------------------------------------------------------ end

    def commit(self, report: dict[str, Any]) -> Path:
        """Move the staged outputs into OUTDIR (the earlier ones aside), then write
        ``report.json`` (with this compile's id) last."""
        out, staging = self.out_dir, self.staging
        assert staging is not None
        new = sorted(p.name for p in staging.iterdir() if p.name != REPORT)
        for n in new:
            if n in OURS or n.startswith(STAGING_PREFIX) or not plain_name(n):
                raise OutdirError(f"an output may not be named '{n}'")
            if _exists(out / n) and n not in self.previous:
                raise OutdirError(f"'{out / n}' is in the way and was not written by a compile "
                                  "of this OUTDIR: move it away or choose another -o")
        report["compile_id"] = self.id
        with signals_held():
            atomic_write_json(out / JOURNAL, {"id": self.id, "staging": staging.name,
                                              "previous": [REPORT] + [n for n in self.previous
                                                                      if n != REPORT],
                                              "new": new})
            if self.previous:
                (out / ASIDE).mkdir()
                for n in [REPORT] + [n for n in self.previous if n != REPORT]:
                    if _exists(out / n):
                        (out / n).rename(out / ASIDE / n)
            for n in new:
                (staging / n).rename(out / n)
            path = atomic_write_json(out / REPORT, report)
            (out / JOURNAL).unlink()
            shutil.rmtree(out / ASIDE, ignore_errors=True)
            shutil.rmtree(staging, ignore_errors=True)
            self.staging = None
            self._unlock()
        return path

    def abort(self) -> None:
        """Leave OUTDIR as this compile found it (idempotent)."""
        with signals_held():
            if self.staging is not None:
                shutil.rmtree(self.staging, ignore_errors=True)
                self.staging = None
            self._unlock()
            for d in self.created:  # innermost first; only while empty
                try:
                    d.rmdir()
                except OSError:
                    break
            self.created = []

    def _unlock(self) -> None:
        if self.lock_fd is None:
            return
        (self.out_dir / LOCK).unlink(missing_ok=True)  # removed while still held
        os.close(self.lock_fd)
        self.lock_fd = None


class HelperProcessOutputs:
    """What a helper process of a multi-process run (``RANK`` > 0 under ``accelerate
    launch`` / ``torchrun``) writes to: a private temp folder, removed at the end. The
    main process alone locks, stages and commits OUTDIR."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.keep_dir = None
        self.staging: Path | None = None

    def begin(self) -> Path:
        import tempfile

        self.staging = Path(tempfile.mkdtemp(prefix="slimgraph-helper-process-"))
        return self.staging

    def commit(self, report: dict[str, Any]) -> None:
        self.abort()

    def abort(self) -> None:
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None


def helper_process() -> bool:
    """True in a non-main process of a multi-process (distributed) launch."""
    return os.environ.get("RANK", "0").strip() not in ("", "0")


# ---------------------------------------------------------------------- signals


class Terminated(KeyboardInterrupt):
    """SIGTERM / SIGHUP, handled like Ctrl-C: the compile is undone, exit 128 + signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_RECEIVED: list[int] = []  # signals seen inside termination_as_interrupt


def _on_signal(signum, frame) -> None:
    _RECEIVED.append(signum)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(signum)


def raise_if_interrupted() -> None:
    """Raise again an interrupt that arrived earlier: code that swallowed it (a library
    catching BaseException) does not get to commit its outputs."""
    if _RECEIVED:
        signum = _RECEIVED[-1]
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Terminated(signum)


@contextmanager
def termination_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM and SIGHUP raise :class:`Terminated` (a KeyboardInterrupt)
    in the main thread, so the same clean-up runs as for Ctrl-C; every such signal is also
    remembered (:func:`raise_if_interrupted`)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _RECEIVED.clear()
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextmanager
def signals_held() -> Iterator[None]:
    """Delay SIGINT / SIGTERM / SIGHUP until the block is done (a commit or clean-up
    is never cut in half by them; SIGKILL is what the journal is for)."""
    sigs = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# ---------------------------------------------------------------------- helpers


def relocate(obj: Any, old: str, new: str) -> Any:
    """``obj`` (a report) with every string naming a path under ``old`` renamed to
    ``new``: staged files as they are called once committed."""
    if isinstance(obj, str):
        return new + obj[len(old):] if obj.startswith(old) else obj.replace(old + os.sep, new + os.sep)
    if isinstance(obj, dict):
        return {k: relocate(v, old, new) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [relocate(v, old, new) for v in obj]
    return obj


def _names(value: Any) -> list[str]:
    return [str(n) for n in value if plain_name(str(n))] if isinstance(value, list) else []


def _read_json(path: Path) -> dict | None:
    if path.is_symlink() or not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif _exists(path):
        path.unlink()


def interrupted_exit_code(exc: KeyboardInterrupt) -> int:
    return 128 + (exc.signum if isinstance(exc, Terminated) else signal.SIGINT)


def note(message: str) -> None:
    print(f"slimgraph: note: {message}", file=sys.stderr)
