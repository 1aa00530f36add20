"""Progress lines: an ETA from the pace so far, and plain lines when not on a terminal."""

from __future__ import annotations

import io

from slimgraph.progress import Progress, duration


def test_durations_read_like_a_clock():
    assert [duration(s) for s in (0, 59.4, 75, 3700)] == ["0s", "59s", "1m15s", "1h01m"]


def test_off_a_terminal_steps_and_updates_are_printed_with_an_eta(monkeypatch):
    now = [0.0]
    monkeypatch.setattr("slimgraph.progress.time.perf_counter", lambda: now[0])
    out = io.StringIO()
    p = Progress(None, every=5.0, stream=out)  # t=0
    p.step("pass 1/1: sparsify")  # t=0
    now[0] = 10.0
    p.update(1, 4)  # t=10: 10 s per block, 3 to go
    now[0] = 12.0
    p.update(1, 4)  # t=12: within 5 s of the last line, not shown
    now[0] = 20.0
    p.update(2, 4)  # t=20
    now[0] = 25.0
    p.update(4, 4)  # t=25: the last line always shows
    lines = out.getvalue().splitlines()
    assert lines[0] == "pass 1/1: sparsify ..."
    assert lines[1] == "pass 1/1: sparsify ... 1/4 blocks, 10s, ETA 30s"
    assert lines[2] == "pass 1/1: sparsify ... 2/4 blocks, 20s, ETA 20s"
    assert lines[3] == "pass 1/1: sparsify ... 4/4 blocks, 25s" and len(lines) == 4
