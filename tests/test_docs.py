"""The documentation under docs/: every example runs, generated sections are current, the site builds.

- Every fenced ``python`` block of every page runs, on the CPU, page by page: the blocks of a page
  in order in one namespace, with the repository root as working directory. A block preceded by
  ``<!-- docs-test: skip REASON -->`` is not run (GPU-only code, downloads, shell commands); a
  ``<!-- docs-test: setup ... -->`` comment holds hidden code run before the next block.
- Generated sections (``code/scripts/gen_config_page.py``) match the code and the committed JSON.
- Repository paths the pages mention exist.
- ``>>>`` examples in the docstrings of ``src/dorafactors`` run (doctest).
- ``mkdocs build --strict`` passes, when MkDocs is installed (``requirements-docs.txt``); without
  it that test is skipped, unless ``DORAFACTORS_DOCS_BUILD=1`` demands the build (CI's docs step).
"""

from __future__ import annotations

import dataclasses
import doctest
import importlib
import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS = REPO_ROOT / "docs"
SCRIPTS = REPO_ROOT / "code" / "scripts"

_SKIP = re.compile(r"<!-- docs-test: skip (?P<reason>\S.*?) -->")
_SETUP_OPEN = "<!-- docs-test: setup"
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)[ \t]*(?P<lang>[\w+-]*)[^\n]*$")
_LANGUAGES = {"python", "bash", "text", "yaml", "json", "toml", "console"}
# Paths that live in other trees (the patched PEFT tree), not in this repository.
_FOREIGN_PATHS = {"docs/dora.reference_hf_peft.py"}


@dataclasses.dataclass
class Block:
    page: Path
    line: int  # 1-based line of the first code line
    lang: str
    code: str
    kind: str  # "run", "skip" or "setup"
    reason: Optional[str] = None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO_ROOT)}:{self.line}"


def pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if "_tooling" not in p.parts)


def parse(page: Path) -> list[Block]:
    """The fenced blocks and hidden setup code of ``page``, in order; raises on a malformed marker."""
    lines = page.read_text().splitlines()
    blocks: list[Block] = []
    skip: Optional[str] = None
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith("<!-- docs-test:"):
            if skip is not None:
                raise ValueError(f"{page}:{i + 1}: a docs-test marker must be followed by a fenced block")
            match = _SKIP.fullmatch(stripped)
            if match:
                skip = match.group("reason")
                i += 1
                continue
            if stripped == _SETUP_OPEN:
                end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "-->"), None)
                if end is None:
                    raise ValueError(f"{page}:{i + 1}: unterminated docs-test setup comment")
                blocks.append(Block(page, i + 2, "python", "\n".join(lines[i + 1 : end]), "setup"))
                i = end + 1
                continue
            raise ValueError(f"{page}:{i + 1}: unknown docs-test marker {stripped!r} (skip REASON, or setup)")
        fence = _FENCE.match(line)
        if fence:
            indent, mark, lang = fence.group("indent"), fence.group("fence"), fence.group("lang")
            end = next(
                (j for j in range(i + 1, len(lines)) if lines[j].strip().startswith(mark[0] * len(mark))
                 and not lines[j].strip().strip(mark[0])),
                None,
            )
            if end is None:
                raise ValueError(f"{page}:{i + 1}: unterminated code fence")
            body = [ln[len(indent):] if ln.startswith(indent) else ln for ln in lines[i + 1 : end]]
            kind = "skip" if skip is not None else ("run" if lang == "python" else "skip")
            blocks.append(Block(page, i + 2, lang, "\n".join(body), kind, skip))
            skip = None
            i = end + 1
            continue
        if skip is not None and stripped:
            raise ValueError(f"{page}:{i + 1}: a docs-test skip marker must be followed directly by a fenced block")
        i += 1
    if skip is not None:
        raise ValueError(f"{page}: a docs-test skip marker at the end of the page")
    return blocks


ALL_BLOCKS = {page: parse(page) for page in pages()}
RUNNABLE_PAGES = [p for p, blocks in ALL_BLOCKS.items() if any(b.kind == "run" for b in blocks)]


def test_examples_are_marked():
    """Every fence has a known language; a python block either runs or says why not."""
    problems = []
    for blocks in ALL_BLOCKS.values():
        for b in blocks:
            if b.lang not in _LANGUAGES:
                problems.append(f"{b.where}: fence language {b.lang!r}; use one of {sorted(_LANGUAGES)}")
            if b.lang == "python" and b.kind == "skip" and not (b.reason or "").strip():
                problems.append(f"{b.where}: skipped python block without a reason")
    assert not problems, "\n".join(problems)
    runnable = sum(b.kind == "run" for blocks in ALL_BLOCKS.values() for b in blocks)
    assert runnable >= 15, f"only {runnable} runnable examples found: did the parser break?"


@pytest.fixture
def docs_sandbox(monkeypatch):
    """Repository root as working directory; environment and the plugin switch restored afterwards."""
    import dorafactors

    monkeypatch.chdir(REPO_ROOT)
    saved_env = dict(os.environ)
    was_enabled = dorafactors.is_enabled()
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        (dorafactors.enable if was_enabled else dorafactors.disable)()
        dorafactors.invalidate_norm_cache()


@pytest.mark.parametrize("page", RUNNABLE_PAGES, ids=[str(p.relative_to(DOCS)) for p in RUNNABLE_PAGES])
def test_page_examples(page: Path, docs_sandbox, capsys):
    """Run the page's python blocks in order, in one namespace (like a reader pasting them)."""
    namespace: dict = {"__name__": f"docs_example_{page.stem.replace('-', '_')}"}
    ran = 0
    t0 = time.perf_counter()
    for block in ALL_BLOCKS[page]:
        if block.kind not in ("run", "setup"):
            continue
        # pad so that tracebacks show the page's own line numbers
        code = compile("\n" * (block.line - 1) + block.code, str(block.page), "exec")
        try:
            exec(code, namespace)
        except BaseException as exc:
            raise AssertionError(f"docs example at {block.where} failed: {type(exc).__name__}: {exc}") from exc
        ran += block.kind == "run"
    with capsys.disabled():
        print(f"\n  docs examples: {ran} ran from {page.relative_to(REPO_ROOT)} in {time.perf_counter() - t0:.1f}s")


