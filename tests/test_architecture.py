"""Architecture rules of the slimgraph package, checked on the source text (pure AST).

Over every module of ``slimgraph/``:

(a) no import cycle between slimgraph modules. Imports inside functions count (they
    still tie the two modules together; they only move the failure to run time); imports
    under ``if TYPE_CHECKING:`` do not (they never run);
(b) no name with a single leading underscore imported from another slimgraph module
    (``from slimgraph.x import _y``): a name used by another module is public, so it
    gets a public name;
(c) no module over ``MAX_LINES`` lines;
(d) every module has a module docstring;
(e) no module of ``slimgraph/passes/`` branches on the model kind: none reads
    ``is_onnx`` or ``onnx_model`` or imports an ``onnx*`` module outside ``backends/``
    (the ONNX-input implementations; writing ONNX files is an output); a pass asks the model
    interface (``state.kind``, :mod:`slimgraph.models`) where the kinds differ.

Nothing here imports slimgraph or any heavy library: the test reads and parses files.
``python tests/test_architecture.py`` prints every violation (all four rules) and exits
non-zero when there is one. docs/architecture.md explains the rules.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "slimgraph"
PACKAGE_DIR = Path(__file__).resolve().parents[1] / PACKAGE
MAX_LINES = 600


# -- reading the package ------------------------------------------------------------------

def module_files(package_dir: Path = PACKAGE_DIR, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under ``package_dir``
    (``pkg/__init__.py`` is the module ``pkg``)."""
    mods: dict[str, Path] = {}
    for f in sorted(package_dir.rglob("*.py")):
        parts = (package, *f.relative_to(package_dir).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


@dataclass(frozen=True)
class Import:
    """One imported name: ``target`` is the slimgraph module it makes the importer
    depend on (a submodule when the name is one, else the module it comes from)."""

    importer: str
    target: str
    name: str | None  # the name taken from ``target`` (None: ``import a.b`` / a submodule)
    source: str  # the module named in the statement
    line: int
    type_checking: bool  # under ``if TYPE_CHECKING:``: never runs


def _is_type_checking(test: ast.expr) -> bool:
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _import_nodes(tree: ast.AST) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement of a module, at any depth (functions, classes, try,
    if), with whether it sits under ``if TYPE_CHECKING:`` (its ``else`` runs)."""
    todo: list[tuple[ast.AST, bool]] = [(tree, False)]
    while todo:
        node, guarded = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, guarded
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend((child, True) for child in node.body)
            todo.extend((child, guarded) for child in node.orelse)
            continue
        todo.extend((child, guarded) for child in ast.iter_child_nodes(node))


def _longest_module(dotted: str, mods: dict[str, Path]) -> str | None:
    """The longest prefix of ``dotted`` that is a module of the package."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        name = ".".join(parts[:n])
        if name in mods:
            return name
    return None


def _absolute(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The module a ``from ... import`` names, relative forms resolved."""
    if not node.level:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports(mods: dict[str, Path] | None = None) -> list[Import]:
    """Every import of a package module by a package module (itself excluded)."""
    mods = module_files() if mods is None else mods
    found: list[Import] = []
    for importer, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        for node, guarded in _import_nodes(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target = _longest_module(alias.name, mods)
                    if target is not None and target != importer:
                        found.append(Import(importer, target, None, alias.name, node.lineno, guarded))
                continue
            source = _absolute(importer, is_package, node)
            base = _longest_module(source, mods)
            if base is None:
                continue  # not a module of the package
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if sub in mods:  # ``from pkg import submodule``
                    target, name = sub, None
                else:
                    target, name = base, alias.name
                if target != importer:
                    found.append(Import(importer, target, name, source, node.lineno, guarded))
    return found


# -- the rules ------------------------------------------------------------------------------

def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def import_cycles(found: list[Import]) -> list[list[str]]:
    """The strongly connected components (more than one module) of the import graph
    that runs (imports under ``if TYPE_CHECKING:`` left out), each sorted; iterative
    Tarjan, so deep graphs need no recursion."""
    edges: dict[str, set[str]] = {}
    for imp in found:
        if not imp.type_checking:
            edges.setdefault(imp.importer, set()).add(imp.target)
            edges.setdefault(imp.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    components.append(sorted(comp))
    return sorted(components)


def describe_cycle(component: list[str], found: list[Import]) -> str:
    """A component, and one shortest cycle through its first module, each step with the
    line of the import that makes it."""
    members = set(component)
    line: dict[tuple[str, str], int] = {}
    for imp in found:
        if not imp.type_checking and imp.importer in members and imp.target in members:
            line.setdefault((imp.importer, imp.target), imp.line)
    start = component[0]
    paths = {start: [start]}
    frontier = [start]
    cycle: list[str] = []
    while frontier and not cycle:
        nxt = []
        for v in frontier:
            for (a, b) in sorted(line):
                if a != v:
                    continue
                if b == start:
                    cycle = paths[v] + [start]
                    break
                if b not in paths:
                    paths[b] = paths[v] + [b]
                    nxt.append(b)
            if cycle:
                break
        frontier = nxt
    steps = "".join(f"{a}:{line[(a, b)]} -> " for a, b in zip(cycle, cycle[1:]))
    return f"{len(component)} modules {component}; one cycle (module:line of the import): {steps}{start}"


def private_imports(found: list[Import]) -> list[str]:
    """``importer: from source import _name (line n)`` for every private name (or
    private module) one package module imports from another."""
    bad = []
    for imp in found:
        private_module = any(_is_private(p) for p in imp.source.split("."))
        if (imp.name is not None and _is_private(imp.name)) or private_module:
            what = f"from {imp.source} import {imp.name}" if imp.name else f"import {imp.source}"
            bad.append(f"{imp.importer}: {what} (line {imp.line})")
    return sorted(set(bad))


def long_modules(mods: dict[str, Path] | None = None, limit: int = MAX_LINES) -> list[str]:
    mods = module_files() if mods is None else mods
    out = []
    for name, path in mods.items():
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > limit:
            out.append(f"{name}: {n} lines")
    return out


def modules_without_docstring(mods: dict[str, Path] | None = None) -> list[str]:
    mods = module_files() if mods is None else mods
    return [name for name, path in mods.items()
            if not ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))]


KIND_ATTRIBUTES = ("is_onnx", "onnx_model")


def kind_branches(mods: dict[str, Path] | None = None, package: str = PACKAGE) -> list[str]:
    """Rule (e): the places in ``PACKAGE.passes`` that ask for the model kind directly."""
    mods = module_files() if mods is None else mods
    bad = []
    for name, path in mods.items():
        if not name.startswith(f"{package}.passes"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in KIND_ATTRIBUTES:
                bad.append(f"{name}:{node.lineno} reads .{node.attr}")
        for node, _ in _import_nodes(tree):
            targets = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] + [a.name for a in node.names]
            if any(t.rsplit(".", 1)[-1].startswith("onnx") and
                   not t.startswith(f"{package}.backends") for t in targets):
                bad.append(f"{name}:{node.lineno} imports an ONNX module")
    return bad


# -- the tests ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def found() -> list[Import]:
    return imports()


def test_the_package_is_found():
    mods = module_files()
    assert PACKAGE in mods and f"{PACKAGE}.ir.dependency" in mods and len(mods) > 50


def test_no_import_cycles(found):
    cycles = [describe_cycle(c, found) for c in import_cycles(found)]
    assert not cycles, (
        f"{len(cycles)} import cycle(s) between slimgraph modules (imports inside "
        "functions count; move the shared pieces into a lower module):\n  "
        + "\n  ".join(cycles))


def test_no_private_names_imported_across_modules(found):
    bad = private_imports(found)
    assert not bad, (
        f"{len(bad)} private name(s) imported from another slimgraph module (give them "
        "public names):\n  " + "\n  ".join(bad))


def test_no_module_is_too_long():
    bad = long_modules()
    assert not bad, f"modules over {MAX_LINES} lines (split them):\n  " + "\n  ".join(bad)


def test_every_module_has_a_docstring():
    bad = modules_without_docstring()
    assert not bad, "modules without a module docstring:\n  " + "\n  ".join(bad)


def test_no_pass_branches_on_the_model_kind():
    bad = kind_branches()
    assert not bad, ("passes that ask for the model kind directly (ask state.kind, "
                     "slimgraph.models):\n  " + "\n  ".join(bad))


# -- the checker itself, on a small package written for the test --------------------------

def _package(tmp_path: Path, files: dict[str, str]) -> dict[str, Path]:
    for rel, text in files.items():
        path = tmp_path / "pkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return module_files(tmp_path / "pkg", "pkg")


def test_checker_counts_function_imports_and_every_import_form(tmp_path):
    mods = _package(tmp_path, {
        "__init__.py": '"""p"""\n',
        "sub/__init__.py": '"""s"""\n',
        "sub/a.py": '"""a"""\ndef f():\n    from . import b\n',  # relative, in a function
        "sub/b.py": '"""b"""\nimport pkg.sub.c as c\n',  # ``import a.b`` form
        "sub/c.py": '"""c"""\nfrom ..sub.a import f\n',  # two levels up
        "d.py": '"""d"""\nfrom pkg.sub import a\nfrom pkg.sub.c import _hidden, __all__\n',
    })
    found = imports(mods)
    assert import_cycles(found) == [["pkg.sub.a", "pkg.sub.b", "pkg.sub.c"]]
    assert describe_cycle(import_cycles(found)[0], found).endswith(
        "pkg.sub.a:3 -> pkg.sub.b:2 -> pkg.sub.c:2 -> pkg.sub.a")
    assert private_imports(found) == ["pkg.d: from pkg.sub.c import _hidden (line 3)"]


def test_checker_ignores_type_checking_imports_but_not_their_else(tmp_path):
    mods = _package(tmp_path, {
        "__init__.py": '"""p"""\n',
        "a.py": '"""a"""\nfrom pkg.b import g\n',
        "b.py": ('"""b"""\nimport typing\nif typing.TYPE_CHECKING:\n    from pkg.a import X\n'
                 'else:\n    X = None\n'),
        "c.py": '"""c"""\nfrom pkg import d\nif TYPE_CHECKING:\n    pass\nelse:\n    from pkg.c2 import y\n',
        "c2.py": '"""c2"""\nfrom pkg.c import z\n',
        "d.py": "x = 1\n" * (MAX_LINES + 1),
    })
    found = imports(mods)
    assert import_cycles(found) == [["pkg.c", "pkg.c2"]]
    assert long_modules(mods) == [f"pkg.d: {MAX_LINES + 1} lines"]
    assert modules_without_docstring(mods) == ["pkg.d"]


def test_checker_finds_kind_branches_in_passes_only(tmp_path):
    mods = _package(tmp_path, {
        "__init__.py": '"""p"""\n',
        "passes/__init__.py": '"""s"""\n',
        "passes/a.py": '"""a"""\ndef f(state):\n    if state.is_onnx:\n        pass\n',
        "passes/b.py": '"""b"""\ndef g():\n    from pkg.sparsity import onnx_path\n',
        "passes/c.py": ('"""c"""\nfrom pkg.backends.onnx_export import w\n'
                        'def h(state):\n    return state.kind.label\n'),
        "models.py": '"""m"""\ndef k(state):\n    return state.graph.onnx_model\n',
    })
    assert kind_branches(mods, "pkg") == ["pkg.passes.a:3 reads .is_onnx",
                                          "pkg.passes.b:3 imports an ONNX module"]


if __name__ == "__main__":
    all_imports = imports()
    problems = {
        "import cycles": [describe_cycle(c, all_imports) for c in import_cycles(all_imports)],
        "private imports": private_imports(all_imports),
        "kind branches in passes": kind_branches(),
        f"modules over {MAX_LINES} lines": long_modules(),
        "modules without a docstring": modules_without_docstring(),
    }
    for title, items in problems.items():
        print(f"{title}: {len(items)}")
        for item in items:
            print(f"  {item}")
    sys.exit(1 if any(problems.values()) else 0)
