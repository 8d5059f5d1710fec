"""The benchmark's figure-making: the floor's targets in the summary table, memory per open
stream, growth steps, and the profile's top frames (pure functions over given figures)."""

from __future__ import annotations

from typing import Any

from bench import growthreport, report
from bench.growth import prompt_body
from bench.profile import function_of, top_markdown


def _results(proxy_cpu: float) -> dict[str, Any]:
    s1 = {
        "nginx": {"proxy_cpu_us_per_request": 20.0},
        "floor": {"proxy_cpu_us_per_request": 50.0},
        "proxy": {"proxy_cpu_us_per_request": proxy_cpu},
    }
    return {"s1": s1, "s2": {}, "s2p": {}, "s3": {}, "s3_order": [], "s4": {}}


def _row(rows: list[report.Row], label: str) -> report.Row:
    return next(r for r in rows if r.label == label)


def test_cpu_row_names_each_target_it_misses() -> None:
    """S1's CPU row holds the gateway to 4 x nginx and 1.25 x the floor, and says which
    holds; the table has a proxy/floor ratio column."""
    row = _row(report.build_rows(_results(70.0)), "S1 CPU-us per request")
    assert row.target == "<= 4 x nginx, <= 1.25 x floor"
    assert row.verdict == "nginx ok, floor MISS"
    assert report.ratio(row, "proxy", "floor") == "1.40x"
    row = _row(report.build_rows(_results(62.5)), "S1 CPU-us per request")
    assert row.verdict == "nginx ok, floor ok"
    header, _ = report.table_cells([row])
    assert "floor" in header and "proxy/floor" in header


def test_paced_row_has_only_the_floor_target_and_no_floor_no_verdict() -> None:
    """S2 paced is held to the floor only; without a floor figure there is no verdict."""
    results = _results(70.0)
    results["s2p"] = {
        "nginx": {"proxy_cpu_us_per_chunk": 9.0},
        "proxy": {"proxy_cpu_us_per_chunk": 19.0},
    }
    row = _row(report.build_rows(results), "S2 paced CPU-us per chunk")
    assert row.target == "<= 1.25 x floor"
    assert row.verdict == ""


def test_bytes_per_stream_counts_from_before_the_first_shape() -> None:
    """A later shape reuses the heap an earlier one grew: its memory per stream is counted
    from the RSS before the first shape, not from its own start."""
    mib = 1024 * 1024
    results = {
        "s3_order": ["a", "c"],
        "s3": {
            "a": {"proxy": {"streams": 1000, "rss_bytes": {"start": 50 * mib, "peak": 70 * mib}}},
            "c": {"proxy": {"streams": 10000, "rss_bytes": {"start": 70 * mib, "peak": 150 * mib}}},
        },
    }
    assert report.bytes_per_stream(results, "a", "proxy") == round(20 * mib / 1000)
    assert report.bytes_per_stream(results, "c", "proxy") == round(100 * mib / 10000)
    assert report.bytes_per_stream(results, "c", "nginx") is None


def _growth(length: dict[str, float], concurrency: dict[str, float]) -> dict[str, Any]:
    return {
        "length": {k: {"proxy": {"proxy_cpu_us_per_chunk": v}} for k, v in length.items()},
        "concurrency": {k: {"proxy": {"ttfe_ms": {"p99": v}}} for k, v in concurrency.items()},
    }


def test_growth_steps_flag_a_rising_per_event_cost_and_a_superlinear_total() -> None:
    """Per event should stay flat (a rise past 1.25x is a step); first-event p99 may grow as
    fast as the streams do (10x the streams, 12.5x at most), not faster."""
    flat = growthreport.tables(_growth({"10": 5.0, "100": 2.0}, {"100": 1.0, "1000": 12.0}))
    assert growthreport.steps(flat) == []
    bad = growthreport.tables(_growth({"10": 2.0, "100": 3.0}, {"100": 1.0, "1000": 20.0}))
    notes = growthreport.steps(bad)
    assert len(notes) == 2
    assert notes[0].startswith("proxy, CPU-us per event") and "x1.50 from 10 to 100" in notes[0]
    assert "x20.00 from 100 to 1,000" in notes[1]


def test_growth_tables_render_in_point_order() -> None:
    """Points sort as numbers (1,000 after 100), in text and Markdown."""
    found = growthreport.tables(_growth({"1000": 1.0, "100": 2.0, "10": 3.0}, {}))
    length = next(t for t in found if t.title.startswith("CPU-us per event"))
    assert length.labels == ("10", "100", "1,000")
    assert length.rows == {"proxy": [3.0, 2.0, 1.0]}
    assert "| proxy | 3.00 | 2.00 | 1.00 |" in growthreport.markdown(length)
    assert growthreport.text(length).splitlines()[-1].split() == ["proxy", "3.00", "2.00", "1.00"]


def test_prompt_body_is_about_the_size_asked() -> None:
    for size in (1024, 256 * 1024):
        assert size <= len(prompt_body(size)) <= size + 8


def test_top_markdown_groups_lines_and_leaves_out_the_root_chain() -> None:
    """Frames of one function on several lines count as one; the frames every sample passes
    through (module, main, the loop) are left out of the inclusive list."""
    collapsed = "\n".join(
        [
            "<module> (m.py:1);main (m.py:5);handle (h.py:10);write (w.py:3) 6",
            "<module> (m.py:1);main (m.py:5);handle (h.py:12) 3",
            "<module> (m.py:1);main (m.py:5);parse (p.py:7) 1",
            "garbage line",
        ]
    )
    text = top_markdown("proxy, S1", collapsed)
    assert "10 samples." in text
    assert "| 60.0 | `write (w.py)` |" in text  # self
    assert "| 90.0 | `handle (h.py)` |" in text  # inclusive: both of its lines
    assert "`main (m.py)`" not in text and "`<module> (m.py)`" not in text
    assert function_of("Runner.run (asyncio/runners.py:118)") == "Runner.run (asyncio/runners.py)"
