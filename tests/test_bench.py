"""tests/bench_speed.py runs (in its tiny mode), so that it cannot rot unnoticed."""
import subprocess
import sys

from conftest import ROOT


def test_the_speed_benchmark_runs_in_its_tiny_mode():
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "bench_speed.py"), "--tiny"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.rstrip().endswith(("x floor",
                                                                                "hooks"))]
    assert len(rows) == 3  # two numpy dtypes and the tutorial, each with its speed-up
    assert "medians of 1 repeats" in done.stdout
