"""argparse value types shared by the subcommands."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_ints(text: str) -> list[int]:
    """A comma-separated list of positive integers, e.g. ``128,512``."""
    return [positive_int(t.strip()) for t in text.split(",")]
