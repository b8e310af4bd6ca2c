"""Reflink change detection (sources/reflink.py) on real Btrfs and XFS.

The story every filesystem test tells: a volume is written, snapshotted
with a reflink, written to in place, snapshotted again; comparing the two
snapshots' extent maps must name exactly the chunks that were written, and
every byte outside the reported ranges must really be equal.
"""
import os
import random
import subprocess

import pytest

from conftest import need, which
from images import pwrite_pieces
from qubeswyng.errors import Fail
from qubeswyng.sources.reflink import (
    BATCH, EXTENT_DATA_INLINE, EXTENT_DATA_TAIL, EXTENT_DELALLOC, EXTENT_ENCODED, EXTENT_LAST,
    EXTENT_NOT_ALIGNED, EXTENT_UNKNOWN, EXTENT_UNWRITTEN, changed_ranges, clone,
    extent_map, is_nodatacow)

KiB, MiB = 1 << 10, 1 << 20
SHARED, MERGED = 0x2000, 0x1000
VOLUME = 64 * MiB
BLOCK = 4 * KiB


# -- changed_ranges on hand-built maps -----------------------------------------

def test_split_extents_compare_by_mapping_not_by_extent_list():
    # The clone still has one extent; the volume was split around two writes.
    p = 1 << 30
    a, b = 10 * MiB, 40 * MiB
    old = [(0, p, VOLUME, SHARED | EXTENT_LAST)]
    new = [(0, p, a, SHARED),
           (a, 7 * p, 64 * KiB, 0),
           (a + 64 * KiB, p + a + 64 * KiB, b - a - 64 * KiB, SHARED),
           (b, 7 * p + 64 * KiB, 64 * KiB, 0),
           (b + 64 * KiB, p + b + 64 * KiB, VOLUME - b - 64 * KiB, SHARED | EXTENT_LAST)]
    assert changed_ranges(old, new, VOLUME, VOLUME) == [(a, a + 64 * KiB), (b, b + 64 * KiB)]
    assert changed_ranges(new, old, VOLUME, VOLUME) == [(a, a + 64 * KiB), (b, b + 64 * KiB)]


def test_same_bytes_at_another_physical_offset_are_changed():
    old = [(0, 1000 * BLOCK, 8 * BLOCK, 0)]
    new = [(0, 1000 * BLOCK, 4 * BLOCK, 0), (4 * BLOCK, 1001 * BLOCK, 4 * BLOCK, 0)]
    assert changed_ranges(old, new, 8 * BLOCK, 8 * BLOCK) == [(4 * BLOCK, 8 * BLOCK)]


def test_hole_in_both_is_unchanged_and_hole_in_one_is_changed():
    old = [(0, MiB, BLOCK, 0), (4 * BLOCK, 2 * MiB, BLOCK, 0)]
    new = [(0, MiB, BLOCK, 0), (2 * BLOCK, 3 * MiB, BLOCK, 0)]
    # block 1 and 3: holes in both; block 2: data only in new; block 4: only in old
    assert changed_ranges(old, new, 6 * BLOCK, 6 * BLOCK) == [(2 * BLOCK, 3 * BLOCK), (4 * BLOCK, 5 * BLOCK)]
    assert changed_ranges([], [], 6 * BLOCK, 6 * BLOCK) == []
    assert changed_ranges([], new, 6 * BLOCK, 6 * BLOCK) == [(0, BLOCK), (2 * BLOCK, 3 * BLOCK)]


@pytest.mark.parametrize("flag", [EXTENT_UNKNOWN, EXTENT_DELALLOC | EXTENT_UNKNOWN, EXTENT_ENCODED,
                                  EXTENT_DATA_INLINE | EXTENT_NOT_ALIGNED, EXTENT_DATA_TAIL])
def test_extents_without_a_trustworthy_address_are_always_changed(flag):
    same = [(0, MiB, 4 * BLOCK, 0)]
    odd = [(0, MiB, 2 * BLOCK, 0), (2 * BLOCK, MiB + 2 * BLOCK, 2 * BLOCK, flag)]
    assert changed_ranges(odd, odd, 4 * BLOCK, 4 * BLOCK) == [(2 * BLOCK, 4 * BLOCK)]
    assert changed_ranges(same, odd, 4 * BLOCK, 4 * BLOCK) == [(2 * BLOCK, 4 * BLOCK)]


