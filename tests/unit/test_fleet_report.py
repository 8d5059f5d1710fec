"""bench/fleetreport.py: the Fleet section of bench/RESULTS.md is replaced where it stands."""

from __future__ import annotations

from bench.fleetreport import replace_section


def test_the_fleet_section_is_replaced_in_place(tmp_path) -> None:
    """The new section takes the old one's place; the sections around it are kept as they were."""
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\n## S1\n\na\n\n## Fleet\n\nold\n\n## Growth\n\ng\n")
    replace_section(path, "## Fleet\n\nnew\n")
    assert "# Benchmark results\n\n## S1\n\na\n\n## Fleet\n\nnew\n\n## Growth\n\ng\n" == (
        path.read_text()
    )


def test_a_file_without_the_section_gets_it_at_the_end(tmp_path) -> None:
    """A RESULTS.md with no Fleet section gets one after the rest."""
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\n## S1\n\na\n")
    replace_section(path, "## Fleet\n\nnew\n")
    assert "# Benchmark results\n\n## S1\n\na\n\n## Fleet\n\nnew\n" == path.read_text()


def _case(p90: float, later_p90: float, hit_rate: float = 0.5, p99: float = 100.0) -> dict:
    return {
        "hit_rate": hit_rate,
        "ttft_ms": {"p90": p90, "p99": p99},
        "second_half": {"ttft_ms": {"p90": later_p90}},
    }


def test_two_gateways_p90_target_is_judged_on_the_second_half() -> None:
    """Point 8's p90 target is over the run's second half (past the keys' arrival); the
    whole run's ratio is shown beside it, with no verdict."""
    from bench.fleetreport import prefix_targets, targets_table

    prefix = {
        "runs": {
            "pressure": {
                "policies": {
                    "weighted": _case(270.0, 268.0, hit_rate=0.33),
                    "affinity": _case(50.0, 45.0, hit_rate=0.88),
                    "affinity, 2 gateways, agreed": _case(185.0, 60.0, hit_rate=0.84),
                }
            },
            "control": {"policies": {"affinity": _case(40, 40), "least_loaded": _case(40, 40)}},
        }
    }
    targets = {t["target"]: t for t in prefix_targets(prefix)}
    later = targets["pressure, 2 gateways agreed, second half: random TTFT p90 / theirs >= 3"]
    assert (later["figure"], later["met"]) == (round(268 / 60, 3), True)
    whole = targets[
        "pressure, 2 gateways agreed, whole run (the keys' arrival included): random TTFT p90 "
        "/ theirs"
    ]
    assert (whole["figure"], whole["met"]) == (round(270 / 185, 3), None)
    prefix["targets"] = list(targets.values())
    verdicts = {row[0]: row[2] for row in targets_table(prefix)[1]}
    assert verdicts[later["target"]] == "met" and verdicts[whole["target"]] == "-"
