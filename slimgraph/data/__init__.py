"""Texts shipped with slimgraph, so that calibration and evaluation run anywhere.

``wikitext2/calib.txt`` and ``wikitext2/eval.txt`` are the two parts of WikiText-2's raw
test split (CC BY-SA 3.0; attribution in ``wikitext2/README.md``). :func:`packaged_text`
turns the names users type (``wikitext2``, ``wikitext2-calib``) into their paths.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent
TEXTS = {
    "wikitext2": ROOT / "wikitext2" / "eval.txt",
    "wikitext2-eval": ROOT / "wikitext2" / "eval.txt",
    "wikitext2-calib": ROOT / "wikitext2" / "calib.txt",
}
DEFAULT_CALIB = "wikitext2-calib"


def packaged_text(name: str | None) -> Path | None:
    """The path of a shipped text named ``name``, or None when it names none."""
    return TEXTS.get(str(name).strip().lower()) if name else None


def resolve_text(name: str | None) -> str | None:
    """``name`` with a shipped text's name replaced by its path; anything else as is."""
    path = packaged_text(name)
    return str(path) if path is not None else name
