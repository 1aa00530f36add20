"""Text files the user gives (pipelines, calibration and training data, prompts), read
with one-line errors that name the file."""

from __future__ import annotations

from pathlib import Path

from slimgraph.errors import SlimgraphError

__all__ = ["read_utf8"]


def read_utf8(path: str | Path, what: str, error: type[SlimgraphError] = SlimgraphError, *,
              max_bytes: int | None = None) -> str:
    """The text of a UTF-8 file, exactly as stored (no newline translation).

    ``what`` names the file in messages ("pipeline file", "calibration file", ...);
    ``error`` is the :class:`SlimgraphError` subclass raised when the file cannot be read,
    is larger than ``max_bytes``, or is not UTF-8.
    """
    path = Path(path)
    try:
        if max_bytes is not None and path.stat().st_size > max_bytes:
            raise error(f"{what} '{path}' is larger than {max_bytes:,} bytes")
        data = path.read_bytes()
    except OSError as exc:
        raise error(f"cannot read {what} '{path}': {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{what} '{path}' is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
