"""A big volume holding little data: send passes its holes over as runs,
and the manifest still lists every chunk the format asks for."""
import hashlib
import hmac
import json
import os
import random
import subprocess

import pytest

from images import KiB, MiB, make, same

CHUNK = 256 * KiB
GiB = 1 << 30


@pytest.mark.parametrize("pattern", ["all", "none", "random", "long-runs", "single"])
def test_manifest_lists_exactly_the_set_bits_as_one_entry_at_a_time_would(pattern):
    """encode packs runs of entries in bulk; the bytes are those of the
    plain reading of the format (an entry per set bit, parts cut where an
    entry no longer fits), and they read back."""
    from qubeswyng import keys, manifest
    rng = random.Random(pattern)
    count = 3 * manifest.PART // manifest.ENTRY.size + 77  # runs cross the parts' ends
    ids = manifest.ChunkMap(count)
    ids.ids[:] = rng.randbytes(32 * count)
    listed = bytearray((count + 7) // 8)
    picked = {"all": lambda i: True, "none": lambda i: False, "random": lambda i: rng.random() < 0.5,
              "long-runs": lambda i: i % 30000 < 29990, "single": lambda i: i % 17 == 3}[pattern]
    wanted = [i for i in range(count) if picked(i)]
    for i in wanted:
        listed[i >> 3] |= 1 << (i & 7)
    k = keys.Keys(bytes(32), bytes(16))
    head = manifest.Head(CHUNK, bytes(16), bytes(16), "20260101-000000", 1, count * CHUNK, len(wanted), "")
    assert manifest.count_set(listed) == len(wanted)
    parts = list(manifest.encode(k, head, ids, listed))

    body = head.pack() + b"".join(manifest.ENTRY.pack(i, ids[i]) for i in wanted)
    mac = hmac.new(k.mac, manifest.LABEL + body, hashlib.sha256).digest()
    assert b"".join(parts) == body + mac
    assert all(len(p) <= manifest.PART for p in parts)
    assert all(len(p) > manifest.PART - manifest.ENTRY.size - manifest.MAC_SIZE for p in parts[:-1])
    assert list(manifest.entries(manifest.read(k, parts, mac, head))) == [(i, ids[i]) for i in wanted]


def punch(path, offset, length):
    subprocess.run(["fallocate", "--punch-hole", "-o", str(offset), "-l", str(length), str(path)], check=True)


def sent(wyng, image):
    return json.loads(wyng.send("vol", image, "--json").stdout)["volumes"][0]


def test_a_sparse_volume_goes_by_its_data_and_comes_back_with_its_holes(wyng, tmp_path):
    """A 4 GiB image holding 3 MiB: the first send reads only the data and
    lists every chunk; a later send lists the chunks whose data became a
    hole and those the volume grew by, and nothing else; every session
    restores as it was, holes kept, and diff finds the volume the same."""
    (tmp_path / "pool").mkdir()
    image = make(tmp_path / "pool" / "vol", 4 * GiB, [(0, MiB, "random"), (GiB + 100, MiB, "text"),
                                                       (4 * GiB - MiB, MiB, "random")])
    count = 4 * GiB // CHUNK
    wyng.init()
    first = sent(wyng, image)
    assert (first["chunks_changed"], first["chunks_read"]) == (count, 4 + 5 + 4)

    punch(image, GiB, 2 * MiB)  # the text chunks become a hole: the parent held data there
    os.truncate(image, 4 * GiB + 10 * CHUNK)
    second = sent(wyng, image)
    assert (second["chunks_changed"], second["chunks_read"]) == (5 + 10, 8)

    wyng.receive("vol", tmp_path / "out")
    assert same(image, tmp_path / "out")
    assert os.stat(tmp_path / "out").st_blocks * 512 <= 8 * CHUNK
    assert "same as session" in wyng.run("diff", "--local=%s" % (tmp_path / "pool"), "vol").stdout
    wyng.receive("vol", tmp_path / "old", "--session=" + wyng.sessions("vol")[0])
    with open(tmp_path / "old", "rb") as f:
        f.seek(GiB + 100)
        assert f.read(MiB) != bytes(MiB)
    assert os.path.getsize(tmp_path / "old") == 4 * GiB
