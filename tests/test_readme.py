"""The README's self-contained examples run as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
SECTIONS = ["### Your own models", "### Models tracing cannot handle"]


@pytest.mark.parametrize("heading", SECTIONS)
def test_readme_example_runs(heading, capsys):
    text = README.read_text()
    assert heading in text, heading
    code = re.search(r"```python\n(.*?)```", text[text.index(heading) :], re.S).group(1)
    exec(compile(code, f"README.md {heading}", "exec"), {"__name__": "readme"})
    assert "torch.Size" in capsys.readouterr().out
