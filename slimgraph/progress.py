"""Progress of long work on stderr: the current step, how far it is, and an ETA.

On a terminal a single status line is redrawn (rich); otherwise (a log file, CI, a
pipe) a plain line is printed when a step starts and then at most every
``every`` seconds, so a long step is never silent.
"""

from __future__ import annotations

import sys
import time


def duration(seconds: float) -> str:
    """``75`` -> ``1m15s``; ``3700`` -> ``1h01m``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class Progress:
    """One status line per step: ``step(text)``, then ``update(done, total, ...)``."""

    def __init__(self, console=None, *, every: float = 10.0, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.tty = bool(console is not None and console.is_terminal)
        self.status = console.status("") if self.tty else None
        self.every = every
        self.text = ""
        self.t_step = self.t_print = time.perf_counter()
        if self.status is not None:
            self.status.start()

    def step(self, text: str) -> None:
        self.text = text
        self.t_step = self.t_print = time.perf_counter()
        self._show(f"{text} ...", force=True)

    def update(self, done: int, total: int, unit: str = "blocks", info: str = "") -> None:
        elapsed = time.perf_counter() - self.t_step
        eta = f", ETA {duration(elapsed / done * (total - done))}" if 0 < done < total else ""
        extra = f" ({info})" if info else ""
        self._show(f"{self.text} ... {done}/{total} {unit}{extra}, {duration(elapsed)}{eta}",
                   force=done >= total)

    def _show(self, line: str, *, force: bool) -> None:
        if self.status is not None:
            self.status.update(line)
            return
        now = time.perf_counter()
        if force or now - self.t_print >= self.every:
            self.t_print = now
            print(line, file=self.stream, flush=True)

    def stop(self) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None
