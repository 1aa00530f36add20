"""The subcommands of ``slimgraph``: one module each, with ``add_parser(subparsers)`` and
``run(args)``.

These modules are light: they import only the standard library and light slimgraph
modules at import time, so ``slimgraph --help`` and ``slimgraph passes`` start fast; the
heavy libraries (PyTorch, transformers, ONNX) are imported inside ``run``.
"""
