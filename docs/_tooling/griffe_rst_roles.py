"""Griffe extension for the API reference: read the reST bits of our Google-style docstrings.

The docstrings in ``src/dorafactors`` use Google sections (``Args:``, ``Returns:``, ``Raises:``)
with a few reStructuredText idioms inside the prose: roles such as ``:func:`get_config``` and
literal-block markers (``Quick start::``). mkdocstrings renders Markdown, so without this
extension the roles would appear verbatim. Here, before rendering, and without touching ``src/``:

- ``:role:`name``` becomes an optional cross-reference: a link when ``name`` resolves to an object
  that the reference pages render, plain ``name`` in code style otherwise (never a broken link);
- a paragraph ending in ``::`` ends in ``:`` (the indented block after it is already a Markdown
  code block).

Loaded by ``mkdocs.yml`` (``plugins.mkdocstrings.handlers.python.options.extensions``); this
directory is excluded from the built site.
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|class|data|meth|attr|mod|exc|obj|const):`~?([^`]+)`")
_LITERAL_MARKER = re.compile(r"(\S)::[ \t]*$", re.MULTILINE)


def _candidates(obj: griffe.Object, name: str) -> list[str]:
    name = name.strip().rstrip("()")
    out = [name]
    scope: Any = obj
    while scope is not None:
        out.append(f"{scope.path}.{name}")
        scope = scope.parent
    return out


def _resolve(obj: griffe.Object, name: str) -> str | None:
    collection = obj.modules_collection
    for path in _candidates(obj, name):
        try:
            target = collection[path]
        except (KeyError, ValueError, AttributeError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            continue
        try:
            return target.final_target.path if target.is_alias else target.path
        except (griffe.AliasResolutionError, griffe.CyclicAliasError):
            return target.target_path if target.is_alias else None
    return None


def rewrite(obj: griffe.Object, text: str) -> str:
    """The docstring ``text`` of ``obj`` with reST roles and ``::`` markers made Markdown."""

    def role(match: re.Match) -> str:
        name = match.group(1)
        shown = f"<code>{html.escape(name.split('.')[-1] if match.group(0).count('~') else name)}</code>"
        path = _resolve(obj, name)
        if path is None:
            return shown
        # mkdocs-autorefs: `optional` renders a link if the identifier is on a page, plain text otherwise
        return f'<autoref identifier="{html.escape(path)}" optional>{shown}</autoref>'

    return _LITERAL_MARKER.sub(r"\1:", _ROLE.sub(role, text))


class RstRoles(griffe.Extension):
    """Rewrite reST roles and literal markers in every loaded docstring (see the module docstring)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        # after the whole package is loaded, so that cross-references can be resolved
        stack: list[griffe.Object] = [pkg]
        while stack:
            obj = stack.pop()
            if obj.docstring is not None:
                obj.docstring.value = rewrite(obj, obj.docstring.value)
            stack.extend(member for member in obj.members.values() if not member.is_alias)
