"""The `slimgraph` command line.

Every user error (bad path, corrupt file, impossible option) is printed as one line
`slimgraph: error: ...` and exits with status 2. The subcommands are the modules of
:mod:`slimgraph.commands`; building the parser imports no PyTorch, transformers or ONNX.
"""

from __future__ import annotations

import argparse
import sys

from slimgraph import __version__
from slimgraph.commands import bench as bench_cmd
from slimgraph.commands import check as check_cmd
from slimgraph.commands import compile as compile_cmd
from slimgraph.commands import eval as eval_cmd
from slimgraph.commands import inspect as inspect_cmd
from slimgraph.commands import passes as passes_cmd
from slimgraph.errors import SlimgraphError

# the subcommands in the order `slimgraph --help` lists them (modules of slimgraph.commands)
COMMANDS = (inspect_cmd, compile_cmd, passes_cmd, eval_cmd, bench_cmd, check_cmd)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="slimgraph",
        description="slimgraph: a pruning compiler for neural networks, LLMs first.",
    )
    p.add_argument("--version", action="version", version=f"slimgraph {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from slimgraph.outdir import interrupted_exit_code, termination_as_interrupt

    args = _parser().parse_args(argv)
    try:
        with termination_as_interrupt():  # SIGTERM / SIGHUP clean up like Ctrl-C
            return args.func(args)
    except SlimgraphError as e:
        print("slimgraph: error: " + " ".join(str(e).split("\n")), file=sys.stderr)  # one line
        return 2
    except KeyboardInterrupt as e:
        print(f"slimgraph: interrupted{f' ({e})' if str(e) else ''}",
              file=sys.stderr)
        return interrupted_exit_code(e)


if __name__ == "__main__":
    sys.exit(main())
