"""bench/bench_cluster.py still runs: its quick mode starts its own Redis, S3 and clusters, measures every
figure and prints the table with each row. The figures themselves are not checked here (a shared CI
machine is no place to judge them); docs/benchmarks.md records a full run."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.bench_cluster import main

ROWS = [
    "| throughput | 1 worker,",
    "| throughput | 2 workers,",
    "| throughput | 4 workers,",
    "| enqueue-to-start under load | 1 worker,",
    "| enqueue-to-start under load | 2 workers,",
    "| enqueue-to-start under load | 4 workers,",
    "| sync latency, 1 client | single process |",
    "| sync latency, 1 client | cluster: 1 API node, 1 worker |",
    "| added latency (cluster - single) |",
    "| enqueue-to-start, 1 client |",
    "| sync replies saying processing, no result |",
    "| recovery: kill to started again |",
    "| recovery: kill to finished |",
]


@pytest.mark.timeout(240)
def test_quick_run_prints_every_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cluster.md"

    table = main(["--quick", "--out", str(out)])

    printed = capsys.readouterr().out
    assert table in printed
    assert out.read_text() == table + "\n"
    lines = table.splitlines()
    assert "| measure | configuration | p50 or value | p99 or max | target |" in lines
    for row in ROWS:
        assert sum(line.startswith(row) for line in lines) == 1, row
    assert table.count("(met)") + table.count("(missed)") == 5  # scaling x2, added latency, replies, recovery
