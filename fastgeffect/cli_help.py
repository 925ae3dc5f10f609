"""One help format for every command line of the package: defaults are shown once, by argparse,
and only where they say something (never "(default: None)"); the description keeps its line breaks
so module docstrings with examples can be the epilog."""
from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends ``(default: X)`` to a flag's help unless the help already speaks of its default, or
    the default is None / False / suppressed (a flag that is off, or whose default the help explains)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default in (None, False, argparse.SUPPRESS) or action.option_strings == []:
            return text
        if isinstance(action, argparse.BooleanOptionalAction):
            return f"{text} (default: {'on' if default else 'off'})"
        return f"{text} (default: %(default)s)"


def examples(doc: str) -> str:
    """The part of a module docstring after its first paragraph: the examples of an epilog."""
    parts = doc.strip().split("\n\n", 1)
    return parts[1] if len(parts) > 1 else ""
