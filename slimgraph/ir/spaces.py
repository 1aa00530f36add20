"""Channel spaces: which channels of which tensor dims are the same channels.

Every tensor dim gets a *layout*: a list of space ids whose sizes multiply to the dim
size (row-major: the first space is the outermost). Spaces live in a union-find:
``union(a, b)`` says two spaces index the same channels. A space can be *refined*:

- ``merge``: the space is the row-major product of child spaces (a reshape that
  splits hidden 576 into 9 heads x 64 head_dim refines the 576-space into [9, 64]);
- ``concat``: the space is the concatenation of child spaces (slices, split, cat:
  GPT-2's fused qkv is concat[q, k, v]).

Unifying two layouts aligns them factor by factor, refining a larger factor where a
smaller one divides it. Where layouts cannot be aligned (a reshape that mixes channel
and non-channel dims, a slice that cuts through a head), the spaces involved are
marked with a reason and become unprunable: the analysis never guesses.

Reasons, tags and notes recorded on a space apply to every space it is refined into
(see :meth:`ChannelSpaces.inherited`).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

Layout = list[int]


class LayoutConflict(Exception):
    """Two layouts cannot be aligned."""


@dataclass
class Tree:
    """A fully expanded layout: ``kind`` in {"leaf", "merge", "concat"}."""

    kind: str
    size: int
    space: int = -1  # for leaves: the root space id
    children: tuple["Tree", ...] = ()

    def leaves(self) -> list[int]:
        if self.kind == "leaf":
            return [self.space]
        out: list[int] = []
        for c in self.children:
            out.extend(c.leaves())
        return out

    def positions(self, space: int, unit: int) -> list[int] | None:
        """Indices of this dim that belong to ``unit`` of ``space`` (None: not involved)."""
        if self.kind == "leaf":
            return [unit] if self.space == space else None
        if self.kind == "concat":
            out: list[int] = []
            found = False
            off = 0
            for c in self.children:
                p = c.positions(space, unit)
                if p is not None:
                    found = True
                    out.extend(off + i for i in p)
                off += c.size
            return out if found else None
        # merge: row-major product of the children
        parts = [c.positions(space, unit) for c in self.children]
        if all(p is None for p in parts):
            return None
        idx = [0]
        for c, p in zip(self.children, parts):
            choices = range(c.size) if p is None else p
            idx = [i * c.size + j for i in idx for j in choices]
        return idx

    def describe(self, name_of) -> str:
        if self.kind == "leaf":
            return name_of(self.space)
        sep = " x " if self.kind == "merge" else " ++ "
        inner = sep.join(c.describe(name_of) for c in self.children)
        return f"[{inner}]" if len(self.children) > 1 else inner


class ChannelSpaces:
    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.refine: list[tuple[str, list[int]] | None] = []
        self.tags: dict[int, set[str]] = {}
        self.reasons: dict[int, list[str]] = {}
        self.notes: dict[int, list[str]] = {}
        # spaces with a note saying removal only approximates the masked model (a
        # LayerNorm's statistics span them): set where that note is recorded
        self.approximate: set[int] = set()
        self.replica: set[int] = set()
        # size-0 spaces of symbolic dims (dynamic axes): the dim they stand for, e.g.
        # "batch" or "4*batch" (see ``symdims``), so a reshape can split products of them
        self.symbol: dict[int, str] = {}

    # -- basic union-find ----------------------------------------------------------
    def new(self, size: int, *, replica: bool = False) -> int:
        i = len(self.parent)
        self.parent.append(i)
        self.size.append(int(size))
        self.refine.append(None)
        if replica:
            self.replica.add(i)
        return i

    def find(self, x: int) -> int:
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def fresh_layout(self, size) -> Layout:
        if isinstance(size, int):
            return [self.new(size)]
        s = self.new(0)
        self.symbol[s] = str(size)
        return [s]

    def _merge_info(self, into: int, other: int) -> None:
        for store in (self.tags, self.reasons, self.notes):
            if other in store:
                if isinstance(store[other], set):
                    store.setdefault(into, set()).update(store.pop(other))
                else:
                    dst = store.setdefault(into, [])
                    dst.extend(r for r in store.pop(other) if r not in dst)
        if other in self.replica:
            self.replica.add(into)
        if other in self.approximate:
            self.approximate.add(into)
        if other in self.symbol:  # two symbolic dims made one: keep the name if they agree
            name = self.symbol.pop(other)
            if self.symbol.setdefault(into, name) != name:
                del self.symbol[into]

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:
            raise LayoutConflict(f"sizes {self.size[ra]} and {self.size[rb]} differ")
        ref_a, ref_b = self.refine[ra], self.refine[rb]
        self.parent[rb] = ra
        self._merge_info(ra, rb)
        if ref_a is None:
            self.refine[ra] = ref_b
        elif ref_b is not None:
            if ref_a[0] != ref_b[0]:
                raise LayoutConflict("a space is both a product and a concatenation")
            if ref_a[0] == "merge":
                self.unify(ref_a[1], ref_b[1])
            else:
                self._unify_concat(list(ref_a[1]), list(ref_b[1]))

    # -- layouts -------------------------------------------------------------------
    def flatten(self, layout: Layout) -> list[int]:
        """Root spaces of a layout with product refinements expanded; size-1 dropped."""
        out: list[int] = []
        for s in layout:
            r = self.find(s)
            ref = self.refine[r]
            if ref is not None and ref[0] == "merge":
                out.extend(self.flatten(ref[1]))
            elif self.size[r] != 1:
                out.append(r)
        return out

    def _split_product(self, x: int, outer: int) -> list[int]:
        """Refine atomic root ``x`` into the product [outer, size/outer]."""
        if self.refine[x] is not None:
            raise LayoutConflict("cannot split a concatenated space into a product")
        parts = [self.new(outer), self.new(self.size[x] // outer)]
        self.refine[x] = ("merge", parts)
        return parts

    def unify(self, la: Layout, lb: Layout) -> None:
        """Make two layouts of equal total size index the same channels."""
        a, b = self.flatten(la), self.flatten(lb)
        i = j = 0
        while i < len(a) and j < len(b):
            x, y = self.find(a[i]), self.find(b[j])
            sx, sy = self.size[x], self.size[y]
            if x == y or sx == sy:
                self.union(x, y)
                i += 1
                j += 1
            elif not sx or not sy:  # 0: a symbolic size (dynamic axis, shape not inferred)
                raise LayoutConflict(f"sizes {sx or '?'} and {sy or '?'} cannot be compared")
            elif sx > sy and sx % sy == 0:
                a[i : i + 1] = self._split_product(x, sy)
            elif sy > sx and sy % sx == 0:
                b[j : j + 1] = self._split_product(y, sx)
            else:
                raise LayoutConflict(f"factors {sx} and {sy} do not align")
        if i < len(a) or j < len(b):
            raise LayoutConflict("layouts have different sizes")

    def _parts(self, x: int, lo: int, hi: int) -> list[int]:
        """Spaces that exactly cover channels [lo, hi) of space ``x``, refining as needed."""
        x = self.find(x)
        if lo == 0 and hi == self.size[x]:
            return [x]
        ref = self.refine[x]
        if ref is None:
            cuts = sorted({0, lo, hi, self.size[x]})
            parts = [self.new(e - s) for s, e in zip(cuts, cuts[1:])]
            self.refine[x] = ("concat", parts)
            ref = self.refine[x]
        if ref[0] == "merge":
            raise LayoutConflict("slice cuts through a product of spaces")
        out: list[int] = []
        off = 0
        for p in ref[1]:
            ps = self.size[self.find(p)]
            s, e = max(lo, off), min(hi, off + ps)
            if s < e:
                out.extend(self._parts(p, s - off, e - off))
            off += ps
        return out

    def _unify_concat(self, pa: list[int], pb: list[int]) -> None:
        i = j = 0
        while i < len(pa) and j < len(pb):
            x, y = self.find(pa[i]), self.find(pb[j])
            sx, sy = self.size[x], self.size[y]
            if sx == sy:
                self.union(x, y)
                i += 1
                j += 1
            elif sx > sy:
                pa[i : i + 1] = self._parts(x, 0, sy) + self._parts(x, sy, sx)
            else:
                pb[j : j + 1] = self._parts(y, 0, sx) + self._parts(y, sx, sy)

    def leaf_for(self, layout: Layout) -> int:
        """One space standing for a whole layout (a product space when needed)."""
        flat = self.flatten(layout)
        if len(flat) == 1:
            return flat[0]
        s = self.new(prod(self.size[f] for f in flat) if flat else 1)
        if flat:
            self.refine[s] = ("merge", flat)
        return s

    def concat(self, layouts: list[Layout]) -> Layout:
        parts = [self.leaf_for(lay) for lay in layouts]
        parts = [p for p in parts if self.size[self.find(p)] > 0]
        s = self.new(sum(self.size[self.find(p)] for p in parts))
        self.refine[s] = ("concat", parts)
        return [s]

    def slice(self, layout: Layout, lo: int, hi: int) -> Layout:
        """The layout of channels [lo, hi) of a dim with this layout."""
        flat = self.flatten(layout)
        total = prod(self.size[f] for f in flat) if flat else 1
        if lo == 0 and hi == total:
            return list(layout)
        if not flat:
            raise LayoutConflict("slice of an empty layout")
        inner = prod(self.size[f] for f in flat[1:])
        if lo % inner or hi % inner:
            raise LayoutConflict(f"slice [{lo}:{hi}] cuts through channels of size {inner}")
        parts = self._parts(flat[0], lo // inner, hi // inner)
        head = parts[0] if len(parts) == 1 else self.concat([[p] for p in parts])[0]
        return [head] + flat[1:]

    def split_layout(self, layout: Layout, sizes: list[int]) -> list[Layout]:
        """Cut a layout into consecutive factors of the given sizes (a reshape)."""
        flat = self.flatten(layout)
        out: list[Layout] = []
        k = 0
        for s in sizes:
            if s == 1:
                out.append([self.new(1)])
                continue
            got: Layout = []
            need = s
            while need > 1:
                if k >= len(flat):
                    raise LayoutConflict("reshape sizes do not match")
                f = self.find(flat[k])
                fs = self.size[f]
                if fs <= need and need % fs == 0:
                    got.append(f)
                    need //= fs
                    k += 1
                elif fs > need and fs % need == 0:
                    flat[k : k + 1] = self._split_product(f, need)
                else:
                    raise LayoutConflict(f"reshape to {sizes} cuts through a factor of size {fs}")
            out.append(got)
        if k != len(flat):
            raise LayoutConflict("reshape sizes do not match")
        return out

    # -- annotations ---------------------------------------------------------------
    def mark(self, layout: Layout, reason: str) -> None:
        for s in layout:
            r = self.find(s)
            lst = self.reasons.setdefault(r, [])
            if reason not in lst:
                lst.append(reason)

    def tag(self, layout: Layout, tag: str) -> None:
        for s in self.flatten(layout):
            self.tags.setdefault(s, set()).add(tag)

    def note(self, layout: Layout, note: str, *, approximate: bool = False) -> None:
        """Record ``note`` on the spaces of ``layout`` (at most 8 notes a space);
        ``approximate``: the note says removal there only approximates the masked model,
        and the space is marked so (:attr:`approximate`) wherever the note is kept."""
        for s in layout:
            r = self.find(s)
            lst = self.notes.setdefault(r, [])
            if note not in lst and len(lst) < 8:
                lst.append(note)
            if approximate and note in lst:
                self.approximate.add(r)

    # -- results -------------------------------------------------------------------
    def tree(self, layout: Layout) -> Tree:
        kids = [self._tree(s) for s in layout]
        kids = [k for k in kids if k.size != 1]
        if len(kids) == 1:
            return kids[0]
        return Tree("merge", prod(k.size for k in kids), children=tuple(kids))

    def _tree(self, s: int) -> Tree:
        r = self.find(s)
        ref = self.refine[r]
        if ref is None:
            return Tree("leaf", self.size[r], space=r)
        kids = tuple(self._tree(c) for c in ref[1])
        if ref[0] == "merge":
            kids = tuple(k for k in kids if k.size != 1)
        return Tree(ref[0], self.size[r], children=kids)

    def owners(self) -> dict[int, set[int]]:
        """Root space -> root spaces it was refined from."""
        own: dict[int, set[int]] = {}
        for s in range(len(self.parent)):
            if self.parent[s] == s and self.refine[s] is not None:
                for c in self.refine[s][1]:
                    own.setdefault(self.find(c), set()).add(s)
        return own

    def inherited(self, space: int, owners: dict[int, set[int]]
                  ) -> tuple[list[str], set[str], list[str], bool]:
        """(reasons, tags, notes, approximate) of a space and of every space it was
        refined from (approximate: any of them is marked :attr:`approximate`)."""
        reasons: list[str] = []
        tags: set[str] = set()
        notes: list[str] = []
        approximate = False
        seen: set[int] = set()
        stack = [self.find(space)]
        while stack:
            s = stack.pop()
            if s in seen:
                continue
            seen.add(s)
            reasons.extend(r for r in self.reasons.get(s, []) if r not in reasons)
            tags |= self.tags.get(s, set())
            notes.extend(n for n in self.notes.get(s, []) if n not in notes)
            approximate = approximate or s in self.approximate
            stack.extend(self.find(o) for o in owners.get(s, ()))
        return reasons, tags, notes, approximate
