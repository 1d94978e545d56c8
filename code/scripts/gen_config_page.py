#!/usr/bin/env python
"""Generate the documentation's generated sections from the code and the committed benchmark JSON.

    python code/scripts/gen_config_page.py            # rewrite every generated section under docs/
    python code/scripts/gen_config_page.py --check    # exit 1 and show a diff if any section is stale

A generated section of a page under ``docs/`` sits between two HTML comments, e.g.

    <!-- BEGIN GENERATED env-vars -->
    ...
    <!-- END GENERATED env-vars -->

and the BEGIN line may carry arguments (``source=code/results/x.json``). Generators:

- ``env-vars``, ``env-errors``: ``ENV_VARS`` of ``src/dorafactors/dora_env.py`` (name, default,
  accepted values, effect) and, for every variable, the ``ValueError`` that
  ``DoraEnvConfig.from_mapping`` raises for representative bad values (called, not copied);
- ``config-fields``: the fields of ``DoraEnvConfig`` with types and defaults, the variable that
  sets each (found by parsing probe values), and the modules of ``src/dorafactors`` that read it
  through ``get_config()`` (found in their syntax trees);
- ``env-elsewhere``: environment variables read outside ``dora_env.py`` (syntax trees again), with
  the first docstring line of the function that reads them;
- ``bench-layer``, ``bench-kernels``: headline tables from a committed benchmark JSON named by
  ``source=``, with the GPU, versions, date and command line recorded in that file.

Only ``dora_env.py`` is imported (by file path; it needs nothing but the standard library), so the
site builds without torch. The same module is an MkDocs hook (``hooks:`` in ``mkdocs.yml``): at
build time every section is regenerated and a stale committed copy logs a warning, which fails
``mkdocs build --strict``. ``tests/test_docs.py`` runs the check without MkDocs.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import importlib.util
import json
import logging
import re
import shlex
import sys
from pathlib import Path
from typing import Callable, Optional

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCS = REPO_ROOT / "docs"
SRC = REPO_ROOT / "src" / "dorafactors"
ENV_MODULE = SRC / "dora_env.py"

_SECTION = re.compile(
    r"(?P<begin><!-- BEGIN GENERATED (?P<name>[\w-]+)(?P<args>[^>]*?) -->\n)(?P<body>.*?)(?P<end><!-- END GENERATED (?P=name) -->)",
    re.DOTALL,
)

# Values tried on every variable to show the error a bad value gets (those that parse are skipped).
_BAD_VALUES = ("yes", "2", "abc", "8")
# Valid non-default values used to find which config field a variable sets.
_PROBE_VALUES = ("1", "0", "32")


# ------------------------------------------------------------------------------------------------
# Loading the code without importing the package
# ------------------------------------------------------------------------------------------------


def load_env_module():
    """``src/dorafactors/dora_env.py`` as a standalone module (standard library only)."""
    spec = importlib.util.spec_from_file_location("_dorafactors_dora_env_for_docs", ENV_MODULE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolves string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _md(text: str) -> str:
    """Table-cell safe text: pipes escaped, newlines folded."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _code(text: str) -> str:
    text = " ".join(str(text).split())
    fence = "``" if "`" in text else "`"
    pad = " " if fence == "``" else ""
    return f"{fence}{pad}{text}{pad}{fence}".replace("|", "\\|")


# ------------------------------------------------------------------------------------------------
# Configuration page
# ------------------------------------------------------------------------------------------------


def _field_of_var(env) -> dict[str, str]:
    """Environment variable -> the ``DoraEnvConfig`` field it sets (probed through from_mapping)."""
    default = env.DoraEnvConfig.from_mapping({})
    out: dict[str, str] = {}
    for name in env.ENV_VARS:
        for value in _PROBE_VALUES:
            try:
                config = env.DoraEnvConfig.from_mapping({name: value})
            except (ValueError, TypeError):
                continue
            changed = [f.name for f in dataclasses.fields(config) if getattr(config, f.name) != getattr(default, f.name)]
            if len(changed) == 1:
                out[name] = changed[0]
                break
    return out


