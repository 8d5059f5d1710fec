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
