"""Optional py-spy profiles of the gateway and the floor (`python -m bench.run --profile`).

py-spy samples the proxy without pausing it (`--nonblocking`); two recorders run at once on
each load, one writing a flame graph (SVG) and one collapsed stacks, which `top_functions`
turns into the two lists that point at a hot path: where samples land (self) and which
frames they pass through (inclusive). `top_markdown` gives the top ten of each as Markdown,
for a before/after note (`--profile-md`).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from bench.processes import pinned


def py_spy() -> str | None:
    """py-spy beside this interpreter (the venv's bin/), else on PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def start_recording(
    pid: int, duration_s: float, out: Path, cpu: int, fmt: str = "raw"
) -> subprocess.Popen[bytes]:
    """Start sampling `pid` for `duration_s` into `out`, on CPU `cpu`; `fmt` is py-spy's
    `--format`: raw (collapsed stacks) or flamegraph (SVG)."""
    binary = py_spy()
    if binary is None:
        raise FileNotFoundError("py-spy is not installed (pip install py-spy)")
    argv = [
        binary,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, round(duration_s))),
        "--rate",
        "250",
        "--nonblocking",
        "--format",
        fmt,
        "--output",
        str(out),
    ]
    return subprocess.Popen(
        pinned(argv, cpu),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def tally(text: str) -> tuple[int, Counter[str], Counter[str]]:
    """Collapsed stacks (`frame;frame;frame N` lines) -> (samples, self, inclusive) counts."""
    own: Counter[str] = Counter()
    through: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, samples = line.rpartition(" ")
        if not stack or not samples.isdigit():
            continue
        n = int(samples)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for frame in set(frames):
            through[frame] += n
    return total, own, through


def top_functions(collapsed: Path, count: int = 25) -> str:
    """A text report of the hottest frames in a collapsed-stack file."""
    total, own, through = tally(collapsed.read_text(errors="replace"))
    if not total:
        return "no samples\n"
    lines = [f"{total} samples", "", "self (where the time is spent):"]
    lines += [f"{100 * n / total:6.1f}%  {frame}" for frame, n in own.most_common(count)]
    lines += ["", "inclusive (frames the time passes through):"]
    lines += [f"{100 * n / total:6.1f}%  {frame}" for frame, n in through.most_common(count)]
    return "\n".join(lines) + "\n"


def function_of(frame: str) -> str:
    """`name (file:line)` -> `name (file)`: one entry per function, whatever line."""
    head, colon, line = frame.rpartition(":")
    return head + ")" if colon and line.rstrip(")").isdigit() else frame


def top_markdown(title: str, text: str, count: int = 10) -> str:
    """The `count` hottest functions of collapsed stacks `text`, self and inclusive, as
    Markdown. The inclusive list leaves out the chain every sample passes through (the
    module, main, the event loop's run): at the top whatever the code does."""
    by_function = "\n".join(
        ";".join(function_of(f) for f in stack.split(";")) + " " + n
        for stack, _, n in (line.rpartition(" ") for line in text.splitlines())
    )
    total, own, through = tally(by_function)
    lines = [f"### {title}", "", f"{total} samples.", ""]
    if not total:
        return "\n".join(lines)
    ceiling = 0.98 * max(through.values())
    inner = Counter({frame: n for frame, n in through.items() if n < ceiling})
    for name, counts in (("self", own), ("inclusive", inner)):
        lines += [f"| {name} % | function |", "| ---: | --- |"]
        lines += [
            f"| {100 * n / total:.1f} | `{frame.replace('|', '/')}` |"
            for frame, n in counts.most_common(count)
        ]
        lines.append("")
    return "\n".join(lines)