def _property_fields(env) -> dict[str, set[str]]:
    """Properties of ``DoraEnvConfig`` -> the fields they read (``norm_chunk_bytes`` -> norm_chunk_mb)."""
    tree = ast.parse(ENV_MODULE.read_text())
    fields = {f.name for f in dataclasses.fields(env.DoraEnvConfig)}
    out: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "DoraEnvConfig":
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and any(
                    isinstance(d, ast.Name) and d.id == "property" for d in item.decorator_list
                ):
                    used = {
                        n.attr
                        for n in ast.walk(item)
                        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "self"
                    }
                    out[item.name] = used & fields
    return out


def _is_get_config_call(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Call)
        and (
            (isinstance(node.func, ast.Name) and node.func.id == "get_config")
            or (isinstance(node.func, ast.Attribute) and node.func.attr == "get_config")
        )
    )


def config_readers(env) -> dict[str, list[str]]:
    """Field -> modules of ``src/dorafactors`` (other than dora_env.py) reading it via ``get_config()``.

    Counted: ``get_config().field`` and ``cfg.field`` where ``cfg = get_config()`` in the same
    function; properties count for the fields they read.
    """
    fields = {f.name for f in dataclasses.fields(env.DoraEnvConfig)}
    props = _property_fields(env)
    out: dict[str, set[str]] = {f: set() for f in fields}
    for path in sorted(SRC.glob("*.py")):
        if path == ENV_MODULE:
            continue
        tree = ast.parse(path.read_text())
        scopes = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Module))]
        for scope in scopes:
            names = {
                t.id
                for n in ast.walk(scope)
                if isinstance(n, ast.Assign) and _is_get_config_call(n.value)
                for t in n.targets
                if isinstance(t, ast.Name)
            }
            for n in ast.walk(scope):
                if not isinstance(n, ast.Attribute):
                    continue
                if _is_get_config_call(n.value) or (isinstance(n.value, ast.Name) and n.value.id in names):
                    for field in ({n.attr} & fields) | props.get(n.attr, set()):
                        out[field].add(path.name)
    return {f: sorted(v) for f, v in out.items()}


def _module_constants(tree: ast.Module) -> dict[str, str]:
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    out[t.id] = node.value.value
    return out


