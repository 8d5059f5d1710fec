"""bench.attribution: its table, and that every phase it takes out still exists."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bench.attribution import PHASES, Case, swap, table
from bench.scenarios import ROOT


def _case(name: str, user: float, system: float) -> Case:
    return Case(name, [], [{"requests_per_s": 1000.0, "user_us": user, "system_us": system}])


def test_the_table_says_what_each_phase_saved_against_the_whole_gateway() -> None:
    rows = table(
        [
            _case("floor", 40.0, 14.0),
            _case("floor + 70 us of busy work", 110.0, 34.0),
            _case("gateway", 105.0, 35.0),
            _case("gateway without access-log", 101.0, 35.5),
        ]
    )
    assert rows[2] == "| floor | 1,000 | 40.0 | 14.0 | 54.0 | 54.0-54.0 | 0.0 | - |"
    assert rows[4] == "| gateway | 1,000 | 105.0 | 35.0 | 140.0 | 140.0-140.0 | 65.0 | - |"
    assert rows[5] == (
        "| gateway without access-log | 1,000 | 101.0 | 35.5 | 136.5 | 136.5-136.5 | 61.0 | 3.5 |"
    )


def test_the_table_shows_the_lowest_and_highest_round() -> None:
    runs = [
        {"requests_per_s": 900.0, "user_us": 100.0, "system_us": 30.0},
        {"requests_per_s": 1100.0, "user_us": 110.0, "system_us": 40.0},
    ]
    rows = table([_case("floor", 40.0, 14.0), Case("gateway", [], runs)])
    assert rows[3] == "| gateway | 1,000 | 105.0 | 35.0 | 140.0 | 130.0-150.0 | 65.0 | - |"


def _runs(*totals: float) -> list[dict[str, float]]:
    return [{"requests_per_s": 1.0, "user_us": t - 30.0, "system_us": 30.0} for t in totals]


def test_what_a_phase_saved_is_judged_round_by_round() -> None:
    """The machine's pace moves both cases of a round alike: a phase is judged against the
    gateway's run of its own round (medians of the two columns would say -10 here)."""
    gateway = Case("gateway", [], _runs(130.0, 170.0, 150.0))
    without = Case("gateway without metrics", [], _runs(127.0, 167.0, 160.0))
    rows = table([_case("floor", 40.0, 14.0), gateway, without])
    assert rows[4].endswith("| 3.0 |")


def test_a_phase_that_no_longer_exists_is_refused_not_measured_as_the_whole_gateway() -> None:
    with pytest.raises(AttributeError, match="does not exist"):
        swap("proxy.middleware:no_such_phase", None)


def test_every_phase_can_be_taken_out() -> None:
    """In a process of its own: the swaps replace the gateway's functions."""
    code = (
        "from bench.attribution import PHASES, swap\n"
        "for _, made in PHASES.values():\n"
        "    for target, value in made().items():\n"
        "        swap(target, value)\n"
        "print(len(PHASES))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(len(PHASES))
