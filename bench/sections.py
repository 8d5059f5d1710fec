"""Named `## ` sections of bench/RESULTS.md that one tool writes and the others keep (pure)."""

from __future__ import annotations

import re
from pathlib import Path


def _pattern(title: str) -> re.Pattern[str]:
    """A section: its `## title` line up to the next `## ` heading or the end of the text."""
    return re.compile(rf"\n## {re.escape(title)}\n.*?(?=\n## |\Z)", flags=re.S)


def find(text: str, title: str) -> str | None:
    """The section `## title` of `text` (from its heading's newline), or None."""
    found = _pattern(title).search("\n" + text)
    return None if found is None else found.group(0).strip("\n")


def replace(text: str, title: str, section: str) -> str:
    """`text` without its `## title` section, and `section` appended after the rest."""
    rest = _pattern(title).sub("", "\n" + text).strip("\n")
    return rest + "\n\n" + section.strip("\n") + "\n"


def keep(path: Path, new_text: str, titles: tuple[str, ...]) -> str:
    """`new_text` with each `## title` section of the file at `path` that it lacks appended."""
    if not path.exists():
        return new_text
    old = path.read_text()
    out = new_text.rstrip("\n") + "\n"
    for title in titles:
        section = find(old, title)
        if section is not None and find(out, title) is None:
            out += "\n" + section + "\n"
    return out
