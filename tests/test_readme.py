"""The README's code runs as written: every ``python`` block executes on its own (a fresh
namespace, in an empty folder), every ``bash`` block names scripts and options that exist,
and the public functions' docstring examples pass as doctests."""

from __future__ import annotations

import doctest
import importlib
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def _blocks(language: str) -> list[tuple[int, str]]:
    """(line number, code) of every fenced block of ``language``."""
    text = README.read_text()
    return [(text[: m.start()].count("\n") + 1, m.group(1))
            for m in re.finditer(rf"```{language}\n(.*?)```", text, re.S)]  # fmt: skip


PYTHON = _blocks("python")
BASH = _blocks("bash")


def test_the_readme_has_the_blocks_it_is_read_for():
    assert len(PYTHON) >= 6 and len(BASH) >= 8


@pytest.mark.parametrize("line,code", PYTHON, ids=[f"line{n}" for n, _ in PYTHON])
def test_python_block_runs_as_written(line, code, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a block may write files (server.save)
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "readme"})
    assert "print(" not in code or capsys.readouterr().out.strip(), "a block that prints printed nothing"


def _commands(code: str) -> list[list[str]]:
    """The commands of a bash block: one per line or ``&&`` / ``;`` part, comments dropped."""
    out = []
    for raw in code.splitlines():
        line = raw.split(" #", 1)[0].strip()
        for part in re.split(r"&&|;", line):
            words = shlex.split(part)
            while words and "=" in words[0] and not words[0].startswith("-"):  # VAR=value prefixes
                words = words[1:]
            if words:
                out.append(words)
    return out


def _with_sibling_imports(script: Path) -> str:
    """The script's source and that of the modules beside it that it imports (shared options)."""
    source = script.read_text()
    names = re.findall(r"^\s*(?:from|import)\s+(\w+)", source, re.M)
    siblings = [script.parent / f"{n}.py" for n in names if (script.parent / f"{n}.py").is_file()]
    return "\n".join([source, *(p.read_text() for p in siblings)])


@pytest.mark.parametrize("line,code", BASH, ids=[f"line{n}" for n, _ in BASH])
def test_bash_block_names_what_exists(line, code):
    """Each ``python path.py --option`` names a script of the checkout and options it parses;
    ``python -m pytest`` / ``pip`` / ``flwr`` lines point at paths that exist."""
    for words in _commands(code):
        if words[0] == "python" and len(words) > 1 and words[1].endswith(".py"):
            script = ROOT / words[1]
            assert script.is_file(), f"README.md:{line}: {words[1]} does not exist"
            source = _with_sibling_imports(script)
            for option in (w.split("=", 1)[0] for w in words[2:] if w.startswith("--")):
                assert f'"{option}"' in source, f"README.md:{line}: {words[1]} has no option {option}"
        elif words[0] == "flwr" and words[1] == "run":
            app = ROOT / words[2]
            assert (app / "pyproject.toml").is_file(), f"README.md:{line}: {words[2]} is not a Flower App"
        elif words[:3] == ["python", "-m", "cahfp_ops"]:
            assert set(words[3:]) <= {"--self-test"}, f"README.md:{line}: {words}"


DOCTESTED = ["cahfp_ops.ops", "cahfp_ops.fl.aggregate", "cahfp_ops.fl.trace"]


@pytest.mark.parametrize("module", DOCTESTED)
def test_docstring_examples_pass(module):
    import torch

    import cahfp_ops

    mod = importlib.import_module(module)
    result = doctest.testmod(mod, extraglobs={"torch": torch, "cahfp_ops": cahfp_ops}, verbose=False,
                             optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)  # fmt: skip
    assert result.attempted > 0, f"{module} has no docstring examples"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {module}"
