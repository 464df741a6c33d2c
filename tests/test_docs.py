"""Docs that cannot drift: every ```bash and ```python block of README.md and docs/*.md runs, in page order.

How a page is run:
- its blocks run one after another in one working directory shared by all pages of the session (where
  `tests/` and `benchmarks/` are this checkout's, as in the repository root), with this checkout's `vistok` first on PATH (and on PYTHONPATH), OMP_NUM_THREADS=1 and TQDM_DISABLE=1;
  bash blocks under `bash -euo pipefail`, python blocks with this interpreter;
- a path under `/tmp/` in a block is mapped into the session's temporary directory, so runs never meet;
- an HTML comment right before a block steers it:
    `<!-- docs-test: skip REASON -->`       not run (real weights, a GPU, several processes ...): REASON is shown
    `<!-- docs-test: expect-error -->`      the block must fail (it shows an error message)
    `<!-- docs-test: setup` + lines + `-->` bash run before the block (also when it is skipped), hidden from
                                            the reader: e.g. a random-weight stand-in for a release the skipped block
                                            converts from real weights
    `<!-- docs-test: write PATH -->`        the next block (any language, e.g. a JSON config the text says to
                                            save) is written to PATH (relative to the working directory)
- page-wide comments anywhere in the page:
    `<!-- docs-test: slow -->`              the page runs only with `-m slow` (it trains or builds big models)
    `<!-- docs-test: needs PAGE.md ... -->` run after those pages, skipped when they did not pass this session

A failure names the page, the block's line and the tail of its output.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^\s*```(\w*)\s*$")  # also indented, inside a list item
MARK = re.compile(r"<!--\s*docs-test:\s*(.*?)\s*-->", re.S)
TIMEOUT = 900


@dataclass
class Block:
    page: str
    line: int
    lang: str
    code: str
    skip: str | None = None
    expect_error: bool = False
    setup: str = ""
    write: str | None = None


@dataclass
class Page:
    name: str
    blocks: list[Block] = field(default_factory=list)
    slow: bool = False
    needs: list[str] = field(default_factory=list)


def parse_page(path: Path) -> Page:
    text = path.read_text()
    page = Page(path.name if path.parent == ROOT else f"docs/{path.name}")
    for mark in MARK.findall(text):
        words = mark.split()
        if words and words[0] == "slow":
            page.slow = True
        elif words and words[0] == "needs":
            page.needs += words[1:]
    lines = text.splitlines()
    i = 0
    pending: list[str] = []  # docs-test comments since the last block
    while i < len(lines):
        if lines[i].lstrip().startswith("<!--") and "docs-test:" in lines[i]:
            start = i
            while "-->" not in lines[i]:
                i += 1
            pending += MARK.findall("\n".join(lines[start:i + 1]))
            i += 1
            continue
        m = FENCE.match(lines[i])
        if not m:
            if lines[i].strip():  # prose between a comment and a block: the comment was not about a block
                pending = []
            i += 1
            continue
        lang, start = m.group(1), i
        i += 1
        body = []
        while i < len(lines) and not lines[i].strip().startswith("```"):
            body.append(lines[i])
            i += 1
        i += 1
        body = textwrap.dedent("\n".join(body)).splitlines()
        write = next((p[5:].strip() for p in pending if p.startswith("write")), None)
        if lang in ("bash", "python") or write:
            block = Block(page.name, start + 1, lang, "\n".join(body) + "\n", write=write)
            for p in pending:
                if p.startswith("skip"):
                    block.skip = p[4:].strip() or "marked skip"
                elif p.startswith("expect-error"):
                    block.expect_error = True
                elif p.startswith("setup"):
                    block.setup += p[5:].strip() + "\n"
            page.blocks.append(block)
        pending = []
    return page


@pytest.fixture(scope="session")
def docs_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs")
    (root / "bin").mkdir()
    (root / "work").mkdir()
    (root / "work" / "tests").symlink_to(ROOT / "tests")  # pages name test data as tests/data/... (repo root)
    (root / "work" / "benchmarks").symlink_to(ROOT / "benchmarks")  # ... and run benchmarks/*.py
    wrapper = root / "bin" / "vistok"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m vistok "$@"\n')
    wrapper.chmod(0o755)
    env = {**os.environ, "PATH": f"{root / 'bin'}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}"
                                 f"{os.environ.get('PATH', '')}",
           "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("VISTOK_DEBUG", None)
    return {"root": root, "env": env, "passed": set()}


def _localise(code: str, root: Path) -> str:
    """Doc paths under /tmp/ -> the session's directory (never a shared /tmp/ folder)."""
    return re.sub(r"(?<![\w.])/tmp/", f"{root}/tmp/", code)


