"""Every fenced code block of README.md and docs/*.md runs as written (issue 25), top to bottom per page.

The conventions (docs/design.md, "Executable docs"):

- A page runs in a fresh temporary folder (the current directory) with one Python namespace. An HTML comment
  ``<!-- setup ... -->`` holds Python run first, hidden from the rendered page (it writes inputs with
  :func:`medexplain.examples.write` or builds small objects); what a reader needs to know is said in the text.
- The info string's first word is the language: ``python`` blocks are exec'd in the page's namespace;
  ``bash`` / ``console`` blocks are commands, one per line (``\\`` continues a line; a ``console`` block's
  commands start with ``$ ``, its other lines are output). ``medexplain ...`` commands run in-process through
  the Typer app (as ``python -m medexplain``), others through bash. A command whose comment starts with
  ``# error`` must fail with a typed error (exit status 2). ``text`` blocks are output or listings, never run.
- Further words: ``slow`` (run only in the slow set, ``pytest -m slow``), ``norun`` (installs, cluster
  set-up, ``make`` targets: only for blocks of such commands, and never for a ``medexplain`` command).

A failure names the page, the block, its line in the page and the line that failed.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGS = {"python", "bash", "console", "text"}
FLAGS = {"slow", "norun"}
#: The commands a ``norun`` block may hold: installs, cluster set-up, make targets, the benches.
NORUN_COMMANDS = ("make", "pip", "ray", ".venv/bin/python", "python")

FENCE = re.compile(r"^```(.*)$")
SETUP = re.compile(r"<!--\s*setup\s*\n(.*?)-->", re.S)


class DocsError(AssertionError):
    """A block of a page failed (or is malformed); the message says where."""


@dataclass
class Block:
    page: str
    index: int           # 1-based among the page's fenced blocks; 0 = the hidden setup
    line: int            # line of the block's first code line in the page (1-based)
    lang: str
    flags: set = field(default_factory=set)
    code: str = ""

    def where(self, line: int | None = None) -> str:
        what = "hidden setup" if self.index == 0 else f"block {self.index} (```{' '.join([self.lang, *sorted(self.flags)])})"
        return f"{self.page}: {what} starting at line {self.line}" + (f", failed at line {line}" if line else "")


def parse(path: Path, name: str | None = None) -> list[Block]:
    """The page's hidden setup (if any) and fenced blocks, in order; a malformed block raises :class:`DocsError`."""
    name = name or str(path.relative_to(ROOT))
    text = path.read_text()
    blocks = []
    for m in SETUP.finditer(text):
        blocks.append(Block(name, 0, text[:m.start(1)].count("\n") + 1, "python", set(), m.group(1)))
    lines = text.split("\n")
    i, n = 0, 0
    while i < len(lines):
        f = FENCE.match(lines[i])
        if not f:
            i += 1
            continue
        n += 1
        words = f.group(1).split()
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        if j == len(lines):
            raise DocsError(f"{name}: block {n} at line {i + 1} is never closed")
        if not words or words[0] not in LANGS or set(words[1:]) - FLAGS:
            raise DocsError(f"{name}: block {n} at line {i + 1} has info string {f.group(1)!r}: the first word must be "
                            f"one of {sorted(LANGS)} (text: output, not run), then optionally {sorted(FLAGS)}")
        blocks.append(Block(name, n, i + 2, words[0], set(words[1:]), "\n".join(lines[i + 1:j])))
        i = j + 1
    blocks.sort(key=lambda b: b.line)
    return blocks


def commands(block: Block) -> list[tuple[int, str]]:
    """(page line, command) of a bash/console block: continuation lines joined, comment-only lines dropped."""
    out, cur, start = [], "", 0
    for k, raw in enumerate(block.code.split("\n")):
        line = raw.rstrip()
        if block.lang == "console" and not cur:
            if not line.startswith("$ "):
                continue                      # output
            line = line[2:]
        if not cur and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if not cur:
            start = block.line + k
        cur += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            out.append((start, cur))
            cur = ""
    return out


def _split(cmd: str) -> tuple[list[str], str]:
    """(arguments, trailing comment) of a command line."""
    body, _, comment = cmd.partition(" #")
    return shlex.split(body), comment.strip()


def _run_command(block: Block, line: int, cmd: str, cwd: Path):
    from typer.testing import CliRunner

    from medexplain.cli import app
    args, comment = _split(cmd)
    expect_error = comment.lower().startswith("error")
    if args and args[0] == "medexplain":
        res = CliRunner().invoke(app, args[1:], catch_exceptions=True)
        rc, output = res.exit_code, res.output
        if res.exception is not None and not isinstance(res.exception, SystemExit):
            output += "".join(traceback.format_exception(res.exception))
    else:
        p = subprocess.run(["bash", "-c", cmd.partition(" #")[0]], cwd=cwd, capture_output=True, text=True)
        rc, output = p.returncode, p.stdout + p.stderr
    if expect_error and rc != 2:
        raise DocsError(f"{block.where(line)}: `{cmd}` is documented to fail with a typed error (exit 2) but "
                        f"exited {rc}:\n{output[-3000:]}")
    if not expect_error and rc != 0:
        raise DocsError(f"{block.where(line)}: `{cmd}` exited {rc}:\n{output[-3000:]}")


