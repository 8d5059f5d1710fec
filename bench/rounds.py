"""What the side-by-side tools (bench.auth, bench.tracing, bench.attribution) share: their
round options, the simulated backend they measure against, and the interleaved rounds (each
case once a round, so a machine whose pace drifts moves every case alike)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from bench.processes import Service, free_port, start
from bench.scenarios import LOAD_CPU, ROOT

_Case = TypeVar("_Case")


def add_options(parser: argparse.ArgumentParser, seconds: float) -> None:
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s per case")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=seconds)


def chosen(args: argparse.Namespace) -> tuple[int, float]:
    """Rounds and seconds per case the options ask for."""
    return (1, 2.0) if args.quick else (args.rounds, args.seconds)


def simbackend(work: Path, *options: str) -> Service:
    """The simulated backend on CPU 0 (with the loads), on a free port."""
    port = free_port()
    argv = [sys.executable, "-m", "bench.simbackend", "--port", str(port), *options]
    return start("simbackend", argv, port=port, cpu=LOAD_CPU, log_dir=work, cwd=ROOT)


def interleaved(
    rounds: int,
    cases: Sequence[_Case],
    name: Callable[[_Case], str],
    measure: Callable[[_Case], None],
) -> None:
    """Measure every case once a round, for `rounds` rounds, saying which on stderr."""
    for round_ in range(rounds):
        for case in cases:
            print(f"round {round_ + 1}/{rounds}: {name(case)}", file=sys.stderr)
            measure(case)
