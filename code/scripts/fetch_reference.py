#!/usr/bin/env python
"""Fetch upstream PEFT's DoRA (the reference) into ``vendor/`` and verify its SHA-1.

    python code/scripts/fetch_reference.py            # download peft==0.18.0 with pip, extract, verify
    python code/scripts/fetch_reference.py --check    # verify only; exit 1 with the fix if absent/bad

The reference is ``peft/tuners/lora/dora.py`` of the ``peft==0.18.0`` wheel, byte-identical to
upstream commit 20a9829. We never commit it; tests and the benchmark load it from
``vendor/reference/peft_0_18_0_dora.py`` (it imports only ``peft.utils``, so it loads beside any PEFT).
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
REFERENCE_VERSION = "0.18.0"
REFERENCE_MEMBER = "peft/tuners/lora/dora.py"
REFERENCE_SHA1 = "86def591d419957607e8d8c03cb2f0c12f32d21d"
REFERENCE_PATH = REPO_ROOT / "vendor" / "reference" / "peft_0_18_0_dora.py"
FIX_COMMAND = f"{sys.executable} code/scripts/fetch_reference.py"


def sha1_of(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def check_reference(path: Path = REFERENCE_PATH) -> tuple[bool, str]:
    """``(ok, message)``; the message names the exact command that fixes a missing or bad file."""
    if not path.is_file():
        return False, f"upstream reference missing: {path}\n  fix: cd {REPO_ROOT} && {FIX_COMMAND}"
    digest = sha1_of(path)
    if digest != REFERENCE_SHA1:
        return False, (
            f"upstream reference {path} has SHA-1 {digest}, expected {REFERENCE_SHA1}\n"
            f"  fix: rm {path} && cd {REPO_ROOT} && {FIX_COMMAND}"
        )
    return True, f"upstream reference OK: {path} (SHA-1 {digest})"


def fetch(path: Path = REFERENCE_PATH) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp,
               f"peft=={REFERENCE_VERSION}"]
        subprocess.run(cmd, check=True)
        wheels = sorted(Path(tmp).glob("peft-*.whl"))
        if not wheels:
            raise SystemExit(f"pip downloaded no peft wheel into {tmp}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            data = wheel.read(REFERENCE_MEMBER)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only verify the file that is there")
    args = parser.parse_args(argv)
    ok, message = check_reference()
    if not ok and not args.check:
        fetch()
        ok, message = check_reference()
    print(message, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