def test_unwritten_and_written_at_one_address_differ_but_bookkeeping_flags_do_not():
    written = [(0, MiB, 4 * BLOCK, 0)]
    unwritten = [(0, MiB, 4 * BLOCK, EXTENT_UNWRITTEN)]
    flagged = [(0, MiB, 2 * BLOCK, SHARED | MERGED), (2 * BLOCK, MiB + 2 * BLOCK, 2 * BLOCK, EXTENT_LAST)]
    assert changed_ranges(written, unwritten, 4 * BLOCK, 4 * BLOCK) == [(0, 4 * BLOCK)]
    assert changed_ranges(unwritten, unwritten, 4 * BLOCK, 4 * BLOCK) == []
    assert changed_ranges(written, flagged, 4 * BLOCK, 4 * BLOCK) == []


def test_growth_is_changed_and_shrinking_only_cuts_the_comparison():
    m = [(0, MiB, 8 * BLOCK, 0)]
    assert changed_ranges(m, m, 8 * BLOCK, 10 * BLOCK) == [(8 * BLOCK, 10 * BLOCK)]
    assert changed_ranges(m, m, 8 * BLOCK, 5 * BLOCK) == []
    grown = m + [(8 * BLOCK, 5 * MiB, 2 * BLOCK, 0)]
    assert changed_ranges(m, grown, 8 * BLOCK, 10 * BLOCK) == [(8 * BLOCK, 10 * BLOCK)]
    # a change just before the old end merges with the growth
    moved = [(0, MiB, 7 * BLOCK, 0), (7 * BLOCK, 6 * MiB, 3 * BLOCK, 0)]
    assert changed_ranges(m, moved, 8 * BLOCK, 10 * BLOCK) == [(7 * BLOCK, 10 * BLOCK)]


def test_extents_past_the_end_of_file_are_ignored():
    old = [(0, MiB, 4 * BLOCK, 0)]
    new = [(0, MiB, 4 * BLOCK, 0), (4 * BLOCK, 9 * MiB, 4 * BLOCK, EXTENT_UNWRITTEN)]
    assert changed_ranges(old, new, 4 * BLOCK, 4 * BLOCK) == []
    assert changed_ranges(old, new, 3 * BLOCK + 5, 3 * BLOCK + 5) == []


def test_maps_in_any_order_and_overlapping_extents_are_tolerated():
    old = [(4 * BLOCK, MiB + 4 * BLOCK, 4 * BLOCK, 0), (0, MiB, 6 * BLOCK, 0)]
    new = [(0, MiB, 8 * BLOCK, 0)]
    assert changed_ranges(old, new, 8 * BLOCK, 8 * BLOCK) == []


