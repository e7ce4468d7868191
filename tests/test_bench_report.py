"""bench/report.py reads the per-feature budgets from the paired pass's rounds: the median of each round's
difference, so one slow slice moves one difference and not the verdict. No timing is run here."""

from __future__ import annotations

from pathlib import Path

from bench import report
from bench.load import LoadResult
from bench.run import Options, Results, Row


def _results(rounds: dict[str, list[float]]) -> Results:
    results = Results(paired_rounds=rounds)
    load = LoadResult(1000, 0, 1.0, 1000.0, 1.0, 1.0, 1.0, 0.1)
    for path, values in rounds.items():  # summed rows as the paired pass writes them: the mean here
        results.rows.append(Row(path, 1, "unary", 32, load, sum(values) / len(values), run=3, note="paired"))
    return results


def _check(results: Results, name: str) -> report.Check:
    options = Options(out=Path("."), concurrency=(1, 32), kinds=("unary",))
    return next(c for c in report.checks(results, options) if c.target.startswith(name))


def test_a_budget_is_the_median_of_per_round_differences_not_the_difference_of_sums() -> None:
    # Round 3 ran on a contended host: rest-keys read 0.40 there. The sums would say +0.057 ms.
    results = _results(
        {
            "rest-inproc": [0.200, 0.210, 0.205, 0.200, 0.202],
            "rest-keys": [0.220, 0.231, 0.400, 0.221, 0.224],
        }
    )
    keys = _check(results, "keys + rpm/tpm in memory")
    assert keys.measured == "0.021 ms" and keys.met is True
    assert report.paired_differences(results, "rest-keys", "rest-inproc") == [0.02, 0.021, 0.195, 0.021, 0.022]


def test_a_budget_missed_in_most_rounds_is_missed() -> None:
    results = _results({"rest-keys": [0.25, 0.26, 0.25], "rest-full": [0.29, 0.30, 0.26]})
    ledger = _check(results, "prices + SQLite ledger")
    assert ledger.measured == "0.040 ms" and ledger.met is False


def test_without_rounds_the_summed_rows_decide() -> None:
    results = _results({"rest-inproc": [0.2], "rest-keys": [0.25]})
    results.paired_rounds = {}
    assert _check(results, "keys + rpm/tpm in memory").measured == "0.050 ms"


def test_the_report_lists_each_round_and_the_quartiles() -> None:
    results = _results(
        {
            "rest-inproc": [0.2, 0.2, 0.2, 0.2],
            "rest-keys": [0.22, 0.23, 0.21, 0.22],
            "rest-full": [0.24, 0.25, 0.24, 0.26],
        }
    )
    lines = report.paired_spread(results)
    assert lines == [
        "- rest-keys above rest-inproc: median +0.0200 ms, quartiles +0.0175 to +0.0225 (4 rounds: +0.020, +0.030, "
        "+0.010, +0.020)",
        "- rest-full above rest-keys: median +0.0250 ms, quartiles +0.0200 to +0.0325 (4 rounds: +0.020, +0.020, "
        "+0.030, +0.040)",
    ]
    markdown = report.to_markdown(results, Options(out=Path(".")), report.machine())
    assert "per-round differences" in markdown and lines[0] in markdown
