"""Images go into the archive and come back byte for byte."""
import json
import os

import pytest

from images import KiB, MiB, chunk_files, make, overwrite, same

CHUNK = 256 * KiB


@pytest.mark.parametrize("size,pieces", [
    pytest.param(3 * MiB + 12345, [(0, 3 * MiB + 12345, "random")], id="size-not-multiple-of-chunk"),
    pytest.param(64 * MiB, [(0, 1 * MiB, "random"), (40 * MiB + 100, 300 * KiB, "text"),
                            (64 * MiB - 5000, 5000, "random")], id="large-holes"),
    pytest.param(5 * MiB, [], id="all-holes"),
    pytest.param(2 * MiB + 7, [(0, 2 * MiB + 7, b"\0")], id="all-written-zeros"),
    pytest.param(1, [(0, 1, b"x")], id="one-byte"),
    pytest.param(0, [], id="empty"),
])
def test_image_round_trip(wyng, tmp_path, size, pieces):
    image = make(tmp_path / "img", size, pieces)
    wyng.init()
    wyng.send("vol", image)
    wyng.receive("vol", tmp_path / "out")
    assert same(image, tmp_path / "out")
    wyng.run("verify", "vol")


def test_a_new_file_keeps_the_zero_blocks_of_its_chunks_as_holes(wyng, tmp_path):
    """Zeros inside a chunk that holds data, in 64 KiB blocks, are not
    written to a new file: the restored file is as sparse as that allows."""
    pieces = [(i * CHUNK + (i % 4) * 64 * KiB, 64 * KiB, "random") for i in range(8)] + [(8 * CHUNK, 1000, "text")]
    image = make(tmp_path / "img", 8 * CHUNK + 1000, pieces)
    wyng.init()
    wyng.send("vol", image)
    wyng.receive("vol", tmp_path / "out")
    assert same(image, tmp_path / "out")
    assert os.stat(tmp_path / "out").st_blocks * 512 <= 9 * 64 * KiB


@pytest.mark.parametrize("encrypt", ["xchacha20-poly1305", "off"])
@pytest.mark.parametrize("compression", ["zstd:3", "zlib:6", "bz2:9", "off", "zstd:19"])
def test_every_compression_and_encryption_setting(wyng, tmp_path, encrypt, compression):
    image = make(tmp_path / "img", 3 * MiB + 1000, [(0, MiB, "text"), (MiB, MiB, "random"),
                                                    (2 * MiB + 7, MiB, "text")])
    wyng.init("--encrypt=" + encrypt, "--compression=" + compression)
    wyng.send("vol", image)
    overwrite(image, 100, b"changed")
    wyng.send("vol", image)
    first, second = wyng.sessions("vol")
    wyng.receive("vol", tmp_path / "out")
    assert same(image, tmp_path / "out")
    wyng.receive("vol", tmp_path / "old", "--session=" + first)
    with open(tmp_path / "old", "rb") as f:
        assert f.read(200)[100:107] != b"changed"


@pytest.mark.parametrize("factor", [1, 6])
def test_chunk_factor(wyng, tmp_path, factor):
    image = make(tmp_path / "img", 5 * MiB + 3, [(0, 5 * MiB + 3, "random")])
    wyng.init("--chunk-factor=%d" % factor)
    wyng.send("vol", image)
    expected = -(-(5 * MiB + 3) // ((64 * KiB) << (factor - 1)))
    assert len(chunk_files(wyng.archive)) == expected
    wyng.receive("vol", tmp_path / "out")
    assert same(image, tmp_path / "out")


def test_volumes_sharing_data_store_shared_chunks_once(wyng, tmp_path):
    common = [(0, 4 * CHUNK, "random")]
    a = make(tmp_path / "a", 8 * CHUNK, common + [(5 * CHUNK, CHUNK, b"A")], seed=1)
    b = make(tmp_path / "b", 8 * CHUNK, common + [(6 * CHUNK, CHUNK, b"B")], seed=1)
    wyng.init()
    done = wyng.run("send", "--import-other-from=a:|:%s" % a, "--import-other-from=b:|:%s" % b, "--json")
    stats = {v["volume"]: v for v in json.loads(done.stdout)["volumes"]}
    # 4 shared random chunks + one 'A' chunk + one 'B' chunk
    assert len(chunk_files(wyng.archive)) == 6
    assert stats["b"]["chunks_deduplicated"] == 4
    for name, image in (("a", a), ("b", b)):
        wyng.receive(name, tmp_path / ("out-" + name))
        assert same(image, tmp_path / ("out-" + name))


def test_incremental_send_stores_only_changed_chunks(wyng, tmp_path):
    image = make(tmp_path / "img", 40 * CHUNK, [(0, 40 * CHUNK, "random")], seed=3)
    wyng.init()
    wyng.send("vol", image)
    before = set(chunk_files(wyng.archive))
    assert len(before) == 40
    wyng.receive("vol", tmp_path / "first")
    overwrite(image, 3 * CHUNK + 10, b"one")
    overwrite(image, 17 * CHUNK, b"two" * 1000)
    overwrite(image, 39 * CHUNK + 5, b"three")
    wyng.send("vol", image)
    after = set(chunk_files(wyng.archive))
    assert len(after - before) == 3 and before <= after
    first, second = wyng.sessions("vol")
    wyng.receive("vol", tmp_path / "second")
    assert same(image, tmp_path / "second")
    wyng.receive("vol", tmp_path / "first-again", "--session=" + first)
    assert same(tmp_path / "first", tmp_path / "first-again")


def test_unchanged_volume_records_no_session_unless_asked(wyng, tmp_path):
    image = make(tmp_path / "img", 2 * CHUNK, [(0, 2 * CHUNK, "random")])
    wyng.init()
    wyng.send("vol", image)
    assert "unchanged" in wyng.send("vol", image).stderr
    assert len(wyng.sessions("vol")) == 1
    wyng.send("vol", image, "--send-unchanged")
    assert len(wyng.sessions("vol")) == 2


def test_volume_that_shrinks_and_grows_again(wyng, tmp_path):
    image = make(tmp_path / "img", 10 * CHUNK, [(0, 10 * CHUNK, "random")], seed=4)
    wyng.init()
    wyng.send("vol", image)
    with open(image, "r+b") as f:
        f.truncate(3 * CHUNK + 17)
    wyng.send("vol", image)
    with open(image, "r+b") as f:
        f.truncate(12 * CHUNK)  # the regrown part must read as zeros, not old data
    overwrite(image, 11 * CHUNK, b"tail")
    wyng.send("vol", image)
    sessions = wyng.sessions("vol")
    assert len(sessions) == 3
    wyng.receive("vol", tmp_path / "out")
    assert same(image, tmp_path / "out")
    wyng.receive("vol", tmp_path / "small", "--session=" + sessions[1])
    assert (tmp_path / "small").stat().st_size == 3 * CHUNK + 17


def test_session_selection_by_tag(wyng, tmp_path):
    image = make(tmp_path / "img", 2 * CHUNK, [(0, 2 * CHUNK, "random")])
    wyng.init()
    wyng.send("vol", image, "--tag=before-upgrade,the old one")
    first = (tmp_path / "img").read_bytes()
    overwrite(image, 0, b"new")
    wyng.send("vol", image)
    wyng.receive("vol", tmp_path / "out", "--session=^before-upgrade")
    assert (tmp_path / "out").read_bytes() == first
    listing = json.loads(wyng.run("list", "vol", "--json").stdout)
    assert listing["volumes"][0]["sessions"][0]["tags"] == {"before-upgrade": "the old one"}
