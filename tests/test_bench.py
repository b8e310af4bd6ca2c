"""The benchmarks still run: each at a tiny size (their figures mean
nothing here, only that the code that makes them works after a change)."""
import json
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


def test_the_project_bench_runs_on_a_sparse_volume_at_a_tiny_size(tmp_path):
    """bench.py with --volume: 64 MiB of data spread over 1 GiB, timed beside
    the same data dense, and compared with the restored file by its data."""
    need_root()
    out = tmp_path / "out.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "bench.py"), "--source", "--size", "0.0625",
                           "--volume", "1", "--work", str(tmp_path / "w"), "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "sparse: the send took" in done.stdout
    r = json.loads(out.read_text())
    assert r["image_bytes"] == 1 << 30 and r["restored_allocated_bytes"] < 128 << 20
