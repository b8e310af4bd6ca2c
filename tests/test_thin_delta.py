"""The thin_delta parser, on real pool metadata written by thin_restore and
read by the real thin_delta, checked against a per-block model."""
import random
import subprocess

import pytest

from qubeswyng.errors import Fail
from qubeswyng.sources.thin_delta import changed_chunks, run_thin_delta

KiB = 1024
OLD, NEW = 1, 2


def model(old, new, block_bytes, chunk_size, volume_size=None):
    """The chunks a backup must read: every byte of every block whose
    mapping differs between the two devices, cut into chunks."""
    chunks = set()
    for block in old.keys() | new.keys():
        if old.get(block) != new.get(block):
            first_byte, last_byte = block * block_bytes, (block + 1) * block_bytes - 1
            chunks.update(range(first_byte // chunk_size, last_byte // chunk_size + 1))
    if volume_size is not None:
        chunks = {c for c in chunks if c * chunk_size < volume_size}
    return sorted(chunks)


def well_formed(runs):
    assert all(isinstance(r, range) and r.step == 1 and len(r) for r in runs)
    assert all(a.stop < b.start for a, b in zip(runs, runs[1:])), runs
    return [i for run in runs for i in run]


def delta(meta, chunk_size, volume_size=None, verbose=False):
    """Chunks from run_thin_delta; also parse the --verbose form and check
    that both forms agree."""
    runs = run_thin_delta(meta, OLD, NEW, chunk_size, volume_size, metadata_snap=False)
    out = subprocess.run(["thin_delta", "--verbose", "--snap1", str(OLD), "--snap2", str(NEW), str(meta)],
                         capture_output=True, check=True).stdout
    assert b"<range " in out
    assert changed_chunks(out, chunk_size, volume_size) == runs
    return well_formed(runs)


def thin_delta_xml(meta, old=OLD, new=NEW):
    return subprocess.run(["thin_delta", "--snap1", str(old), "--snap2", str(new), str(meta)],
                          capture_output=True, check=True).stdout


def snapshot_with_every_kind():
    """An origin of 64 blocks with a hole at 40..59, and a later snapshot
    where blocks were rewritten, discarded and newly written."""
    old = {b: b for b in range(40)}
    old.update({b: 100 + b for b in range(60, 64)})
    new = dict(old)
    new.update({b: 200 + b for b in range(3, 7)})        # different, 4 blocks
    new[10] = 300                                         # different, 1 block
    for b in (20, 21, 22, 23, 39):                        # left_only (discarded)
        del new[b]
    new.update({b: 400 + b for b in (45, 46, 47, 70)})    # right_only, also past the old end
    return old, new


# block < chunk, block = chunk, block > chunk, and 96 KiB blocks that
# line up with no chunk size
@pytest.mark.parametrize("block_sectors", [128, 192, 1024, 2048])
@pytest.mark.parametrize("chunk_size", [64 * KiB, 256 * KiB, 1024 * KiB])
def test_changed_chunks_match_the_block_mappings(thin_pool_metadata, block_sectors, chunk_size):
    old, new = snapshot_with_every_kind()
    meta = thin_pool_metadata({OLD: old, NEW: new}, block_sectors)
    out = thin_delta_xml(meta)
    for kind in (b"<same ", b"<different ", b"<left_only ", b"<right_only "):
        assert kind in out
    got = delta(meta, chunk_size)
    assert got == model(old, new, block_sectors * 512, chunk_size)
    assert got


def test_thin_delta_prints_same_ranges_without_verbose(thin_pool_metadata):
    old = {b: b for b in range(8)}
    meta = thin_pool_metadata({OLD: old, NEW: {**old, 3: 50}})
    out = thin_delta_xml(meta).decode()
    assert '<same begin="0" length="3"/>' in out
    assert '<different begin="3" length="1"/>' in out
    assert '<same begin="4" length="4"/>' in out
    assert delta(meta, 64 * KiB) == [3]


@pytest.mark.parametrize("block_sectors,chunk_size", [(128, 64 * KiB), (192, 256 * KiB), (1024, 64 * KiB)])
def test_shrunk_volume_drops_chunks_past_its_end(thin_pool_metadata, block_sectors, chunk_size):
    block = block_sectors * 512
    old = {b: b for b in range(64)}
    new = {b: b for b in range(32)}       # the tail was cut off: left_only
    new[5] = 100
    meta = thin_pool_metadata({OLD: old, NEW: new}, block_sectors)
    size = 32 * block - 4096              # not on a block or chunk boundary
    got = delta(meta, chunk_size, size)
    assert got == model(old, new, block, chunk_size, size)
    assert got and max(got) * chunk_size < size
    # without the size, the discarded tail counts as changed
    assert delta(meta, chunk_size) == model(old, new, block, chunk_size)


@pytest.mark.parametrize("block_sectors,chunk_size", [(128, 256 * KiB), (192, 64 * KiB), (2048, 256 * KiB)])
def test_grown_volume_reads_its_new_end(thin_pool_metadata, block_sectors, chunk_size):
    block = block_sectors * 512
    old = {b: b for b in range(32)}
    new = dict(old)
    new.update({b: 100 + b for b in range(32, 48)})   # right_only, past the old end
    meta = thin_pool_metadata({OLD: old, NEW: new}, block_sectors)
    size = 48 * block
    got = delta(meta, chunk_size, size)
    assert got == model(old, new, block, chunk_size, size)
    assert got[0] == 32 * block // chunk_size and got[-1] == -(-size // chunk_size) - 1
    # a size that ends inside the new blocks cuts the list there
    assert delta(meta, chunk_size, 40 * block) == model(old, new, block, chunk_size, 40 * block)


def test_identical_devices_have_no_changes(thin_pool_metadata):
    old = {b: b for b in range(0, 100, 3)}
    meta = thin_pool_metadata({OLD: old, NEW: dict(old)})
    assert b"<same " in thin_delta_xml(meta)
    assert delta(meta, 64 * KiB) == []


def test_empty_devices(thin_pool_metadata):
    mapped = {b: b for b in range(10, 20)}
    block = 128 * 512
    meta = thin_pool_metadata({OLD: {}, NEW: mapped, 3: {}})
    assert delta(meta, 64 * KiB) == model({}, mapped, block, 64 * KiB) == list(range(10, 20))
    assert well_formed(run_thin_delta(meta, NEW, OLD, 256 * KiB, metadata_snap=False)) == [2, 3, 4]
    assert run_thin_delta(meta, OLD, 3, 64 * KiB, metadata_snap=False) == []


@pytest.mark.parametrize("seed", range(6))
def test_random_snapshots_match_the_model(thin_pool_metadata, seed):
    rnd = random.Random(seed)
    block_sectors = rnd.choice([128, 192, 384, 1024, 2048])
    chunk_size = rnd.choice([64, 128, 256, 512, 1024, 4096]) * KiB
    blocks = rnd.randrange(50, 400)
    old = {b: b for b in range(blocks) if rnd.random() < 0.7}
    new, fresh = dict(old), blocks
    for _ in range(rnd.randrange(1, 40)):
        start, length = rnd.randrange(blocks + 20), rnd.randrange(1, 12)
        action = rnd.choice(["write", "discard"])
        for b in range(start, start + length):
            if action == "write":
                new[b], fresh = fresh, fresh + 1
            else:
                new.pop(b, None)
    meta = thin_pool_metadata({OLD: old, NEW: new}, block_sectors)
    size = rnd.randrange(1, blocks + 30) * block_sectors * 512 - rnd.randrange(0, 4096)
    for volume_size in (None, size):
        assert delta(meta, chunk_size, volume_size) == model(old, new, block_sectors * 512, chunk_size, volume_size)


# run_thin_delta's failures are one line, with thin_delta's own reason

def test_unknown_thin_id_fails_with_thin_deltas_reason(thin_pool_metadata):
    meta = thin_pool_metadata({OLD: {0: 0}, NEW: {0: 0}})
    with pytest.raises(Fail) as e:
        run_thin_delta(meta, OLD, 9, 64 * KiB, metadata_snap=False)
    assert "\n" not in str(e.value)
    assert "snap2 (9)" in str(e.value) and "exit 1" in str(e.value)


def test_missing_metadata_snapshot_fails(thin_pool_metadata):
    meta = thin_pool_metadata({OLD: {0: 0}, NEW: {0: 1}})
    with pytest.raises(Fail, match="no current metadata snap"):
        run_thin_delta(meta, OLD, NEW, 64 * KiB)


def test_missing_metadata_device_fails(tmp_path):
    with pytest.raises(Fail) as e:
        run_thin_delta(tmp_path / "nothing", OLD, NEW, 64 * KiB, metadata_snap=False)
    assert "\n" not in str(e.value)


def test_bad_thin_id_is_refused():
    with pytest.raises(Fail, match="not a thin device id"):
        run_thin_delta("/dev/null", "1; rm -rf /", NEW, 64 * KiB)


# the parser on its own: bytes or streams, and output it must refuse

HEAD = b'<superblock uuid="" time="1" transaction="1" data_block_size="128" nr_data_blocks="9">'


def parse(body, chunk_size=64 * KiB, volume_size=None, head=HEAD):
    return changed_chunks(head + b'<diff left="1" right="2">' + body + b"</diff></superblock>",
                          chunk_size, volume_size)


def test_out_of_order_and_overlapping_ranges_are_merged():
    body = (b'<right_only begin="20" length="2"/><different begin="3" length="1"/>'
            b'<left_only begin="4" length="0"/><different begin="21" length="5"/><same begin="0" length="3"/>'
            b'<left_only begin="4" length="1"/>')
    assert parse(body) == [range(3, 5), range(20, 26)]
    assert parse(body, 256 * KiB) == [range(0, 2), range(5, 7)]


def test_a_stream_is_read_like_bytes(tmp_path):
    path = tmp_path / "delta.xml"
    path.write_bytes(HEAD + b'<diff left="1" right="2"><different begin="7" length="2"/></diff></superblock>')
    with open(path, "rb") as f:
        assert changed_chunks(f, 32 * KiB) == [range(14, 18)]


@pytest.mark.parametrize("xml,message", [
    (b"", "not valid XML"),
    (HEAD + b'<diff left="1" right="2"><different begin="7" length="2"/>', "not valid XML"),
    (b'<superblock><diff/></superblock>', "data_block_size"),
    (b'<superblock data_block_size="0"><diff/></superblock>', "data_block_size is 0"),
    (b'<superblock data_block_size="-128"><diff/></superblock>', "data_block_size"),
    (HEAD + b"</superblock>", "0 <diff>"),
    (HEAD + b"<diff/><diff/></superblock>", "2 <diff>"),
    (HEAD + b'<diff><moved begin="1" length="1"/></diff></superblock>', "unexpected <moved>"),
    (HEAD + b'<diff><different begin="x" length="1"/></diff></superblock>', "begin"),
    (HEAD + b'<diff><different begin="1"/></diff></superblock>', "length"),
    (HEAD + b'<diff><different><range begin="1"/></different></diff></superblock>', "length"),
    (HEAD + b'<diff><different><span begin="1" length="1"/></different></diff></superblock>', "unexpected <span>"),
    (b'<metadata data_block_size="128"><diff/></metadata>', "expected <superblock>"),
    (b'<!DOCTYPE superblock [<!ENTITY n "128">]><superblock data_block_size="&n;"><diff/></superblock>',
     "DOCTYPE"),
    (b'<!DOCTYPE superblock SYSTEM "http://127.0.0.1:9/x.dtd"><superblock data_block_size="8"><diff/></superblock>',
     "DOCTYPE"),
])
def test_bad_output_fails_in_one_line(xml, message):
    with pytest.raises(Fail, match=message) as e:
        changed_chunks(xml, 64 * KiB)
    assert "\n" not in str(e.value)


def test_bad_chunk_size_is_refused():
    with pytest.raises(Fail, match="chunk size"):
        parse(b"", 0)
