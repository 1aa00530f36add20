"""Symbolic tensor dims as products: ``"batch"``, ``"4*batch"``, ``"batch*seq"``.

A dim is an ``int`` or a string. A string made of ``*``-separated words and integers is
a product of symbols times an integer coefficient; any other string (``"seq + 1"``,
an unknown dim ``"?name:0"``) is one opaque symbol. Products are written canonically
(coefficient first, symbols sorted), so two dims are the same size exactly when their
strings are equal. Only what shape arithmetic needs: products and exact division.
"""

from __future__ import annotations

import re
from collections import Counter

Dim = int | str

_PRODUCT_RE = re.compile(r"^[\w.:?]+(\*[\w.:?]+)*$")


def factors(d: Dim) -> tuple[int, tuple[str, ...]]:
    """``(coefficient, sorted symbols)`` of a dim."""
    if isinstance(d, int):
        return d, ()
    if not _PRODUCT_RE.match(d):
        return 1, (d,)
    coef, syms = 1, []
    for part in d.split("*"):
        if part.isdigit():
            coef *= int(part)
        else:
            syms.append(part)
    return coef, tuple(sorted(syms))


def make(coef: int, syms) -> Dim:
    syms = tuple(sorted(syms))
    if not syms:
        return coef
    if coef == 0:
        return 0
    return "*".join(([str(coef)] if coef != 1 else []) + list(syms))


def product(dims) -> Dim:
    coef, syms = 1, []
    for d in dims:
        c, s = factors(d)
        coef *= c
        syms.extend(s)
    return make(coef, syms)


def divide(a: Dim, b: Dim) -> Dim | None:
    """``a / b`` when it is exact (``b``'s symbols are among ``a``'s), else None."""
    ca, sa = factors(a)
    cb, sb = factors(b)
    if cb == 0 or ca % cb:
        return None
    rest = Counter(sa)
    rest.subtract(Counter(sb))
    if any(n < 0 for n in rest.values()):
        return None
    return make(ca // cb, rest.elements())


def is_symbolic(d: Dim) -> bool:
    return not isinstance(d, int)
