"""Named `## ` sections of bench/RESULTS.md that one tool writes and the others keep."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

from bench.report import commit, machine

RESULTS = Path(__file__).with_name("RESULTS.md")


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


def stamp(rounds: int, seconds: float, elapsed: float, how: str = "medians") -> list[str]:
    """The date, commit, machine and run lines a tool's section opens with."""
    m = machine()
    return [
        f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; commit {commit(RESULTS.parent.parent)}",
        f"- machine: {m['cpu']}, {m['cpus']} CPUs, Linux {m['kernel']}",
        f"- run: {rounds} round(s) of {seconds:.0f} s per case, {how}; {elapsed:.0f} s",
    ]


def write(title: str, section: str) -> None:
    """Put `section` in bench/RESULTS.md in place of its `## title` section (the rest stays)."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    RESULTS.write_text(replace(text, title, section))
    print(f"\nwrote the '## {title}' section of {RESULTS}")


def made(title: str, about: list[str], opening: list[str], body: list[str]) -> str:
    """A `## title` section: what wrote it (`about`), the `stamp` lines, then `body`."""
    return "\n".join([f"## {title}", "", *about, "", *opening, "", *body, ""])
