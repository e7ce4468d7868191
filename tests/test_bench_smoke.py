"""`make test` runs the benchmark only as a smoke run: it works and writes a well-formed report.

No timing is asserted here; the numbers live in bench/RESULTS.md from `make bench`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOLS = {"wrk": "wrk", "nginx": "nginx"}  # binary -> Debian package (.ci/run installs them)


def _missing() -> list[str]:
    found = {b: shutil.which(b) or (Path("/usr/sbin", b).exists() and str(Path("/usr/sbin", b))) for b in TOOLS}
    return [f"`{b}` (Debian package '{TOOLS[b]}')" for b, path in found.items() if not path]


def test_bench_smoke_run_writes_a_well_formed_report(tmp_path: Path) -> None:
    missing = _missing()
    if missing:
        pytest.fail(f"the benchmark needs {', '.join(missing)}: apt-get install {' '.join(TOOLS.values())}")
    committed = (ROOT / "bench" / "RESULTS.md").read_bytes() if (ROOT / "bench" / "RESULTS.md").exists() else None
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"bench --smoke failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"

    report = orjson.loads((tmp_path / "results.json").read_bytes())
    assert {"date", "machine", "options", "rows", "rss", "targets", "failures"} <= report.keys()
    assert report["machine"]["nproc"] >= 1 and report["machine"]["python"]
    paths = {(row["path"], row["kind"]) for row in report["rows"]}
    for path in ("floor", "rest-inproc", "grpc-direct"):
        assert {(path, "unary"), (path, "stream")} <= paths, f"no {path} rows in {sorted(paths)}"
    for row in report["rows"]:
        assert row["requests"] > 0 and row["errors"] == 0, row
        assert row["p50_ms"] > 0 and row["p99_ms"] >= row["p50_ms"], row
        assert row["cpu_ms_per_req"] is not None and row["cpu_ms_per_req"] >= 0, row
    added = [row["added_p50_ms"] for row in report["rows"] if row["path"] != "floor" and row["concurrency"] == 1]
    assert added and all(value is not None for value in added)
    assert report["rss"] and all(p["rss_mb"] > 0 for entry in report["rss"] for p in entry["pass1"])
    assert all(t["met"] in (True, False, None) for t in report["targets"])

    markdown = (tmp_path / "RESULTS.md").read_text()
    assert markdown.startswith("# Benchmark results (smoke run)")
    for heading in ("## Summary", "## Targets (issues 13, 14 and 17)", "## All paths", "## RSS per process (MB)"):
        assert heading in markdown
    assert "| rest-inproc | 1 | unary c=1 |" in markdown
    # The smoke run never touches the committed results.
    after = (ROOT / "bench" / "RESULTS.md").read_bytes() if (ROOT / "bench" / "RESULTS.md").exists() else None
    assert after == committed


def test_client_comparison_runs() -> None:
    """`python -m bench.clients` (the measurement behind the upstream HTTP client) works; no timing."""
    if _missing():
        pytest.fail(f"the benchmark needs {', '.join(_missing())}")
    done = subprocess.run(
        [sys.executable, "-m", "bench.clients", "--requests", "640", "--rounds", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["aiohttp", "http1"], lines
    assert all("µs CPU/request" in line and "req/s" in line for line in lines), lines
