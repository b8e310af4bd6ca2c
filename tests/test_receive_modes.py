"""Wyng's receive modes: --sparse reads the local volume once and writes
only the chunks that differ; --sparse-write writes only differing bytes
and punches holes for zeros; --use-snapshot starts from the local snapshot
of the last send and fetches only what may differ from it."""
import os
import re
import subprocess

import pytest

from conftest import need_root
from images import KiB, MiB, digest, make, overwrite

CS = 64 * KiB  # --chunk-factor=1
SIZE = 8 * MiB


def _fetched(done):
    return int(re.search(r", (\d+) chunks\)$", done.stdout.strip()).group(1))


def _image(path):
    """Data in the first 5 MiB, a hole after."""
    return make(path, SIZE, [(0, 5 * MiB, "random")], seed=3)


def _changed_copy(image, path):
    """A copy of ``image`` where three chunks differ: one rewritten, one of
    data made zeros, one of the hole given data."""
    subprocess.run(["cp", "--sparse=always", str(image), str(path)], check=True)
    overwrite(path, 1 * CS + 10, b"rewritten")
    overwrite(path, 3 * CS, bytes(CS))
    overwrite(path, 100 * CS, os.urandom(CS))
    return path


@pytest.fixture
def loop_device(tmp_path):
    need_root()
    made = []

    def attach(path):
        dev = subprocess.run(["losetup", "--find", "--show", str(path)], capture_output=True, text=True,
                             check=True).stdout.strip()
        made.append(dev)
        return dev
    yield attach
    for dev in made:
        subprocess.run(["losetup", "-d", dev])


def _io(dev):
    """(bytes read, bytes written) of a block device so far."""
    fields = open("/sys/block/%s/stat" % os.path.basename(dev)).read().split()
    return int(fields[2]) * 512, int(fields[6]) * 512


def test_sparse_reads_the_local_volume_once_and_writes_only_what_differs(wyng, tmp_path, loop_device):
    image = _image(tmp_path / "img")
    wyng.init("--chunk-factor=1")
    wyng.send("vol", image)
    dev = loop_device(_changed_copy(image, tmp_path / "local"))
    refused = wyng.receive("vol", dev, "--sparse", expect=1)  # a device that holds data: not without a yes
    assert refused.stderr == "qvm-wyng: error: %s holds data: --force replaces it\n" % dev
    subprocess.run(["blockdev", "--flushbufs", dev], check=True)
    before = _io(dev)
    done = wyng.receive("vol", dev, "--sparse", "--force")
    read, written = (a - b for a, b in zip(_io(dev), before))
    assert _fetched(done) == 2, "the rewritten chunk and the zeroed one; the hole is discarded"
    # once, the discarded chunk again to see it reads zeros, and the first MiB for the data check
    assert SIZE <= read <= SIZE + CS + MiB, read
    assert written == 2 * CS
    assert digest(dev) == digest(image)


def test_sparse_write_writes_only_what_differs_and_punches_holes(wyng, tmp_path):
    image = _image(tmp_path / "img")
    wyng.init("--chunk-factor=1")
    wyng.send("vol", image)
    local = _changed_copy(image, tmp_path / "local")
    before = os.stat(local)
    done = wyng.receive("vol", local, "--sparse-write", "--force")
    assert _fetched(done) == 80, "every data chunk is fetched and compared"
    assert digest(local) == digest(image) and os.stat(local).st_ino == before.st_ino, "in place"
    with open(local, "rb") as f, pytest.raises(OSError):  # ENXIO: no data after 5 MiB
        os.lseek(f.fileno(), 5 * MiB, os.SEEK_DATA)
    # no volume to write onto: the whole session, with a notice
    done = wyng.receive("vol", tmp_path / "new", "--sparse")
    assert "no volume to start from: receiving all of it" in done.stderr and _fetched(done) == 80
    assert digest(tmp_path / "new") == digest(image)


@pytest.fixture(params=["btrfs", "xfs"])
def pool(request):
    return request.getfixturevalue(request.param + "_mount")


def test_use_snapshot_starts_from_the_snapshot_of_the_last_send(wyng, tmp_path, pool):
    vol, local = "vm.img", pool / "vm.img"
    first = _image(tmp_path / "first")
    wyng.init("--chunk-factor=1")
    local.write_bytes(first.read_bytes())
    wyng.at(1e9, "send", "--local=%s" % pool, vol)
    for index in (2, 7, 40):
        overwrite(local, index * CS, os.urandom(100))
    second = tmp_path / "second"
    second.write_bytes(local.read_bytes())
    wyng.at(1e9 + 60, "send", "--local=%s" % pool, vol)
    _changed_copy(second, local)  # changes since the last send

    refused = wyng.run("receive", vol, "--local=%s" % pool, "--use-snapshot", expect=1)  # over the volume
    assert refused.stderr == "qvm-wyng: error: %s exists in %s: --force replaces it\n" % (vol, pool)
    done = wyng.run("receive", vol, "--local=%s" % pool, "--use-snapshot", "--force")
    assert _fetched(done) == 0 and digest(local) == digest(second)
    done = wyng.run("receive", vol, "--local=%s" % pool, "--use-snapshot", "--overwrite", "--session=20010909-014640")
    assert _fetched(done) == 3 and digest(local) == digest(first), "the three chunks the last session changed"
    # the next send finds exactly those three chunks changed, and records the first session's volume
    done = wyng.at(1e9 + 120, "send", "--local=%s" % pool, vol)
    assert "3 of 128 chunks changed" in done.stdout
    wyng.receive(vol, tmp_path / "out")
    assert digest(tmp_path / "out") == digest(first)
    # without a snapshot of the volume there: a full receive, with a notice
    done = wyng.receive(vol, tmp_path / "again", "--use-snapshot")
    assert "no snapshot to start from: receiving all of it" in done.stderr and _fetched(done) == 80