def _gen():
    sys.path.insert(0, str(SCRIPTS))
    try:
        return importlib.import_module("gen_config_page")
    finally:
        sys.path.remove(str(SCRIPTS))


def test_generated_sections_current():
    stale = _gen().check(write=False)
    assert not stale, "\n".join(diff for _, _, diff in stale) + "\nrun: python code/scripts/gen_config_page.py"


def test_configuration_page_is_generated_from_the_code():
    """The sections exist (deleting them cannot pass) and name every variable and field."""
    gen = _gen()
    env = gen.load_env_module()
    text = (DOCS / "configuration.md").read_text()
    for name in ("env-vars", "env-errors", "config-fields", "env-elsewhere"):
        assert f"<!-- BEGIN GENERATED {name}" in text, f"configuration.md lost its generated section {name}"
    for var in env.ENV_VARS:
        assert f"`{var}`" in text
    for field in dataclasses.fields(env.DoraEnvConfig):
        assert f"`{field.name}`" in text
    index = (DOCS / "index.md").read_text()
    for name in ("bench-layer", "bench-kernels"):
        assert f"<!-- BEGIN GENERATED {name} source=" in index, f"index.md lost its generated section {name}"


_PATH = re.compile(r"(?<![\w/.-])((?:code|src|tests|docs|\.ci)/[\w./-]*\w|requirements(?:-docs)?\.txt|hf\.patch|mkdocs\.yml)")


def test_mentioned_repository_paths_exist():
    missing = []
    for page in pages():
        for n, line in enumerate(page.read_text().splitlines(), 1):
            for path in _PATH.findall(line):
                if path not in _FOREIGN_PATHS and not (REPO_ROOT / path).exists():
                    missing.append(f"{page.relative_to(REPO_ROOT)}:{n}: {path}")
    assert not missing, "paths named in the docs that do not exist:\n" + "\n".join(missing)


_MODULES = ("dorafactors", "dorafactors.plugin", "dorafactors.dora_env", "dorafactors.dora",
            "dorafactors.dora_variants", "dorafactors.dora_fused", "dorafactors.dora_fused_naive")


def test_docstring_examples():
    """``>>>`` examples in the docstrings of the API reference run (none is fine; failing ones are not)."""
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    examples = 0
    for name in _MODULES:
        module = importlib.import_module(name)
        for test in finder.find(module, name):
            if test.examples and test.filename and Path(test.filename).resolve().is_relative_to(REPO_ROOT / "src"):
                examples += len(test.examples)
                runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed (output above)"
    if examples == 0:
        pytest.skip("no >>> examples in the docstrings of src/dorafactors yet")


def _docs_toolchain_missing() -> list[str]:
    needed = ("mkdocs", "mkdocstrings", "mkdocstrings_handlers.python", "material")
    missing = []
    for name in needed:
        try:
            if importlib.util.find_spec(name) is None:
                missing.append(name)
        except ModuleNotFoundError:
            missing.append(name)
    return missing


def test_site_builds_strict(tmp_path):
    missing = _docs_toolchain_missing()
    if missing:
        message = f"docs toolchain not installed ({', '.join(missing)}): pip install -r requirements-docs.txt"
        if os.environ.get("DORAFACTORS_DOCS_BUILD") == "1":
            pytest.fail(message + " (DORAFACTORS_DOCS_BUILD=1 requires the build)")
        pytest.skip(message)
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    for page in ("index.html", "configuration/index.html", "reference/dora/index.html"):
        assert (tmp_path / "site" / page).is_file(), f"{page} missing from the built site"


# Hand-written statements in the docs that hold only while these settings have no reader in
# src/dorafactors (configuration.md "Variables read elsewhere", how-to/multi-gpu.md). When code
# starts reading one, this fails: update those pages, then this set.
_DOCUMENTED_AS_UNREAD: set[str] = set()  # every setting is read now (the gather ones by dora_distributed.py)


def test_statements_about_unread_settings_still_hold():
    gen = _gen()
    readers = gen.config_readers(gen.load_env_module())
    now_read = {field: mods for field, mods in readers.items() if field in _DOCUMENTED_AS_UNREAD and mods}
    assert not now_read, (
        f"settings the docs call unread are now read: {now_read}; update docs/configuration.md and "
        "docs/how-to/multi-gpu.md, then _DOCUMENTED_AS_UNREAD in tests/test_docs.py"
    )


def test_readme_table_mirrors_env_vars():
    """README.md's variable table (DESIGN: "README holds the table") says what ENV_VARS says."""
    gen = _gen()
    env = gen.load_env_module()
    rows = {}
    for line in (REPO_ROOT / "README.md").read_text().splitlines():
        match = re.match(r"^\| `([A-Z][A-Z0-9_]*)` \| (.*?) \| (.*?) \| (.*?) \|$", line)
        if match:
            rows[match.group(1)] = tuple(match.group(i) for i in (2, 3, 4))
    expected = {name: tuple(gen._md(x) for x in spec) for name, spec in env.ENV_VARS.items()}
    assert rows == expected, (
        "README.md's environment-variable table differs from ENV_VARS in src/dorafactors/dora_env.py "
        "(columns: variable, default, accepted, effect; the docs' configuration page is generated from ENV_VARS)"
    )