def _run_python(block: Block, ns: dict):
    code = compile("\n" * (block.line - 1) + block.code, block.page, "exec")
    try:
        exec(code, ns)
    except Exception as e:
        frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == block.page]
        line = frames[-1].lineno if frames else None
        src = frames[-1].line if frames else ""
        raise DocsError(f"{block.where(line)}: `{src}` raised {type(e).__name__}: {e}\n"
                        + "".join(traceback.format_exception(e))[-3000:]) from e


def check_norun(block: Block):
    for line, cmd in commands(block):
        first = cmd.split()[0]
        if first == "medexplain" or not first.startswith(NORUN_COMMANDS):
            raise DocsError(f"{block.where(line)}: a `norun` block may hold only {NORUN_COMMANDS} commands, not `{cmd}`")


def run_page(path: Path, workdir: Path, slow: bool, name: str | None = None) -> list[Block]:
    """Run the page's blocks in order in ``workdir``; ``slow``: also the blocks marked slow. Returns the blocks run."""
    import sys

    blocks = parse(path, name)
    ns = {"__name__": "__docs__"}
    ran = []
    old, old_path, old_modules = Path.cwd(), list(sys.path), set(sys.modules)
    os.chdir(workdir)
    try:
        for b in blocks:
            if b.lang == "text":
                continue
            if "norun" in b.flags:
                check_norun(b)
                continue
            if "slow" in b.flags and not slow:
                continue
            if b.lang == "python":
                _run_python(b, ns)
            else:
                for line, cmd in commands(b):
                    _run_command(b, line, cmd, workdir)
            ran.append(b)
    finally:
        os.chdir(old)
        # modules the page imported from its folder (mynets.py of medexplain examples) must not shadow another
        # test's module of the same name
        sys.path[:] = old_path
        root = str(Path(workdir).resolve())
        for m in set(sys.modules) - old_modules:
            f = getattr(sys.modules[m], "__file__", None) or ""
            if f and str(Path(f).resolve()).startswith(root):
                del sys.modules[m]
    return ran


def _has_slow(path: Path) -> bool:
    try:
        return any("slow" in b.flags for b in parse(path))
    except DocsError:
        return False           # test_docs_page_runs reports it


@pytest.fixture
def docs_env(monkeypatch, one_thread):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("COLUMNS", "200")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_page_runs(page, tmp_path, docs_env):
    run_page(page, tmp_path, slow=False)


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if _has_slow(p)], ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_page_runs_with_slow_blocks(page, tmp_path, docs_env):
    run_page(page, tmp_path, slow=True)


# --- the collector itself ------------------------------------------------------------------------------
PLANTED = """# A page

<!-- setup
import math
-->

Some text.

```python
y = math.sqrt(4)
```

```text
this is output, not code
```

```python
z = y + 1
w = undefined_name + z
```
"""


def test_a_planted_broken_python_block_fails_naming_page_block_and_line(tmp_path, docs_env):
    page = tmp_path / "page.md"
    page.write_text(PLANTED)
    with pytest.raises(DocsError) as e:
        run_page(page, tmp_path, slow=False, name="page.md")
    msg = str(e.value)
    assert "page.md: block 3 (```python) starting at line 18, failed at line 19" in msg
    assert "w = undefined_name + z" in msg and "NameError" in msg
    fixed = tmp_path / "fixed.md"
    fixed.write_text(PLANTED.replace("undefined_name", "y"))
    assert [b.index for b in run_page(fixed, tmp_path, slow=False, name="fixed.md")] == [0, 1, 3]


def test_a_planted_broken_command_fails_and_an_expected_error_must_fail(tmp_path, docs_env):
    page = tmp_path / "cli.md"
    page.write_text("```bash\nmedexplain methods\nmedexplain explain missing.png --model zoo:chest_xray \\\n"
                    "    --method saliency\n```\n")
    with pytest.raises(DocsError, match=r"cli.md: block 1 \(```bash\) starting at line 2, failed at line 3: "
                                        r"`medexplain explain missing.png"):
        run_page(page, tmp_path, slow=False, name="cli.md")
    page.write_text("```bash\nmedexplain explain missing.png --model zoo:chest_xray   # error: no such file\n```\n")
    run_page(page, tmp_path, slow=False, name="cli.md")
    page.write_text("```bash\nmedexplain methods   # error: this one succeeds\n```\n")
    with pytest.raises(DocsError, match="documented to fail"):
        run_page(page, tmp_path, slow=False, name="cli.md")


def test_malformed_blocks_are_refused(tmp_path, docs_env):
    page = tmp_path / "p.md"
    page.write_text("```\nprint(1)\n```\n")
    with pytest.raises(DocsError, match="first word must be one of"):
        run_page(page, tmp_path, slow=False, name="p.md")
    page.write_text("```bash norun\nmedexplain methods\n```\n")
    with pytest.raises(DocsError, match="a `norun` block may hold only"):
        run_page(page, tmp_path, slow=False, name="p.md")
    page.write_text("```python slow\nraise RuntimeError('slow block ran')\n```\n")
    run_page(page, tmp_path, slow=False, name="p.md")
    with pytest.raises(DocsError, match="slow block ran"):
        run_page(page, tmp_path, slow=True, name="p.md")
