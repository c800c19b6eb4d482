"""The package's structure: no import cycle (imports inside functions count), the kernel
layer never imports the FL layer or the integrations, the FL layer reaches the kernel layer
only through ``cahfp_ops``'s public names, and every backend module offers the same functions."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import cahfp_ops
from cahfp_ops import cpp, reference
from cahfp_ops._operators import OPERATORS

PACKAGE = Path(cahfp_ops.__file__).resolve().parent
#: The backend interface: one function per registered operator (the one list, in _operators.py).
BACKEND_FUNCTIONS = OPERATORS
#: The op families: each backend keeps one file per family, under the same name
#: (``reference/NAME.py``, ``triton/NAME.py``, ``csrc/cpu/NAME.cpp`` with ``NAME.h``).
FAMILIES = ("scores", "masks", "slice", "aggregate", "robust", "packed")


def _module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, root: Path = PACKAGE) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import in the file, nested ones too."""
    this = _module_name(path, root)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((mod, [a.name for a in node.names]))
    return out


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package modules it imports (``from pkg import sub`` counts as importing
    ``sub`` alone, as in pylint's cyclic-import check)."""
    files = {_module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        for target, names in _imports(path, root):
            if target not in files:
                continue
            submodules = {f"{target}.{n}" for n in names if f"{target}.{n}" in files}
            graph[mod] |= submodules
            if not names or len(submodules) < len(names):  # names defined in the module itself
                graph[mod].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None. A package ``__init__`` importing its own
    submodules is how packages expose them, and a submodule importing its parent is a cycle."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for t in sorted(graph[m]):
            if m == t:
                continue
            if state.get(t) == 1:
                return path[path.index(t) :] + [t]
            if t not in state:
                found = visit(t)
                if found:
                    return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None, find_cycle(import_graph())


def test_cycle_finder_finds_a_planted_cycle(tmp_path):
    pkg = tmp_path / "cahfp_ops"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .a import g\n")
    assert find_cycle(import_graph(pkg)) == ["cahfp_ops.a", "cahfp_ops.b", "cahfp_ops.a"]


def test_kernel_layer_never_imports_fl_or_integrations():
    graph = import_graph()
    for mod, targets in graph.items():
        if mod.startswith(("cahfp_ops.fl", "cahfp_ops.integrations")):
            continue
        bad = {t for t in targets if t.startswith(("cahfp_ops.fl", "cahfp_ops.integrations"))}
        assert not bad, f"{mod} imports {bad}"


def test_fl_uses_only_the_public_kernel_api():
    public = set(cahfp_ops.__all__)
    for path in (PACKAGE / "fl").rglob("*.py"):
        for target, names in _imports(path):
            if target.startswith("cahfp_ops.fl") or not target.startswith("cahfp_ops"):
                continue
            assert target == "cahfp_ops" and set(names) <= public, f"{path.name} imports {names} from {target}"


def test_the_operator_list_covers_every_operator():
    import torch

    registered = {name for name in dir(torch.ops.cahfp) if isinstance(getattr(torch.ops.cahfp, name),
                                                                        torch._ops.OpOverloadPacket)}  # fmt: skip
    assert registered == set(OPERATORS) and len(OPERATORS) == 12


def test_every_backend_keeps_one_file_per_family_under_one_name():
    csrc = PACKAGE / "_csrc" if (PACKAGE / "_csrc").is_dir() else PACKAGE.parent / "csrc"
    homes = {"reference": PACKAGE / "reference", "triton": PACKAGE / "triton"}
    for family in FAMILIES:
        for backend, folder in homes.items():
            assert (folder / f"{family}.py").is_file(), f"{backend} has no {family}.py"
        assert (csrc / "cpu" / f"{family}.cpp").is_file() and (csrc / "cpu" / f"{family}.h").is_file(), family
    # and each operator is defined in its family's file of every Python backend
    for name in OPERATORS:
        for folder in homes.values():
            if folder.name == "triton" and not (folder / "__init__.py").is_file():
                continue
            defined = [f.stem for f in folder.glob("*.py") if f"\ndef {name}(" in f.read_text()]
            assert len(defined) == 1 and defined[0] in FAMILIES, (folder.name, name, defined)


@pytest.mark.parametrize("name", BACKEND_FUNCTIONS)
def test_backends_share_one_interface(name):
    modules = [cpp, reference]
    try:
        from cahfp_ops import triton as triton_backend

        modules.append(triton_backend)
    except ImportError:
        pass
    signatures = {m.__name__: [p.name for p in inspect.signature(getattr(m, name)).parameters.values()
                               if p.kind != p.KEYWORD_ONLY]  # a backend's own tuning knobs are keyword-only
                  for m in modules}  # fmt: skip
    assert len({tuple(s) for s in signatures.values()}) == 1, signatures


def test_public_operators_and_private_compiled_namespace():
    """The public operators live in ``torch.ops.cahfp``; the compiled kernels only in the private
    ``torch.ops._cahfp_cpp`` (no public-looking ``cahfp_cpp`` namespace)."""
    import torch

    for name in BACKEND_FUNCTIONS:
        assert hasattr(torch.ops.cahfp, name)
    assert cahfp_ops.load_cpp()
    for name in BACKEND_FUNCTIONS:
        assert hasattr(torch.ops._cahfp_cpp, name)
        assert not hasattr(torch.ops.cahfp_cpp, name)
