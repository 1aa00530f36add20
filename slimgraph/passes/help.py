"""What each pass does and the options it takes (``slimgraph passes [NAME]``).

Without a name, one line per pass (its summary). With a name, the pass's summary, every
option with its type and default, as written in a pipeline (``NAME{option=value,...}``),
then the documentation of the module that defines it (examples, what the options mean).
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import typing

from slimgraph.passes import registry


def _type_name(field: dataclasses.Field) -> str:
    tp = field.type
    if isinstance(tp, str):
        return tp.replace("typing.", "")
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if args:
        return " | ".join(getattr(a, "__name__", str(a)) for a in args) + " | None"
    return getattr(tp, "__name__", str(tp))


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "(required)"
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value == "":
        return "''"
    return str(value)


def overview() -> str:
    """One line per registered pass: name and summary."""
    classes = [registry.get(n) for n in registry.names()]
    width = max(len(c.name) for c in classes)
    lines = ["passes (slimgraph passes NAME shows one pass's options and documentation):", ""]
    lines += [f"  {c.name:<{width}}  {c.summary}" for c in classes]
    lines += ["", "pipeline syntax: comma-separated passes, options in braces, e.g.",
              "  'sparsify{score=ria,pattern=2:4,permute=gather},export-onnx'"]
    return "\n".join(lines)


def describe(name: str) -> str:
    """A pass's summary, options (type, default) and its module's documentation."""
    cls = registry.get(name)
    lines = [f"{cls.name}: {cls.summary}", ""]
    opts = cls.options()
    if opts:
        lines.append("options (NAME{option=value,...}):")
        width = max(len(f.name) for f in opts)
        for f in opts:
            lines.append(f"  {f.name:<{width}}  {_type_name(f):<18} default {_default(f)}")
    else:
        lines.append("options: none")
    doc = inspect.getdoc(sys.modules[cls.__module__])
    if doc:
        lines += ["", doc]
    return "\n".join(lines)
