#!/usr/bin/env python
"""Run upstream PEFT's own DoRA tests (a peer suite we did not write) with dorafactors enabled.

    python code/scripts/run_upstream_tests.py [--target plugin|installed] [-- extra pytest args]

The tests come from the pristine export of upstream PEFT at 20a9829 (../shared/upstream/, or
--tarball); they are extracted to vendor/upstream-tests/ (git-ignored) and run against the
*installed* PEFT. With ``--target plugin`` (default) a pytest plugin calls ``dorafactors.enable()``
before collection, so every DoRA model those tests build uses our classes; ``--target installed``
runs them against whatever PEFT is importable (e.g. the patched tree on PYTHONPATH).

Selection (CPU only, no model downloads): ``tests/test_custom_models.py`` and
``tests/test_lora_variants.py`` filtered by :data:`SELECTION`.
"""

from __future__ import annotations

import argparse
import sys
import tarfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TARBALL = REPO_ROOT.parent / "shared" / "upstream" / "peft-20a9829.tar.gz"
DEST = REPO_ROOT / "vendor" / "upstream-tests"
FILES = ["tests/test_custom_models.py", "tests/test_lora_variants.py"]
# DoRA cases of the custom-model suite (their ids say "DoRA"/"dora"), and the variant tests that
# touch DoRA; nothing that needs a GPU, bitsandbytes or the Hub (the two named tests download a
# model from the Hub).
SELECTION = (
    "(dora or DoRA) and not gpu and not bnb and not hub"
    " and not test_gpt2_dora_merge_and_unload and not test_dora_save_and_load_remapping"
)


class _TransformersCompat:
    """Upstream's ``hub_online_once`` helper mock-patches ``transformers.utils.hub._is_offline_mode``,
    which newer transformers releases no longer define; the patch then fails before any test code
    runs. Defining the attribute (False) lets those tests run; it changes nothing else."""

    def pytest_configure(self, config):
        import transformers.utils.hub as hub

        if not hasattr(hub, "_is_offline_mode"):
            hub._is_offline_mode = False


class _EnableDorafactors:
    def pytest_configure(self, config):
        import dorafactors

        dorafactors.enable()
        print(f"dorafactors enabled for upstream tests: {dorafactors.is_enabled()}")


def extract(tarball: Path) -> Path:
    if not tarball.is_file():
        raise SystemExit(f"upstream export not found: {tarball} (pass --tarball PATH)")
    with tarfile.open(tarball) as tar:
        root = tar.getnames()[0].split("/")[0]
        members = [m for m in tar.getmembers() if m.name.startswith(f"{root}/tests/")]
        DEST.mkdir(parents=True, exist_ok=True)
        tar.extractall(DEST, members=members, filter="data")
    # upstream's pyproject mixes pytest config styles newer pytest rejects; an empty ini isolates the run
    (DEST / root / "pytest.ini").write_text("[pytest]\n")
    return DEST / root


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tarball", type=Path, default=DEFAULT_TARBALL)
    parser.add_argument("--target", choices=["plugin", "installed"], default="plugin")
    parser.add_argument("-k", default=SELECTION, help=f"pytest -k expression (default: {SELECTION!r})")
    args, extra = parser.parse_known_args(argv)
    root = extract(args.tarball)
    import pytest

    plugins = [_TransformersCompat()] + ([_EnableDorafactors()] if args.target == "plugin" else [])
    pytest_args = [*(str(root / f) for f in FILES), "-k", args.k, "-q", "-p", "no:cacheprovider",
                   "--rootdir", str(root), "-c", str(root / "pytest.ini"), *[a for a in extra if a != "--"]]
    return pytest.main(pytest_args, plugins=plugins)


if __name__ == "__main__":
    sys.exit(main())