def run_block(block: Block, env: dict, root: Path) -> None:
    (root / "tmp").mkdir(exist_ok=True)
    work = root / "work"
    if block.write:
        target = work / _localise(block.write, root)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(_localise(block.code, root))
        return
    if block.setup:
        res = subprocess.run(["bash", "-euo", "pipefail", "-c", _localise(block.setup, root)], cwd=work, env=env,
                             capture_output=True, text=True, timeout=TIMEOUT)
        assert res.returncode == 0, f"{block.page}:{block.line}: setup failed:\n{res.stdout[-2000:]}{res.stderr[-3000:]}"
    code = _localise(block.code, root)
    if block.lang == "bash":
        cmd = ["bash", "-euo", "pipefail", "-c", code]
    else:
        cmd = [sys.executable, "-c", code]
    res = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    tail = f"\n--- stdout ---\n{res.stdout[-2000:]}\n--- stderr ---\n{res.stderr[-3000:]}"
    if block.expect_error:
        assert res.returncode != 0, f"{block.page}:{block.line}: the block should fail (it shows an error){tail}"
    else:
        assert res.returncode == 0, f"{block.page}:{block.line}: {block.lang} block failed{tail}"


ALL = [parse_page(p) for p in PAGES]
ORDER = {p.name: i for i, p in enumerate(ALL)}


def _ordered(pages: list[Page]) -> list[Page]:
    """Pages after the pages they need (stable otherwise)."""
    done: list[Page] = []
    by_name = {p.name: p for p in pages}

    def visit(p: Page, seen: tuple = ()) -> None:
        if p in done or p.name in seen:
            return
        for need in p.needs:
            if need in by_name:
                visit(by_name[need], seen + (p.name,))
        done.append(p)

    for p in pages:
        visit(p)
    return done


def _param(page: Page):
    marks = [pytest.mark.slow] if page.slow else []
    return pytest.param(page, id=page.name, marks=marks)


@pytest.mark.parametrize("page", [_param(p) for p in _ordered(ALL)])
def test_doc_page_runs(page: Page, docs_env):
    missing = [n for n in page.needs if n not in docs_env["passed"]]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}, which did not pass in this session")
    skipped = []
    for block in page.blocks:
        if block.skip:
            skipped.append(f"{block.page}:{block.line} ({block.skip})")
            if block.setup:  # a stand-in for what the skipped block would have made
                run_block(Block(block.page, block.line, "bash", block.setup), docs_env["env"], docs_env["root"])
            continue
        run_block(block, docs_env["env"], docs_env["root"])
    docs_env["passed"].add(page.name)
    if skipped:  # shown with -rA / in the summary, the page itself passed
        print("skipped blocks:", *skipped, sep="\n  ")


def test_markers_parse():
    """The runner's own contract on a page written for it."""
    page = parse_page_text("""
<!-- docs-test: slow -->
<!-- docs-test: needs docs/training.md -->
```bash
echo one
```
<!-- docs-test: skip needs the real kl16.ckpt -->
```bash
vistok convert mar-kl16 kl16.ckpt out
```
text between

<!-- docs-test: expect-error -->
```bash
vistok info nope
```
<!-- docs-test: setup
mkdir -p photos
-->
```python
print(1)
```
```text
not run
```
<!-- docs-test: write /tmp/cfg/run.json -->
```json
{"a": 1}
```
""")
    assert page.slow and page.needs == ["docs/training.md"]
    assert [(b.lang, b.skip, b.expect_error, b.setup.strip()) for b in page.blocks] == [
        ("bash", None, False, ""), ("bash", "needs the real kl16.ckpt", False, ""), ("bash", None, True, ""),
        ("python", None, False, "mkdir -p photos"), ("json", None, False, "")]
    assert page.blocks[-1].write == "/tmp/cfg/run.json" and page.blocks[-1].code == '{"a": 1}\n'
    assert _localise("ls /tmp/trdocs a/tmp/b", Path("/r")) == "ls /r/tmp/trdocs a/tmp/b"


def parse_page_text(text: str) -> Page:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "page.md"
        path.write_text(text)
        return parse_page(path)