def chunks_of(ranges, chunk_size):
    """Sorted indexes of the chunks that any byte of ``ranges`` falls in (the
    chunk runs send reads, sources/reflink.py Volume.delta, as indexes)."""
    chunks = []
    for start, end in sorted(ranges):
        if end <= start:
            continue
        first = start // chunk_size
        if chunks and chunks[-1] >= first:
            first = chunks[-1] + 1
        chunks.extend(range(first, (end - 1) // chunk_size + 1))
    return chunks


# -- real filesystems ------------------------------------------------------------

@pytest.fixture(params=["btrfs", "xfs"])
def fs(request):
    """Each reflink filesystem in turn, freshly made and mounted."""
    return request.getfixturevalue(request.param + "_mount")


def make_volume(path, size=VOLUME, seed=1):
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(rnd.randbytes(MiB))
        f.write(rnd.randbytes(size % MiB))
        f.flush()
        os.fsync(f.fileno())
    return path


def extent_map_of(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        return extent_map(fd)
    finally:
        os.close(fd)


class Snap:
    """A reflink snapshot of a file and its extent map."""

    def __init__(self, src, path):
        clone(src, path)
        self.path, self.map, self.size = path, extent_map_of(path), os.stat(path).st_size


def detect(old, new):
    """Changed ranges between two snapshots, checked for soundness: every
    byte of the new snapshot outside them equals the old snapshot's."""
    ranges = changed_ranges(old.map, new.map, old.size, new.size)
    assert ranges == sorted(ranges)
    assert all(a < b <= c for (a, b), (c, _d) in zip(ranges, ranges[1:] + [(new.size, 0)]))
    with open(old.path, "rb") as fo, open(new.path, "rb") as fn:
        pos = 0
        for start, end in ranges + [(new.size, new.size)]:
            while pos < start:
                n = min(4 * MiB, start - pos)
                fo.seek(pos)
                fn.seek(pos)
                assert fo.read(n) == fn.read(n), "unreported change near byte %d" % pos
                pos += n
            pos = end
    return ranges


def chunks_written(writes, chunk_size):
    return sorted({i for offset, length in writes
                   for i in range(offset // chunk_size, (offset + length - 1) // chunk_size + 1)})


def test_clone_is_a_read_only_copy_sharing_the_blocks(fs):
    live = make_volume(fs / "vol.img", 8 * MiB)
    snap = Snap(live, fs / "snap")
    assert snap.path.read_bytes() == live.read_bytes()
    assert os.stat(snap.path).st_mode & 0o777 == 0o400
    assert changed_ranges(extent_map_of(live), snap.map, snap.size, snap.size) == []


def test_unchanged_volume_reports_no_changes(fs):
    live = make_volume(fs / "vol.img")
    first = Snap(live, fs / "s1")
    second = Snap(live, fs / "s2")
    assert detect(first, second) == []


@pytest.mark.parametrize("chunk_size", [64 * KiB, 256 * KiB])
def test_scattered_writes_report_exactly_the_chunks_written(fs, chunk_size):
    live = make_volume(fs / "vol.img")
    old = Snap(live, fs / "s1")
    writes = [(o * 64 * KiB, 64 * KiB) for o in (0, 3, 160, 641, 1023)]        # aligned
    writes += [(o, 4 * KiB) for o in (5 * MiB + 100, 256 * KiB - 100,         # unaligned, one
                                     20 * MiB + 64 * KiB - 2048, 33 * MiB + 1)]  # crossing chunks
    pwrite_pieces(live, writes)
    new = Snap(live, fs / "s2")
    assert chunks_of(detect(old, new), chunk_size) == chunks_written(writes, chunk_size)


def test_changes_add_up_over_several_snapshots(fs):
    live = make_volume(fs / "vol.img")
    first = Snap(live, fs / "s1")
    a = [(3 * MiB, 64 * KiB), (40 * MiB + 512, 8 * KiB)]
    pwrite_pieces(live, a)
    second = Snap(live, fs / "s2")
    b = [(3 * MiB + 32 * KiB, 64 * KiB), (60 * MiB, 4 * KiB)]
    pwrite_pieces(live, b)
    third = Snap(live, fs / "s3")
    assert chunks_of(detect(second, third), 64 * KiB) == chunks_written(b, 64 * KiB)
    assert chunks_of(detect(first, third), 64 * KiB) == chunks_written(a + b, 64 * KiB)
    os.unlink(first.path)  # the sharing flags change; the answer must not
    second.map = extent_map_of(second.path)
    assert chunks_of(detect(second, third), 64 * KiB) == chunks_written(b, 64 * KiB)


def test_rewriting_identical_bytes_is_reported_as_changed(fs):
    live = make_volume(fs / "vol.img")
    old = Snap(live, fs / "s1")
    offset = 7 * MiB
    with open(live, "rb") as f:
        f.seek(offset)
        same = f.read(128 * KiB)
    pwrite_pieces(live, [(offset, len(same))], data=same)
    new = Snap(live, fs / "s2")
    assert new.path.read_bytes() == old.path.read_bytes()
    # the bytes are new blocks: reported, a harmless superset of "nothing"
    assert chunks_of(detect(old, new), 64 * KiB) == chunks_written([(offset, len(same))], 64 * KiB)


def test_shrinking_reports_nothing_inside_the_new_size(fs):
    live = make_volume(fs / "vol.img")
    old = Snap(live, fs / "s1")
    os.truncate(live, 40 * MiB)
    assert detect(old, Snap(live, fs / "s2")) == []
    # an unaligned end zeroes the rest of its block: at most that block shows
    os.truncate(live, 20 * MiB + 1000)
    ranges = detect(old, Snap(live, fs / "s3"))
    assert all(20 * MiB <= a < b <= 20 * MiB + 1000 for a, b in ranges)


def test_growing_reports_the_new_tail(fs):
    live = make_volume(fs / "vol.img")
    old = Snap(live, fs / "s1")
    os.truncate(live, VOLUME + 16 * MiB)
    assert detect(old, Snap(live, fs / "s2")) == [(VOLUME, VOLUME + 16 * MiB)]
    pwrite_pieces(live, [(VOLUME + 16 * MiB, 3 * MiB + 5)])
    assert detect(old, Snap(live, fs / "s3")) == [(VOLUME, VOLUME + 19 * MiB + 5)]


@pytest.mark.parametrize("how", ["-p", "-z"])  # punch a hole; zero as unwritten extents
def test_punched_or_zeroed_ranges_are_reported(fs, how):
    need(which("fallocate"), "fallocate (util-linux)")
    live = make_volume(fs / "vol.img")
    old = Snap(live, fs / "s1")
    ranges = [(8 * MiB, MiB), (30 * MiB + 1000, 200 * KiB)]  # aligned, unaligned
    for offset, length in ranges:
        subprocess.run(["fallocate", how, "-o", str(offset), "-l", str(length), str(live)], check=True)
    new = Snap(live, fs / "s2")
    changed = detect(old, new)
    assert changed[0] == (8 * MiB, 9 * MiB)
    assert chunks_of(changed, 64 * KiB) == chunks_written(ranges, 64 * KiB)
    assert new.path.read_bytes()[8 * MiB:9 * MiB] == bytes(MiB)


def test_thousands_of_extents_are_all_read(fs):
    live = make_volume(fs / "vol.img")
    old = Snap(live, fs / "s1")
    rnd = random.Random(7)
    writes = [(block * 4 * BLOCK + rnd.randrange(4) * BLOCK, BLOCK)
              for block in rnd.sample(range(VOLUME // (4 * BLOCK)), 3000)]
    pwrite_pieces(live, writes)
    new = Snap(live, fs / "s2")
    assert len(new.map) > 4 * BATCH
    pos = 0
    for logical, _physical, length, _flags in new.map:  # one whole, ordered map
        assert logical == pos
        pos += length
    assert pos == VOLUME
    for chunk_size in (64 * KiB, 256 * KiB):
        assert chunks_of(detect(old, new), chunk_size) == chunks_written(writes, chunk_size)


def test_sparse_file_maps_only_its_data(fs):
    path = fs / "sparse.img"
    with open(path, "wb") as f:
        f.truncate(VOLUME)
    pwrite_pieces(path, [(5 * MiB, 64 * KiB), (50 * MiB, 128 * KiB)])
    assert [(lo, ln) for lo, _p, ln, _f in extent_map_of(path)] == [(5 * MiB, 64 * KiB), (50 * MiB, 128 * KiB)]


def test_no_cow_files_are_recognised(btrfs_mount, xfs_mount):
    need(which("chattr"), "chattr (e2fsprogs)")
    nocow = btrfs_mount / "nocow.img"
    nocow.touch()
    subprocess.run(["chattr", "+C", str(nocow)], check=True)
    plain = make_volume(btrfs_mount / "plain.img", MiB)
    for path, expect in ((nocow, True), (plain, False), (make_volume(xfs_mount / "x.img", MiB), False)):
        fd = os.open(path, os.O_RDONLY)
        try:
            assert is_nodatacow(fd) is expect, path
        finally:
            os.close(fd)
    # Btrfs will not clone between No_COW and ordinary files
    pwrite_pieces(nocow, [(0, MiB)])
    with pytest.raises(Fail, match="No_COW"):
        clone(nocow, btrfs_mount / "snap")
    assert not (btrfs_mount / "snap").exists()


@pytest.mark.parametrize("where", ["tmpfs", "ext4"])
def test_clone_fails_cleanly_without_reflink_support(request, where):
    if where == "tmpfs":
        place = request.getfixturevalue("tmpfs")("64M")
    else:
        place = request.getfixturevalue("ext4_mount")
    live = make_volume(place / "vol.img", MiB)
    with pytest.raises(Fail) as e:
        clone(live, place / "snap")
    assert "filesystem does not support reflinks" in str(e.value)
    assert "\n" not in str(e.value)
    assert not (place / "snap").exists()


def test_clone_refuses_other_filesystems_and_existing_or_missing_files(btrfs_mount, xfs_mount):
    live = make_volume(btrfs_mount / "vol.img", MiB)
    with pytest.raises(Fail, match="not on the same filesystem"):
        clone(live, xfs_mount / "snap")
    assert not (xfs_mount / "snap").exists()
    (btrfs_mount / "taken").write_bytes(b"keep")
    with pytest.raises(Fail, match="exists"):
        clone(live, btrfs_mount / "taken")
    assert (btrfs_mount / "taken").read_bytes() == b"keep"
    with pytest.raises(Fail, match="No such file"):
        clone(btrfs_mount / "missing", btrfs_mount / "snap")
    assert not (btrfs_mount / "snap").exists()


def test_unflushed_writes_are_mapped_at_their_final_place(fs):
    path = fs / "fresh.img"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, os.urandom(4 * MiB), 0)  # still in the page cache
        extents = extent_map(fd)
    finally:
        os.close(fd)
    assert extents and not any(flags & (EXTENT_DELALLOC | EXTENT_UNKNOWN) for *_x, flags in extents)
