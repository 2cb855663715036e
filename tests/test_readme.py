"""README.md's Python examples run as written, each in a fresh namespace after
`import fusedrnn` (in a temporary directory, so files they write go nowhere)."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.M | re.S)


def _blocks():
    text = README.read_text()
    return [pytest.param(text.count("\n", 0, m.start()) + 1, m.group(1),
                         id=f"README.md:{text.count(chr(10), 0, m.start()) + 1}")
            for m in BLOCK.finditer(text)]


BLOCKS = _blocks()


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 3  # the pattern still finds README's blocks


@pytest.mark.parametrize("line,code", BLOCKS)
def test_readme_example_runs(line, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # Padded so that a traceback names the README line.
    source = "import fusedrnn" + "\n" * line + code
    exec(compile(source, str(README), "exec"), {"__name__": "readme_example"})
