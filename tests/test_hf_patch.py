"""hf.patch: current, free of upstream code beyond one context line, in git's rename form, and it applies.

Fast CPU checks (a few seconds). The end-to-end check (vendor tree build, upstream's DoRA tests and
ours run inside the patched trees) is ``bash code/scripts/check_hf_patch.sh``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PATCH = REPO_ROOT / "hf.patch"
UPSTREAM_DORA_SHA1 = "86def591d419957607e8d8c03cb2f0c12f32d21d"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "code" / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mk = _load("make_hf_patch")
FIX = "regenerate it: python code/scripts/make_hf_patch.py"


def _upstream_tarball() -> Path:
    path = Path(os.environ.get(mk.UPSTREAM_ENV) or mk.DEFAULT_UPSTREAM)
    if not path.exists():
        pytest.skip(f"upstream 20a9829 export not found at {path}")
    return path


@pytest.fixture(scope="module")
def patch_text() -> str:
    assert PATCH.is_file(), f"{PATCH} is missing; {FIX}"
    return PATCH.read_text(encoding="utf-8")


def _sections(text: str) -> list[tuple[str, list[str]]]:
    """``[(header 'diff --git a/X b/Y', lines up to the next header)]``; the preamble is dropped."""
    out: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("diff --git "):
            out.append((line, []))
        elif out:
            out[-1][1].append(line)
    return out


def _paths(header: str) -> tuple[str, str]:
    m = re.fullmatch(r"diff --git a/(\S+) b/(\S+)", header)
    assert m, header
    return m.group(1), m.group(2)


def _added_content(lines: list[str]) -> bytes:
    """The new file's bytes from a new-file section's ``+`` lines (and no-newline markers)."""
    body = []
    for line in lines[lines.index("--- /dev/null") + 3:] if "--- /dev/null" in lines else []:
        if line == "\\ No newline at end of file":
            body[-1] = body[-1][:-1]
            continue
        assert line.startswith("+"), f"non-added line in a new file: {line!r}"
        body.append(line[1:] + "\n")
    return "".join(body).encode("utf-8")


def test_patch_is_current(patch_text):
    fresh = mk.build_patch(_upstream_tarball())
    assert fresh == patch_text, f"hf.patch is stale; {FIX}"


def test_rename_form_first_and_without_content(patch_text):
    sections = _sections(patch_text)
    header, lines = sections[0]
    assert _paths(header) == (mk.UPSTREAM_DORA, mk.REFERENCE_DEST)
    assert lines == [
        "similarity index 100%",
        f"rename from {mk.UPSTREAM_DORA}",
        f"rename to {mk.REFERENCE_DEST}",
    ]
    # our dora.py arrives as a new file at the old path, after the rename (GNU patch needs that order)
    header, lines = sections[1]
    assert _paths(header) == (mk.UPSTREAM_DORA, mk.UPSTREAM_DORA)
    assert lines[0] == "new file mode 100644"


def test_only_our_files_and_one_context_line(patch_text):
    """Every added file is byte-identical to ours; the only upstream text is the hook's context line."""
    ours = {f"{mk.LORA_DIR}/{p.name}": p.read_bytes() for p in mk.shipped_modules()}
    tests = mk.shipped_tests()
    if tests:
        ours[f"{mk.TESTS_DEST}/conftest.py"] = mk.WRAPPER_CONFTEST.encode()
        ours.update({f"{mk.SUITE_DEST}/{p.name}": p.read_bytes() for p in tests})
    seen_new, context = {}, []
    for header, lines in _sections(patch_text)[1:]:
        a, b = _paths(header)
        assert a == b, header
        assert not any(line.startswith("-") and not line.startswith("--- ") for line in lines), f"{a}: removes lines"
        if lines[0] == "new file mode 100644":
            seen_new[b] = _added_content(lines)
            continue
        assert b == mk.VARIANTS, f"{b}: only {mk.VARIANTS} may be modified"
        context += [line[1:] for line in lines if line.startswith(" ")]
        added = [line[1:] + "\n" for line in lines if line.startswith("+") and not line.startswith("+++ ")]
        assert tuple(added) == mk.HOOK_LINES
    assert seen_new == ours
    assert len(context) == mk.HOOK_CONTEXT_LINES == 1
    upstream_variants = mk.read_upstream(_upstream_tarball(), mk.VARIANTS).decode().splitlines()
    assert context == upstream_variants[-1:], "the context line is not upstream's last line of variants.py"


def test_shipped_modules_follow_the_rule():
    names = [p.name for p in mk.shipped_modules()]
    assert sorted(names) == sorted(p.name for p in (REPO_ROOT / "src" / "dorafactors").glob("dora*.py"))
    assert names[0] == "dora.py" and {"dora_env.py", "dora_variants.py"} <= set(names)
    assert "plugin.py" not in names and "__init__.py" not in names


def _git_apply(tree: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(tree.parent)}
    return subprocess.run(["git", "apply", *args, str(PATCH)], cwd=tree, env=env, capture_output=True, text=True)


def _unpack(tarball: Path, dest: Path) -> Path:
    with tarfile.open(tarball) as tar:
        top = tar.getnames()[0].split("/")[0]
        tar.extractall(dest, filter="data")
    return dest / top


@pytest.fixture(scope="module")
def patched_export(tmp_path_factory) -> Path:
    tree = _unpack(_upstream_tarball(), tmp_path_factory.mktemp("export"))
    check = _git_apply(tree, "--check")
    assert check.returncode == 0, f"git apply --check failed on the 20a9829 export:\n{check.stderr}"
    applied = _git_apply(tree)
    assert applied.returncode == 0, applied.stderr
    return tree


def test_git_apply_on_20a9829_export(patched_export):
    lora = patched_export / mk.LORA_DIR
    reference = patched_export / mk.REFERENCE_DEST
    assert hashlib.sha1(reference.read_bytes()).hexdigest() == UPSTREAM_DORA_SHA1
    for p in mk.shipped_modules():
        assert (lora / p.name).read_bytes() == p.read_bytes(), p.name
    assert (lora / "variants.py").read_text().endswith("".join(mk.HOOK_LINES))


def test_patched_export_imports_our_classes(patched_export):
    code = (
        "import peft\n"
        "from peft.tuners.lora import dora, dora_variants, variants\n"
        f"assert peft.__file__.startswith({str(patched_export)!r}), peft.__file__\n"
        "assert variants.DoraLinearLayer is dora.DoraLinearLayer\n"
        "for k in ('Linear', 'Embedding', 'Conv1d', 'Conv2d', 'Conv3d'):\n"
        "    assert getattr(variants, f'Dora{k}Variant') is getattr(dora_variants, f'Dora{k}Variant'), k\n"
    )
    env = {**os.environ, "PYTHONPATH": str(patched_export / "src")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_git_apply_check_on_cached_sdist(tmp_path):
    """The peft==0.18.0 sdist, if build_vendor_peft.py has cached it (no download here)."""
    bv = _load("build_vendor_peft")
    sdist = bv.SDIST_DIR / bv.SDIST_NAME
    if not sdist.is_file():
        pytest.skip(f"{sdist} not cached; python code/scripts/build_vendor_peft.py fetches it")
    tree = _unpack(sdist, tmp_path)
    check = _git_apply(tree, "--check")
    assert check.returncode == 0, f"git apply --check failed on {sdist.name}:\n{check.stderr}"
