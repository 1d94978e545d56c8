#!/usr/bin/env python
"""Build ``vendor/dorafactors-peft/``: the ``peft==0.18.0`` source distribution with ``hf.patch`` applied.

    python code/scripts/build_vendor_peft.py              # download (cached), unpack, git apply hf.patch
    python code/scripts/build_vendor_peft.py --patch P    # apply another patch file (CI: a fresh one)
    PYTHONPATH=vendor/dorafactors-peft/src python -c "import peft.tuners.lora.dora_fused"

Steps: ``pip download --no-deps --no-binary :all: peft==0.18.0`` (PyPI only; the tarball is kept
in ``vendor/sdist/`` and its SHA-256 checked), unpack to a staging directory, ``git init`` there
and commit the pristine tree (so ``git -C vendor/dorafactors-peft diff HEAD`` shows the patch and
``git apply`` cannot wander into an enclosing repository: run inside a sub-directory of another
work tree it would resolve paths against that tree's root and skip the rest), ``git apply
--index hf.patch``, import-check the result, then swap it into place. A failed build leaves the
previous tree untouched. ``vendor/`` is git-ignored.

A user with network access to GitHub would instead clone upstream, check out 20a9829 and run
``git apply /path/to/hf.patch`` at its root; the result is the same patched PEFT.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PATCH = REPO_ROOT / "hf.patch"
VENDOR = REPO_ROOT / "vendor"
TREE = VENDOR / "dorafactors-peft"
SDIST_DIR = VENDOR / "sdist"
PEFT_VERSION = "0.18.0"
SDIST_NAME = f"peft-{PEFT_VERSION}.tar.gz"
SDIST_SHA256 = "c81c80b2056ab40c23d58ef25f74daab417ac653970718589a11a8af28218588"
SRC_DIR = REPO_ROOT / "src" / "dorafactors"

GIT_ID = ["-c", "user.name=dorafactors", "-c", "user.email=dorafactors@localhost", "-c", "commit.gpgsign=false"]


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch_sdist(dest_dir: Path = SDIST_DIR) -> Path:
    """The verified ``peft-0.18.0.tar.gz``, downloaded with pip unless already cached."""
    path = dest_dir / SDIST_NAME
    if path.is_file() and sha256_of(path) == SDIST_SHA256:
        return path
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", tmp,
               f"peft=={PEFT_VERSION}"]
        subprocess.run(cmd, check=True)
        got = Path(tmp) / SDIST_NAME
        if not got.is_file():
            raise SystemExit(f"pip downloaded no {SDIST_NAME} into {tmp}: {sorted(os.listdir(tmp))}")
        digest = sha256_of(got)
        if digest != SDIST_SHA256:
            raise SystemExit(f"{SDIST_NAME} has SHA-256 {digest}, expected {SDIST_SHA256}")
        shutil.copyfile(got, path)
    return path


def unpack(tarball: Path, dest: Path) -> Path:
    """Unpack a source tarball whose members sit under one top directory; return that directory."""
    with tarfile.open(tarball) as tar:
        tops = {m.name.split("/", 1)[0] for m in tar.getmembers()}
        if len(tops) != 1:
            raise SystemExit(f"{tarball}: expected one top-level directory, found {sorted(tops)}")
        tar.extractall(dest, filter="data")
    return dest / tops.pop()


def git(tree: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *GIT_ID, *args], cwd=tree, check=True, capture_output=True, text=True)


def apply_patch(tree: Path, patch: Path) -> None:
    """``git init`` + pristine commit in ``tree``, then ``git apply --index patch``."""
    git(tree, "init", "-q")
    git(tree, "add", "-A")
    git(tree, "commit", "-q", "-m", f"peft {PEFT_VERSION} sdist (pristine)")
    proc = subprocess.run(["git", "apply", "--index", str(patch)], cwd=tree, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"git apply {patch} failed in {tree}:\n{proc.stderr}")


def import_check(tree: Path) -> list[str]:
    """Import every shipped ``peft.tuners.lora.dora*`` module from ``tree/src``; return their names."""
    names = sorted(p.stem for p in (tree / "src" / "peft" / "tuners" / "lora").glob("dora*.py"))
    expected = sorted(p.stem for p in SRC_DIR.glob("dora*.py"))
    if names != expected:
        raise SystemExit(f"patched tree has {names}, src/dorafactors has {expected}: is hf.patch current?")
    code = (
        "import importlib, sys\n"
        "import peft\n"
        f"assert peft.__file__.startswith({str(tree / 'src')!r}), peft.__file__\n"
        f"for n in {names!r}: importlib.import_module('peft.tuners.lora.' + n)\n"
        "from peft.tuners.lora import variants, dora_variants\n"
        "assert variants.DoraLinearVariant is dora_variants.DoraLinearVariant\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"import check failed in {tree}:\n{proc.stderr}")
    return names


def build(patch: Path = PATCH, tree: Path = TREE) -> Path:
    if not patch.is_file():
        raise SystemExit(f"{patch} not found; generate it: python code/scripts/make_hf_patch.py")
    sdist = fetch_sdist()
    tree.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=tree.parent))
    try:
        top = unpack(sdist, staging)
        apply_patch(top, patch.resolve())
        names = import_check(top)
        if tree.exists():
            shutil.rmtree(tree)
        top.rename(tree)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"built {tree} (peft {PEFT_VERSION} sdist + {patch.name}); imports OK: {', '.join(names)}")
    return tree


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patch", type=Path, default=PATCH, help="patch to apply (default: hf.patch)")
    parser.add_argument("--tree", type=Path, default=TREE, help="where to build (default: vendor/dorafactors-peft)")
    parser.add_argument("--sdist-only", action="store_true", help="only download and verify the sdist; print its path")
    args = parser.parse_args(argv)
    if args.sdist_only:
        print(fetch_sdist())
        return 0
    build(args.patch, args.tree)
    return 0


if __name__ == "__main__":
    sys.exit(main())
