"""Optional py-spy profiles of the gateway under S1 and S2 load (`python -m bench.run --profile`).

py-spy samples the proxy without pausing it (`--nonblocking`) and writes collapsed stacks;
`top_functions` turns them into the two lists that point at a hot path: where samples land
(self) and which frames they pass through (inclusive). The collapsed file also feeds any
flame-graph tool.
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


def start_recording(pid: int, duration_s: float, out: Path, cpu: int) -> subprocess.Popen[bytes]:
    """Start sampling `pid` for `duration_s` into `out` (collapsed stacks), on CPU `cpu`."""
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
        "raw",
        "--output",
        str(out),
    ]
    return subprocess.Popen(
        pinned(argv, cpu),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def top_functions(collapsed: Path, count: int = 25) -> str:
    """A text report of the hottest frames in a collapsed-stack file."""
    own: Counter[str] = Counter()
    through: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, samples = line.rpartition(" ")
        if not stack or not samples.isdigit():
            continue
        n = int(samples)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for frame in set(frames):
            through[frame] += n
    if not total:
        return "no samples\n"
    lines = [f"{total} samples", "", "self (where the time is spent):"]
    lines += [f"{100 * n / total:6.1f}%  {frame}" for frame, n in own.most_common(count)]
    lines += ["", "inclusive (frames the time passes through):"]
    lines += [f"{100 * n / total:6.1f}%  {frame}" for frame, n in through.most_common(count)]
    return "\n".join(lines) + "\n"