def _is_environ(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "environ"


def env_reads_elsewhere() -> list[tuple[str, str, str]]:
    """(variable, module, first docstring line of the reading function) outside dora_env.py."""
    rows = []
    for path in sorted(SRC.glob("*.py")):
        if path == ENV_MODULE:
            continue
        tree = ast.parse(path.read_text())
        consts = _module_constants(tree)

        def resolve(arg: ast.AST) -> Optional[str]:
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                return arg.value
            if isinstance(arg, ast.Name):
                return consts.get(arg.id)
            return None

        for func in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            found = []
            for n in ast.walk(func):
                if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.args:
                    if (n.func.attr == "get" and _is_environ(n.func.value)) or n.func.attr == "getenv":
                        found.append(resolve(n.args[0]))
                elif isinstance(n, ast.Subscript) and _is_environ(n.value):
                    found.append(resolve(n.slice))
            doc = (ast.get_docstring(func) or "").strip().splitlines()
            for name in found:
                rows.append((name or "(computed name)", f"{path.name}: {func.name}()", doc[0] if doc else ""))
    return sorted(set(rows))


def gen_env_vars(env, **_args) -> str:
    fields = _field_of_var(env)
    lines = [
        "| variable | default | accepted | effect | `DoraEnvConfig` field |",
        "|---|---|---|---|---|",
    ]
    for name, (default, accepted, effect) in env.ENV_VARS.items():
        field = fields.get(name)
        lines.append(
            f"| `{name}` | {_md(default)} | {_md(accepted)} | {_md(effect)} | {_code(field) if field else '—'} |"
        )
    return "\n".join(lines)


def bad_value_errors(env) -> list[tuple[str, str, str]]:
    """(variable, bad value, message) for each variable and each distinct message."""
    out = []
    for name in env.ENV_VARS:
        seen = set()
        for value in _BAD_VALUES:
            try:
                env.DoraEnvConfig.from_mapping({name: value})
            except ValueError as exc:
                template = str(exc).replace(repr(value), "<value>")
                if template not in seen:
                    seen.add(template)
                    out.append((name, value, f"ValueError: {exc}"))
    return out


def gen_env_errors(env, **_args) -> str:
    lines = ["| setting | raises |", "|---|---|"]
    for name, value, message in bad_value_errors(env):
        lines.append(f"| {_code(f'{name}={value}')} | {_code(message)} |")
    return "\n".join(lines)


def gen_config_fields(env, **_args) -> str:
    var_of = {field: var for var, field in _field_of_var(env).items()}
    readers = config_readers(env)
    lines = ["| field | type | default | set by | read by (through `get_config()`) |", "|---|---|---|---|---|"]
    for f in dataclasses.fields(env.DoraEnvConfig):
        var = var_of.get(f.name)
        read = ", ".join(f"`{m}`" for m in readers.get(f.name, [])) or "nothing yet: parsed and validated only"
        lines.append(
            f"| `{f.name}` | {_code(f.type)} | {_code(repr(f.default))} | {_code(var) if var else '—'} | {read} |"
        )
    return "\n".join(lines)


def gen_env_elsewhere(env, **_args) -> str:
    lines = ["| variable | read in | there documented as | in `ENV_VARS` |", "|---|---|---|---|"]
    for name, where, doc in env_reads_elsewhere():
        lines.append(f"| `{name}` | `{where}` | {_md(doc) or '—'} | {'yes' if name in env.ENV_VARS else 'no'} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Headline numbers from committed benchmark JSON
# ------------------------------------------------------------------------------------------------

_LAYER_PHASES = (  # (case, column title)
    ("fwd", "time: inference forward"),
    ("fwd_bwd", "time: forward + backward, weights just updated"),
    ("fwd_bwd_accum", "time: forward + backward, within an accumulation window"),
    ("fwd_bwd_device", "GPU busy time: forward + backward, weights just updated"),
)
_MEMORY_PHASES = (
    ("inference_fwd", "peak extra memory: inference"),
    ("train_step", "peak extra memory: forward + backward"),
)


def _load_json(source: str) -> dict:
    path = REPO_ROOT / source
    if not path.is_file():
        raise FileNotFoundError(f"benchmark JSON {source!r} named in the docs does not exist")
    return json.loads(path.read_text())


def _ratio(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def gen_bench_layer(env, *, source: str, r: str = "384", **_args) -> str:
    doc = _load_json(source)
    e, run = doc["environment"], doc["run"]
    rank = int(r)
    rows = [x for x in doc["rows"] if x["suite"] in ("layer", "memory") and x["shape"].get("r") == rank]
    index = {(x["suite"], x["case"], tuple(sorted(x["shape"].items())), x["provider"], x["metric"]): x for x in rows}
    shapes = []
    for x in rows:
        key = tuple(sorted(x["shape"].items()))
        if x["suite"] == "layer" and key not in shapes:
            shapes.append(key)

    def cell(suite, case, shape, metric) -> str:
        ref, ours = (index.get((suite, case, shape, p, metric)) for p in ("peft_ref", "ours_auto"))
        if not ref or not ours or ref["status"] != "ok" or ours["status"] != "ok":
            return "n/a"
        return f"{_ratio(ref.get('ratio_vs_lora'))} → **{_ratio(ours.get('ratio_vs_lora'))}**"

    head = [label for _, label in _LAYER_PHASES + _MEMORY_PHASES]
    lines = [
        "| layer `d_in × d_out` | " + " | ".join(head) + " |",
        "|---" * (len(head) + 1) + "|",
    ]
    for shape in shapes:
        s = dict(shape)
        cells = [cell("layer", case, shape, "time") for case, _ in _LAYER_PHASES]
        cells += [cell("memory", case, shape, "peak_extra_mem") for case, _ in _MEMORY_PHASES]
        lines.append(f"| {s['d_in']} × {s['d_out']} | " + " | ".join(cells) + " |")
    T = sorted({dict(sh).get("T") for sh in shapes})
    lines += [
        "",
        f"Each cell: PEFT 0.18.0's DoRA → **dorafactors** (automatic dispatch), as multiples of plain "
        f"LoRA at the same rank (1.00 = LoRA; lower is better). r = {rank}, T = {', '.join(map(str, T))} "
        f"tokens, {', '.join(run['dtypes'])} model weights, PEFT's fp32 adapters, "
        f"{'torch.autocast' if run.get('autocast') else 'no autocast'}; medians of repeated CUDA-event timings. "
        "\"Weights just updated\": the adapter parameters change in place before every repeat, as after an "
        "optimizer step (the norm is recomputed); \"within an accumulation window\": they do not (the norm is "
        "reused). GPU busy time: the sum of the step's kernel durations (torch.profiler), host excluded; the "
        "time columns include the host, which bounds one call of a 4096-wide layer. Memory: peak allocated "
        "above the phase's start; the optimizer step is in neither.",
        "",
        f"Measured on an **{e['gpu']}** ({run['started'][:10]}; torch {e['torch']}, Triton {e['triton']}, "
        f"CUDA {e['cuda']}; git commit {e['git_commit'] or 'not recorded'}) by the command line recorded in the file:",
        "",
        "```bash",
        e["command_line"],
        "```",
        "",
        f"Source: `{source}` (rows `layer/*/time` and `memory/{{inference_fwd,train_step}}/peak_extra_mem`, "
        "`ratio_vs_lora`; schema in `code/results/SCHEMA.md`).",
    ]
    return "\n".join(lines)


def gen_bench_kernels(env, *, source: str, **_args) -> str:
    """The compose kernels alone, from a micro-suite JSON: time, roofline, bandwidth against the run's copy."""
    doc = _load_json(source)
    e, run = doc["environment"], doc["run"]
    rows = [x for x in doc["rows"] if x["suite"] == "compose" and x["provider"] == "fused_kernel_layer"
            and x["status"] == "ok"]
    index = {(x["case"], x["shape"]["d_out"], x["metric"]): x for x in rows}
    copy = next(x for x in doc["rows"] if x["suite"] == "compose" and x["case"] == "copy_bandwidth")
    lines = [
        "| kernel | `T × d_out` | time | roofline (bytes / copy bandwidth) | bandwidth | % of the 1 GiB copy | "
        "% of a same-size copy |",
        "|---|---|---|---|---|---|---|",
    ]
    for case, label in (("fwd", "compose forward"), ("bwd", "compose backward")):
        for (c, d_out, metric), x in index.items():
            if c != case or metric != "kernel_time":
                continue
            roof = re.search(r"roofline ([0-9.]+) ms", x.get("note") or "")
            cells = []
            for column, fmt in (("kernel_bandwidth", "{:.0f} GB/s"), ("kernel_pct_of_copy_bandwidth", "{:.1f}%"),
                                ("kernel_pct_of_same_size_copy", "{:.1f}%")):
                got = index.get((case, d_out, column))
                cells.append(fmt.format(got["value"]) if got else "n/a")
            roof_us = f"{1000 * float(roof.group(1)):.1f} µs" if roof else "n/a"
            lines.append(f"| {label} | {x['shape']['T']} × {d_out} | {1000 * x['value']:.1f} µs | {roof_us} | "
                         + " | ".join(cells) + " |")
    lines += [
        "",
        "The forward writes `g ⊙ (base + s·lora)` from two `[T, d_out]` reads (the layer runs it for fp32 "
        "activations and ranks above 768; bf16/fp16 below that run `lora_B`'s GEMM with this compose as its "
        "epilogue); the backward, which every fused layer runs, reads `dy` and the saved base and writes "
        "`∂base = g ⊙ dy` with ∂m's per-chunk sums. The ragged width 3003 has rows that are not 16-byte aligned, "
        "so no vector loads. Bytes are "
        "counted once each (read + written); the roofline is those bytes at the device-to-device copy bandwidth "
        f"measured in the same run ({copy['value']:.0f} GB/s, a 1 GiB copy). Each time is a CUDA-graph replay of at "
        "least 32 launches over rotating inputs (no L2 reuse, no host gaps).",
        "",
        f"Measured on an **{e['gpu']}** ({run['started'][:10]}; torch {e['torch']}, Triton {e['triton']}, "
        f"CUDA {e['cuda']}; git commit {e['git_commit'] or 'not recorded'}) by the command line recorded in the file:",
        "",
        "```bash",
        e["command_line"],
        "```",
        "",
        f"Source: `{source}` (rows `compose/*` of provider `fused_kernel_layer`; schema in `code/results/SCHEMA.md`).",
    ]
    return "\n".join(lines)


GENERATORS: dict[str, Callable[..., str]] = {
    "env-vars": gen_env_vars,
    "env-errors": gen_env_errors,
    "config-fields": gen_config_fields,
    "env-elsewhere": gen_env_elsewhere,
    "bench-layer": gen_bench_layer,
    "bench-kernels": gen_bench_kernels,
}


# ------------------------------------------------------------------------------------------------
# Sections
# ------------------------------------------------------------------------------------------------


def _parse_args(text: str) -> dict[str, str]:
    out = {}
    for token in shlex.split(text):
        key, sep, value = token.partition("=")
        if not sep:
            raise ValueError(f"generated-section argument {token!r} is not key=value")
        out[key] = value
    return out


def render(markdown: str, env=None) -> tuple[str, list[str]]:
    """``markdown`` with every generated section regenerated, and the names of sections that changed."""
    env = env or load_env_module()
    stale: list[str] = []

    def replace(match: re.Match) -> str:
        name = match.group("name")
        if name not in GENERATORS:
            raise ValueError(f"unknown generated section {name!r}; known: {', '.join(GENERATORS)}")
        body = GENERATORS[name](env, **_parse_args(match.group("args"))).rstrip("\n") + "\n"
        if body != match.group("body"):
            stale.append(name)
        return match.group("begin") + body + match.group("end")

    return _SECTION.sub(replace, markdown), stale


def pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if "_tooling" not in p.parts)


def check(write: bool = False) -> list[tuple[Path, list[str], str]]:
    """(page, stale section names, diff) for each page whose generated sections are stale; rewrites them if asked."""
    env = load_env_module()
    out = []
    for page in pages():
        text = page.read_text()
        new, stale = render(text, env)
        if stale:
            diff = "".join(
                difflib.unified_diff(
                    text.splitlines(True), new.splitlines(True), str(page.relative_to(REPO_ROOT)), "generated"
                )
            )
            out.append((page, stale, diff))
            if write:
                page.write_text(new)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="report stale sections, write nothing")
    args = parser.parse_args(argv)
    results = check(write=not args.check)
    for page, stale, diff in results:
        rel = page.relative_to(REPO_ROOT)
        if args.check:
            print(diff)
            print(f"{rel}: stale generated sections {', '.join(stale)}", file=sys.stderr)
        else:
            print(f"{rel}: regenerated {', '.join(stale)}")
    if args.check and results:
        print("run: python code/scripts/gen_config_page.py", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------------------------
# MkDocs hook
# ------------------------------------------------------------------------------------------------

_log = logging.getLogger("mkdocs.hooks.gen_config_page")


def on_page_markdown(markdown: str, page, config, files) -> str:
    """Serve freshly generated sections; warn (fatal under --strict) when the committed copy is stale."""
    new, stale = render(markdown)
    if stale:
        _log.warning(
            "%s: generated sections %s are stale; run: python code/scripts/gen_config_page.py",
            page.file.src_uri,
            ", ".join(stale),
        )
    return new


if __name__ == "__main__":
    sys.exit(main())
