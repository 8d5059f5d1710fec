"""bench/sections.py: the named sections of bench/RESULTS.md each tool writes."""

from __future__ import annotations

from bench import sections


def test_a_section_is_made_of_its_title_its_words_its_stamp_and_its_body() -> None:
    made = sections.made("Figures", ["Written by a tool."], ["- date: now"], ["| a |"])
    assert made == "## Figures\n\nWritten by a tool.\n\n- date: now\n\n| a |\n"


def test_a_section_replaced_goes_last_and_the_others_stay() -> None:
    text = "# Benchmark results\n\n## One\n\nold one\n\n## Two\n\ntwo\n"
    out = sections.replace(text, "One", "## One\n\nnew one\n")
    assert out == "# Benchmark results\n\n## Two\n\ntwo\n\n## One\n\nnew one\n"
    assert sections.find(out, "Two") == "## Two\n\ntwo"
    assert sections.find(out, "Three") is None
