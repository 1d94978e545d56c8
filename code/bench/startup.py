"""Start-up validation: everything the run needs is there, or the exact commands that fix it.

All paths resolve relative to this file, so the benchmark works from any working directory.
Where a check fails the problems are printed with their fixes; an interactive terminal may then
answer a ``[y/N]`` prompt to go on without them (the providers that need them are reported as
skipped), anything else (CI, piped stdin) exits non-zero.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Optional, TextIO

__all__ = [
    "CODE_DIR",
    "REPO_ROOT",
    "FETCH_SCRIPT",
    "Problem",
    "check_file_sha1",
    "check_environment",
    "load_fetch_module",
    "load_reference_module",
    "resolve_problems",
]

CODE_DIR = Path(__file__).resolve().parents[1]
REPO_ROOT = CODE_DIR.parent
FETCH_SCRIPT = CODE_DIR / "scripts" / "fetch_reference.py"
EXIT_STARTUP = 2


@dataclasses.dataclass(frozen=True)
class Problem:
    """One failed start-up check: what is wrong, the commands that fix it, and whether the run can
    still go on (without the providers that need it) once a person agrees."""

    what: str
    fix: tuple[str, ...]
    recoverable: bool = True

    def render(self) -> str:
        lines = [f"  - {self.what}"]
        lines += [f"      fix: {cmd}" for cmd in self.fix]
        return "\n".join(lines)


def _load_module(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_fetch_module() -> ModuleType:
    """``code/scripts/fetch_reference.py`` as a module (REFERENCE_PATH, REFERENCE_SHA1, check_reference)."""
    return _load_module("dorafactors_bench_fetch_reference", FETCH_SCRIPT)


_reference_cache: dict[Path, ModuleType] = {}


def load_reference_module(path: Path) -> ModuleType:
    """Upstream PEFT 0.18.0's dora.py as a module (it imports only ``peft.utils``)."""
    path = Path(path).resolve()
    if path not in _reference_cache:
        _reference_cache[path] = _load_module("peft_0_18_0_dora_reference", path)
    return _reference_cache[path]


def sha1_of(path: Path) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def _fetch_command() -> str:
    return f"cd {REPO_ROOT} && {sys.executable} {FETCH_SCRIPT.relative_to(REPO_ROOT)}"


def check_file_sha1(path: Path, expected_sha1: str, *, what: str = "upstream reference") -> Optional[Problem]:
    """``None`` when ``path`` exists with SHA-1 ``expected_sha1``, else the :class:`Problem` with its fix."""
    path = Path(path)
    offline = f"or, on a machine without network, copy {path.name} from a checkout that has it to {path}"
    if not path.is_file():
        return Problem(f"{what} missing: {path}", (_fetch_command(), offline))
    digest = sha1_of(path)
    if digest != expected_sha1:
        return Problem(
            f"{what} {path} has SHA-1 {digest}, expected {expected_sha1}",
            (f"rm {path} && {_fetch_command()}", offline),
        )
    return None


def check_environment(reference_path: Optional[Path] = None) -> tuple[list[Problem], dict]:
    """Run every start-up check. Returns the problems and a ``reference`` block for the JSON."""
    problems: list[Problem] = []
    info: dict = {"path": None, "sha1_expected": None, "sha1_ok": False}
    for module, fix in (
        ("torch", f"{sys.executable} -m pip install torch"),
        ("peft", f"cd {REPO_ROOT} && {sys.executable} -m pip install -r requirements.txt"),
        ("transformers", f"cd {REPO_ROOT} && {sys.executable} -m pip install -r requirements.txt"),
        ("dorafactors", f"cd {REPO_ROOT} && {sys.executable} -m pip install -e ."),
    ):
        if importlib.util.find_spec(module) is None:
            problems.append(Problem(f"python package '{module}' is not importable", (fix,), recoverable=False))
    try:
        fetch = load_fetch_module()
    except Exception as exc:  # noqa: BLE001 - report any failure to load the script
        problems.append(Problem(f"cannot load {FETCH_SCRIPT}: {exc}", (f"cd {REPO_ROOT} && git status",), False))
        return problems, info
    path = Path(reference_path) if reference_path is not None else Path(fetch.REFERENCE_PATH)
    info.update(path=str(path), sha1_expected=fetch.REFERENCE_SHA1)
    problem = check_file_sha1(path, fetch.REFERENCE_SHA1)
    if problem is not None:
        problems.append(problem)
    else:
        info["sha1_ok"] = True
    return problems, info


def resolve_problems(
    problems: list[Problem],
    *,
    interactive: bool,
    stream: TextIO = sys.stderr,
    ask: Callable[[str], str] = input,
) -> bool:
    """Print the problems; ``True`` to go on. Only an interactive terminal is asked ``[y/N]``."""
    if not problems:
        return True
    stream.write("start-up checks failed:\n" + "\n".join(p.render() for p in problems) + "\n")
    if not all(p.recoverable for p in problems):
        stream.write("cannot run without these; fix them and run again.\n")
        return False
    if not interactive:
        stream.write("not an interactive terminal: exiting. Run the commands above, then run again.\n")
        return False
    try:
        answer = ask("Continue without it? Providers that need it are reported as skipped. [y/N] ")
    except EOFError:
        answer = ""
    return answer.strip().lower() in ("y", "yes")
