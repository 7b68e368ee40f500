"""The README's Python quick start runs as written."""
import re
from pathlib import Path


def test_readme_quick_start_runs():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"## Quick start \(Python\)\n\n```python\n(.*?)```", text, re.S).group(1)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["attr"].map.shape == (2, 2, 32, 32, 32)
    assert scope["cam"].map.shape == (2, 1, 32, 32, 32)
