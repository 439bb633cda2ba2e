"""The expected share of DP-off adaptation for a site's N and ε: interpolated in log N and
ε from the measured table, silent outside it, and the table is the benchmark's result."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from fedcpt.privacy.expected_utility import KEPT, expected_share, expected_share_line

RESULT = Path(__file__).parents[2] / "benchmarks" / "results" / "dp_utility_vs_units.json"
TABLE = {1_000: {1.0: 0.1, 8.0: 0.5}, 100_000: {1.0: 0.7, 8.0: 0.9}}


def test_measured_points_are_returned_as_measured():
    for n, row in TABLE.items():
        for eps, share in row.items():
            assert expected_share(n, eps, TABLE) == pytest.approx(share)


def test_interpolation_is_linear_in_log_n_and_in_epsilon():
    # N = 10,000 is halfway between 1k and 100k in log N; ε = 4.5 halfway between 1 and 8
    assert expected_share(10_000, 1.0, TABLE) == pytest.approx(0.4)
    assert expected_share(1_000, 4.5, TABLE) == pytest.approx(0.3)
    assert expected_share(10_000, 4.5, TABLE) == pytest.approx((0.1 + 0.5 + 0.7 + 0.9) / 4)
    # log-N spacing, not linear: N = 50,500 (halfway in N) is 0.85 of the way in log N
    u = (math.log(50_500) - math.log(1_000)) / (math.log(100_000) - math.log(1_000))
    assert expected_share(50_500, 1.0, TABLE) == pytest.approx(0.1 + u * 0.6)


@pytest.mark.parametrize(("units", "eps"), [(999, 4.0), (100_001, 4.0), (5_000, 0.5),
                                            (5_000, 8.01)])
def test_outside_the_measured_range_says_so(units, eps):
    assert expected_share(units, eps, TABLE) is None
    line = expected_share_line(units, eps, TABLE)
    assert line.endswith(")") and "outside the measured range (N 1,000-100,000, ε 1-8;" in line


def test_line_names_the_site_the_budget_and_the_share():
    line = expected_share_line(10_000, 1.0, TABLE)
    assert line.startswith("expected share of DP-off adaptation at ε=1 for N=10,000 units: ~40% "
                           "(interpolated from benchmarks measured on gcide:entries")


def test_bad_inputs_and_ragged_tables_are_refused():
    with pytest.raises(ValueError, match="must be positive"):
        expected_share(0, 8.0, TABLE)
    with pytest.raises(ValueError, match="same ε values"):
        expected_share(5_000, 4.0, {1_000: {1.0: 0.1, 8.0: 0.5}, 100_000: {8.0: 0.9}})


def test_library_table_is_the_benchmarks_measured_result():
    measured = json.loads(RESULT.read_text())
    assert measured["model"] == "smollm2-135m-instruct" and measured["corpus"] == "gcide:entries"
    kept = measured["kept"]
    complete = max(len(row) for row in kept.values())  # a cut run's last N may lack an ε
    rows = {int(n): row for n, row in kept.items() if len(row) == complete}
    assert sorted(KEPT) == sorted(rows)
    for n, row in rows.items():
        assert KEPT[n] == pytest.approx({float(e): share for e, share in row.items()}, abs=5e-5)


def test_privacy_doc_carries_the_table_as_the_report_prints_it():
    spec = importlib.util.spec_from_file_location(
        "dp_utility_vs_units_report", RESULT.parents[1] / "dp_utility_vs_units_report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    table = report.markdown_table(json.loads(RESULT.read_text()))
    assert table in (RESULT.parents[2] / "docs" / "privacy.md").read_text()
