"""CPU time and memory of a process tree, read from /proc (Linux only).

CPU time is utime + stime from /proc/<pid>/stat for the process and every live descendant
(nginx's worker is a child of its master), so CPU per request is exact even when wall-clock
figures are noisy; its resolution is one clock tick (usually 10 ms).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from types import TracebackType

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PROC = Path("/proc")


def _stat_fields(pid: int) -> list[str]:
    text = (PROC / str(pid) / "stat").read_text()
    # The command name may hold spaces and parentheses: split after its last ')'.
    return text[text.rindex(")") + 2 :].split()


def tree(pid: int) -> list[int]:
    """`pid` and its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(entry.name))[1])
        except (OSError, ValueError, IndexError):
            continue  # the process ended while we looked
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, ()))
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by `pid` and its live descendants."""
    return sum(cpu_split(pid))


def cpu_split(pid: int) -> tuple[float, float]:
    """User and system CPU seconds used so far by `pid` and its live descendants."""
    user = system = 0
    for member in tree(pid):
        try:
            fields = _stat_fields(member)
        except OSError:
            continue
        user += int(fields[11])  # utime (field 14)
        system += int(fields[12])  # stime (field 15)
    return user / CLOCK_TICKS, system / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    """Resident set size of `pid` and its live descendants, in bytes."""
    total = 0
    for member in tree(pid):
        try:
            status = (PROC / str(member) / "status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
                break
    return total


class PeakRss:
    """Samples a process tree's RSS on a thread while the `with` block runs; `.peak` bytes."""

    def __init__(self, pid: int, every_s: float = 0.05) -> None:
        self.pid = pid
        self.every_s = every_s
        self.start = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)

    def __enter__(self) -> PeakRss:
        self.start = self.peak = rss_bytes(self.pid)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.peak = max(self.peak, rss_bytes(self.pid))

    def _sample(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, rss_bytes(self.pid))


class CpuWindow:
    """CPU seconds a process tree used during the `with` block, and the wall time it lasted."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.cpu_s = 0.0
        self.wall_s = 0.0
        self._cpu0 = 0.0
        self._t0 = 0.0

    def __enter__(self) -> CpuWindow:
        self._t0 = time.perf_counter()
        self._cpu0 = cpu_seconds(self.pid) if self.pid else 0.0
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.wall_s = time.perf_counter() - self._t0
        self.cpu_s = (cpu_seconds(self.pid) - self._cpu0) if self.pid else 0.0


def cpu_times() -> dict[int, tuple[int, int]]:
    """Per CPU: (busy, total) jiffies since boot, from /proc/stat."""
    out: dict[int, tuple[int, int]] = {}
    for line in (PROC / "stat").read_text().splitlines():
        name, *values = line.split()
        if not name.startswith("cpu") or name == "cpu":
            continue
        ticks = [int(v) for v in values[:8]]
        idle = ticks[3] + ticks[4]  # idle + iowait
        out[int(name[3:])] = (sum(ticks) - idle, sum(ticks))
    return out


def busy_between(
    before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]
) -> dict[str, float]:
    """Each CPU's busy fraction between two `cpu_times()` readings."""
    out = {}
    for cpu, (busy1, total1) in after.items():
        busy0, total0 = before.get(cpu, (busy1, total1))
        out[str(cpu)] = round((busy1 - busy0) / (total1 - total0), 3) if total1 > total0 else 0.0
    return out


def wait_quiet(cpu: int, below: float = 0.1, within_s: float = 3.0, step_s: float = 0.2) -> float:
    """Wait (up to `within_s`) until `cpu` is less than `below` busy; its last busy fraction."""
    deadline = time.monotonic() + within_s
    busy = 1.0
    while time.monotonic() < deadline:
        before = cpu_times()
        time.sleep(step_s)
        busy = busy_between(before, cpu_times()).get(str(cpu), 0.0)
        if busy < below:
            break
    return busy


class MachineBusy:
    """Every CPU's busy fraction during the `with` block (shows interference from elsewhere)."""

    def __init__(self) -> None:
        self.busy: dict[str, float] = {}
        self._before: dict[int, tuple[int, int]] = {}

    def __enter__(self) -> MachineBusy:
        self._before = cpu_times()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.busy = busy_between(self._before, cpu_times())
