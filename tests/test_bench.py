"""The benchmarks still run: each at a tiny size (their figures mean
nothing here, only that the code that makes them works after a change)."""
import subprocess
import sys

import pytest

from conftest import REPO, need_root


@pytest.mark.parametrize("bench, args", [("cow.py", ["--size", "64M", "--write-size", "64K", "--verify"]),
                                         ("receive_modes.py", ["--size", "64M"])])
def test_bench_runs_at_a_tiny_size(bench, args, tmp_path):
    need_root()
    done = subprocess.run([sys.executable, str(REPO / "bench" / bench), *args, "--workdir", str(tmp_path / "w"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert list((tmp_path / "out").iterdir()), "no report written"
