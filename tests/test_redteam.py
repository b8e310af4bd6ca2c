"""Regression tests for what a hostile-storage review found (issue 16):
each fails without its fix.  Storage is the archive folder, changed by the
test; agents are the real one over pipes, or a small hostile script."""
import os

import pytest

from images import KiB, make

CHUNK = 64 * KiB  # --chunk-factor=1


def _image(path, seed, chunks=4):
    return make(path, chunks * CHUNK, [(0, chunks * CHUNK, "random")], seed=seed)


def _one_line_error(done, *words):
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qvm-wyng: error: "), done.stderr
    assert "Traceback" not in done.stderr
    for w in words:
        assert w in lines[0], lines[0]


# -- 1. a volume named twice is one volume -----------------------------------

@pytest.mark.parametrize("names", [("vol", "vol"), ("work", "qubes/work/private")])
def test_prune_of_a_volume_named_twice_removes_one_session(wyng, tmp_path, names):
    name = "vol" if names[0] == "vol" else "qubes/work/private"
    wyng.init("--chunk-factor=1")
    images = [_image(tmp_path / ("img%d" % n), n) for n in range(3)]
    for n, image in enumerate(images):
        wyng.at(1767225600 + n * 60, "send", "--import-other-from=%s:|:%s" % (name, image))
    first, second, third = wyng.sessions(name)
    wyng.run("prune", *names, "--session=%s" % second)
    assert wyng.sessions(name) == [first, third]
    wyng.receive(name, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == images[2].read_bytes()
    wyng.run("verify", name, "--session=%s" % first)
