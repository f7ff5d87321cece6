"""Every ```python block of README.md runs as written: each in a fresh namespace, in a folder where
``out/shapes-demo`` (the demo's output dir, which the blocks read) is the session's small generated
dataset (conftest ``dataset``: the same pipeline and format, 16 samples in 4 shards)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
TEXT = README.read_text()
#: (README line of the block's first code line, code)
BLOCKS = [(TEXT.count("\n", 0, m.start(1)) + 1, m.group(1))
          for m in re.finditer(r"^```python\n(.*?)^```", TEXT, re.S | re.M)]


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 2, "no ```python blocks found: has the README's fence style changed?"


@pytest.fixture
def demo_folder(dataset, tmp_path, monkeypatch):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "shapes-demo").symlink_to(dataset.out, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("line, code", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_a_readme_python_block_runs_as_written(line, code, demo_folder):
    # padded so that a traceback names the README's own line numbers
    exec(compile("\n" * (line - 1) + code, str(README), "exec"), {"__name__": "__readme__"})
