"""`slimgraph passes [NAME]`: list the passes, or show one pass's options and documentation."""

from __future__ import annotations

import argparse


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "passes", help="list the passes, or show one pass's options and documentation",
        description="Without NAME: every pass with a one-line summary. With NAME: its options "
        "(type, default) and documentation.",
        epilog="examples:\n  slimgraph passes\n  slimgraph passes sparsify",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", nargs="?", help="a pass name (e.g. sparsify, prune-structured)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from slimgraph.passes.help import describe, overview

    print(describe(args.name) if args.name else overview())
    return 0
