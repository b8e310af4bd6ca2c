"""send --local from Btrfs and XFS (reflink snapshots): every incremental
reads exactly the chunks the writes touched, and every session restores
byte for byte.  Also monitor, diff, receive --local, delete --clean and the
rules for snapshots that cannot be trusted."""
import json
import os
import random
import subprocess

import pytest

from conftest import need, which
from images import KiB, MiB, pwrite_pieces, same

CS = 256 * KiB
NAME = "appvms/work/private.img"


@pytest.fixture(params=["btrfs", "xfs"])
def fs(request):
    return request.getfixturevalue(request.param + "_mount")


class Local:
    """A volume file in a reflink pool, and qvm-wyng runs against it."""

    def __init__(self, wyng, pool, name=NAME):
        self.wyng, self.pool, self.name = wyng, pool, name
        self.path = pool / name
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def make(self, size, data=((0, None),), seed=1):
        """A sparse file with random bytes in the (offset, length) pieces."""
        rnd = random.Random(seed)
        with open(self.path, "wb") as f:
            f.truncate(size)
            for offset, length in data:
                f.seek(offset)
                f.write(rnd.randbytes(length or size - offset))
        return self

    def write(self, *pieces, data=None):
        """pwrite random bytes (or ``data``) at (offset, length) pieces; the
        indexes of the chunks they touch."""
        pwrite_pieces(self.path, pieces, data)
        return touched(pieces)

    def send(self, *args, expect=0, env=None):
        done = self.wyng.run("send", "--local=%s" % self.pool, self.name, "--json", *args, expect=expect, env=env)
        return json.loads(done.stdout)["volumes"][0] if expect == 0 else done

    def check(self, tmp, session=None):
        out = tmp / "restored"
        self.wyng.run("receive", self.name, "--save-to=%s" % out, *(["--session=" + session] if session else []))
        assert same(out, self.path), "the restored session differs from the volume"
        out.unlink()

    def snapshots(self):
        return sorted(p.name for p in self.path.parent.iterdir() if ".qwyng-" in p.name)


