"""Benchmark tables: fixed-point numbers (units in the headers), a numbered footnote per derived column."""

from llm.bench.common import format_number, format_table


def test_numbers_are_fixed_point_with_about_four_digits():
    assert format_number(2.96e8) == "296,000,000"
    assert format_number(149.24) == "149.2"
    assert format_number(0.0012345) == "0.001234"
    assert format_number(1.5) == "1.500"
    assert format_number(0.0) == "0"
    assert "e" not in format_number(3.3e-7)


def test_headers_and_footnotes():
    rows = [{"op": "norm", "time_ms": 1.25, "ratio": 2.0}, {"op": "attn", "time_ms": 10.5, "ratio": 0.5}]
    table = format_table(rows, headers={"time_ms": "time (ms)"}, notes={"ratio": "torch time / our time"})
    lines = table.splitlines()
    assert lines[0].split() == ["op", "time", "(ms)", "ratio", "[1]"]
    assert lines[2].split() == ["norm", "1.250", "2.000"]
    assert lines[-1] == "[1] ratio: torch time / our time"
    assert len(lines) == 5