def touched(pieces, cs=CS):
    return {i for offset, length in pieces for i in range(offset // cs, (offset + length - 1) // cs + 1)}


@pytest.fixture
def local(wyng, fs):
    wyng.init()
    return Local(wyng, fs)


def test_incremental_reads_exactly_the_chunks_the_writes_touched(local, tmp_path):
    local.make(24 * MiB + 12 * KiB, [(0, 9 * MiB), (13 * MiB, 0)])   # a hole from 9 to 13 MiB
    first = local.send()
    assert not first["incremental"] and first["chunks_read"] == 36 + 45
    local.check(tmp_path)
    assert len(local.snapshots()) == 1

    # scattered writes: aligned, unaligned, crossing a chunk boundary, into the hole
    chunks = local.write((0, 4 * KiB), (3 * MiB + 100, 9000), (CS - 2048, 4096), (10 * MiB, 64 * KiB),
                         (20 * MiB + 7, 1))
    st = local.send()
    assert st["incremental"] and st["chunks_read"] == len(chunks) == 5
    assert st["chunks_changed"] == st["chunks_sent"] == 5 and st["chunks_scanned"] == 97
    local.check(tmp_path)

    # identical bytes rewritten: read, but nothing changed, so no session
    with open(local.path, "rb") as f:
        f.seek(5 * MiB)
        old = f.read(300 * KiB)
    chunks = local.write((5 * MiB, 300 * KiB), data=old)
    st = local.send()
    assert st["chunks_read"] == len(chunks) == 2 and st["chunks_changed"] == 0 and st["session"] is None

    # holes punched: a part of a chunk (read) and two whole chunks (zeros, not read)
    need(which("fallocate"), "fallocate (util-linux)")
    for offset, length in ((6 * MiB + 64 * KiB, 64 * KiB), (16 * MiB, 2 * CS)):
        subprocess.run(["fallocate", "-p", "-o", str(offset), "-l", str(length), str(local.path)], check=True)
    st = local.send()
    assert st["incremental"] and st["chunks_read"] == 1 and st["chunks_changed"] == 3
    local.check(tmp_path)

    # shrunk to a size inside a chunk: only the chunk holding the new end
    os.truncate(local.path, 20 * MiB + 100 * KiB)
    st = local.send()
    assert st["incremental"] and st["chunks_read"] == 1 and st["chunks_scanned"] == 81
    local.check(tmp_path)

    # extended: the old end chunk is read; the new tail is a hole
    os.truncate(local.path, 30 * MiB)
    st = local.send()
    assert st["incremental"] and st["chunks_read"] == 1 and st["chunks_scanned"] == 120
    local.check(tmp_path)

    # data written past the old end, and a write near the start
    os.truncate(local.path, 30 * MiB + 5000)
    chunks = local.write((30 * MiB, 5000), (MiB, 10))
    st = local.send()
    assert st["incremental"] and st["chunks_read"] == len(chunks) == 2
    local.check(tmp_path)
    sessions = local.wyng.sessions(NAME)
    local.check(tmp_path, sessions[-1])
    assert len(sessions) == 6 and len(local.snapshots()) == 1


def test_unchanged_volume_costs_no_reads_and_send_unchanged_records_it(local, tmp_path):
    local.make(8 * MiB)
    local.send()
    st = local.send()
    assert st["incremental"] and st["chunks_read"] == 0 and st["session"] is None
    st = local.send("--send-unchanged")
    assert st["chunks_read"] == 0 and st["session"] and st["chunks_changed"] == 0
    assert len(local.wyng.sessions(NAME)) == 2
    local.check(tmp_path)


def test_monitor_folds_changes_so_the_next_send_reads_them_all(local, wyng, tmp_path):
    local.make(16 * MiB)
    local.send()
    before = local.snapshots()
    a = local.write((MiB, 4 * KiB), (7 * MiB + 1, 300 * KiB))
    out = wyng.run("monitor", "--local=%s" % local.pool, "--all").stdout
    assert out == "%s: %d chunks changed since the last send\n" % (NAME, len(a))
    assert len(local.snapshots()) == 1 and local.snapshots() != before
    wyng.run("monitor", "--local=%s" % local.pool, NAME)   # nothing new: the map is kept
    b = local.write((12 * MiB, 10), (MiB + 8 * KiB, 10))
    os.truncate(local.path, 10 * MiB + 3 * KiB)            # shrinks away one of a's chunks
    out = wyng.run("monitor", "--local=%s" % local.pool, NAME).stdout
    expect = {i for i in a | b if i < 41} | {40}
    assert out == "%s: %d chunks changed since the last send\n" % (NAME, len(expect))
    os.truncate(local.path, 12 * MiB)
    st = local.send()
    assert st["incremental"] and st["chunks_read"] == len(expect) and st["chunks_scanned"] == 48
    local.check(tmp_path)
    assert local.send()["chunks_read"] == 0   # the map was used up by that send


def test_pruning_the_session_under_the_newest_keeps_the_next_send_incremental(local, wyng, tmp_path):
    local.make(16 * MiB)
    local.send()
    local.write((MiB, 10))
    local.send()
    local.write((3 * MiB, 10))
    local.send()
    a = local.write((5 * MiB, 10), (9 * MiB, 10))
    wyng.run("monitor", "--local=%s" % local.pool, NAME)
    # the newest manifest is rewritten with its parent's changes folded in
    wyng.run("prune", NAME, "--session=" + local.wyng.sessions(NAME)[1])
    b = local.write((12 * MiB, 10))
    st = local.send()
    assert st["incremental"] and st["chunks_read"] == len(a | b) == 3
    local.check(tmp_path)


def test_a_missing_altered_or_foreign_snapshot_means_a_full_read(local, wyng, tmp_path):
    local.make(8 * MiB)
    local.send()
    local.write((0, 10))
    # another dom0 (other metadata) sent meanwhile: the head is not our record's
    wyng.run("send", "--local=%s" % local.pool, NAME, "--meta-dir=%s" % (tmp_path / "meta2"))
    local.write((MiB, 10))
    st = local.send()
    assert not st["incremental"] and st["chunks_read"] == 32
    local.check(tmp_path)
    # a snapshot someone wrote to (mode and contents put back) is not trusted
    snap = local.path.parent / local.snapshots()[0]
    os.chmod(snap, 0o600)
    data = snap.read_bytes()
    snap.write_bytes(data)
    os.chmod(snap, 0o400)
    local.write((2 * MiB, 10))
    st = local.send()
    assert not st["incremental"] and st["chunks_read"] == 32
    local.check(tmp_path)
    # gone
    os.unlink(local.path.parent / local.snapshots()[0])
    local.write((3 * MiB, 10))
    st = local.send()
    assert not st["incremental"] and st["chunks_read"] == 32
    local.check(tmp_path)
    assert local.send()["incremental"]


def test_two_archives_keep_their_own_snapshots(local, wyng, tmp_path):
    from conftest import Wyng
    other = Wyng(tmp_path / "second")
    (tmp_path / "second").mkdir()
    other.init()
    local.make(8 * MiB)
    local.send()
    other.run("send", "--local=%s" % local.pool, NAME)
    assert len(local.snapshots()) == 2
    chunks = local.write((5 * MiB, 10))
    assert local.send()["chunks_read"] == len(chunks)
    local.write((6 * MiB, 10))
    out = json.loads(other.run("send", "--local=%s" % local.pool, NAME, "--json").stdout)["volumes"][0]
    assert out["incremental"] and out["chunks_read"] == 2
    other.run("receive", NAME, "--save-to=%s" % (tmp_path / "o"))
    assert same(tmp_path / "o", local.path)
    # delete --clean for one archive leaves the other's snapshot and records
    wyng.run("delete", "--clean", "--local=%s" % local.pool)
    assert len(local.snapshots()) == 1
    (folder,) = [f for f in os.listdir(wyng.meta) if f != "destinations"]
    assert not (wyng.meta / folder / "snapshots").exists()
    assert (wyng.meta / folder / "root-seen").exists()
    assert not local.send()["incremental"]
    local.check(tmp_path)
    # --all: every archive this metadata folder knows, and all found under --local
    wyng.run("delete", "--clean", "--all", "--local=%s" % local.pool)
    assert local.snapshots() == []


@pytest.mark.parametrize("label,committed", [
    ("cow-after-snapshot", False), ("cow-before-commit", False),
    ("cow-after-commit", True), ("cow-after-record", True)])
def test_a_send_killed_anywhere_leaves_a_correct_next_incremental(local, tmp_path, label, committed):
    local.make(12 * MiB)
    local.send()
    a = local.write((MiB, 10), (5 * MiB, 300 * KiB))
    killed = local.send(expect=None, env={"QVM_WYNG_TEST_CRASH": label})
    assert killed.returncode == -9, killed.stderr
    b = local.write((9 * MiB, 10), (MiB + 1, 10))
    st = local.send()
    assert st["incremental"]
    # a commit that landed made the new snapshot current: only b is read
    assert st["chunks_read"] == len(b if committed else a | b)
    local.check(tmp_path)
    assert len(local.snapshots()) == 1
    sessions = local.wyng.sessions(NAME)
    assert len(sessions) == (3 if committed else 2)
    if committed:  # the killed send's session is whole too
        out = tmp_path / "killed"
        local.wyng.run("receive", NAME, "--save-to=%s" % out, "--session=" + sessions[1])
        assert out.stat().st_size == 12 * MiB


@pytest.mark.parametrize("label", ["cow-after-snapshot", "cow-after-record"])
def test_a_monitor_killed_anywhere_loses_no_change(local, wyng, tmp_path, label):
    local.make(12 * MiB)
    local.send()
    a = local.write((MiB, 10))
    done = wyng.run("monitor", "--local=%s" % local.pool, "--all", expect=None, env={"QVM_WYNG_TEST_CRASH": label})
    assert done.returncode == -9
    b = local.write((9 * MiB, 10))
    st = local.send()
    assert st["incremental"] and st["chunks_read"] == len(a | b)
    local.check(tmp_path)
    assert len(local.snapshots()) == 1


def test_receive_local_makes_a_new_file_or_replaces_one_only_when_asked(local, wyng, tmp_path):
    local.make(5 * MiB + 4 * KiB, [(0, MiB), (4 * MiB, 0)])
    local.send()
    other = Local(wyng, local.pool / "elsewhere")
    wyng.run("receive", NAME, "--local=%s" % other.pool)
    assert same(other.path, local.path)
    inode = os.stat(other.path).st_ino
    other.write((0, 100))
    done = wyng.run("receive", NAME, "--local=%s" % other.pool, expect=1)
    assert "exists: give --overwrite" in done.stderr
    wyng.run("receive", NAME, "--local=%s" % other.pool, "--overwrite")
    assert same(other.path, local.path) and os.stat(other.path).st_ino != inode
    assert sorted(os.listdir(other.path.parent)) == ["private.img"]   # no temporary file left


def test_diff_reports_differing_chunks_and_exits_3(local, wyng, tmp_path):
    local.make(8 * MiB)
    local.send()
    done = wyng.run("diff", "--local=%s" % local.pool, NAME)
    assert "same as session" in done.stdout
    local.write((0, 10), (7 * MiB, 1))
    done = wyng.run("diff", "--local=%s" % local.pool, NAME, expect=2)
    assert "differs from session" in done.stdout and "in 2 of 32 chunks" in done.stdout
    os.truncate(local.path, 9 * MiB)
    st = json.loads(wyng.run("diff", "--local=%s" % local.pool, NAME, "--json", expect=2).stdout)["volumes"][0]
    assert (st["chunks_differ"], st["size"], st["archived_size"], st["same"]) == (6, 9 * MiB, 8 * MiB, False)


def test_several_volumes_in_one_send_and_a_no_cow_file(btrfs_mount, wyng, tmp_path):
    need(which("chattr"), "chattr (e2fsprogs)")
    wyng.init()
    a = Local(wyng, btrfs_mount, "a.img").make(4 * MiB)
    nocow = Local(wyng, btrfs_mount, "nocow.img")
    nocow.path.touch()
    subprocess.run(["chattr", "+C", str(nocow.path)], check=True)
    nocow.make(4 * MiB, seed=2)
    done = wyng.run("send", "--local=%s" % btrfs_mount, "a.img", "nocow.img", "--json")
    assert "No_COW" in done.stderr
    a.write((0, 10))
    nocow.write((0, 10))
    vols = json.loads(wyng.run("send", "--local=%s" % btrfs_mount, "a.img", "nocow.img", "--json").stdout)["volumes"]
    assert [(v["incremental"], v["chunks_read"]) for v in vols] == [(True, 1), (False, 16)]
    for v in (a, nocow):
        wyng.run("receive", v.name, "--save-to=%s" % (tmp_path / v.name))  # a new file each: no --force
        assert same(tmp_path / v.name, v.path)
    aid = next(wyng.meta.glob("*/root-seen")).parent.name
    records = wyng.meta / aid / "snapshots"
    (vid,) = [f[:-5] for f in os.listdir(records) if f.endswith(".json")
              and json.loads((records / f).read_text())["name"] == "a.img"]
    assert a.snapshots() == [".a.img.qwyng-%s.%s.tock" % (aid[:16], vid[:8])]  # archive and volume id


def test_bad_local_pools_and_volumes_fail_cleanly(wyng, ext4_mount, tmp_path):
    wyng.init()
    Local(wyng, ext4_mount, "v.img").make(MiB)
    # a filesystem without reflinks: read in full, like a No_COW file
    done = wyng.run("send", "--local=%s" % ext4_mount, "v.img")
    assert "does not support reflinks; reading all of it" in done.stderr
    for args, message in [
            (["--local=%s" % ext4_mount, "missing.img"], "No such file"),
            (["--local=%s" % (tmp_path / "nowhere"), "v.img"], "no such directory"),
            (["--local=relative/dir/x", "v.img"], "absolute directory"),
            (["--local=%s" % ext4_mount, "../v.img"], "not a valid volume name")]:
        done = wyng.run("send", *args, expect=1)
        assert message in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert [p.name for p in ext4_mount.iterdir() if p.name.startswith(".")] == []
    wyng.run("monitor", "--local=%s" % ext4_mount, expect=1)
    wyng.run("delete", "--clean", "--local=%s" % ext4_mount, "--dest=", expect=1)
