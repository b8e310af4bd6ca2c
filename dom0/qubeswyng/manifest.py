"""Delta manifests and the chunk map they build (DESIGN §3, doc/FORMAT.md).

A session's manifest lists ``(chunk index, chunk id)`` for the chunks that
changed since the parent session; an all-zero id means a chunk of zeros.
Its header binds it to the archive, the volume, the session and the
parent session's name (a chain that the MAC'd root's session list
confirms), and dom0's MAC over all of it ends the manifest.
Every index from the parent's end to this session's end is listed, so a
volume that shrank and grew again never shows stale chunks.
"""
import collections
import hashlib
import hmac
import struct

from .errors import Fail

MAGIC = b"QWYNGMAN"
HEAD = struct.Struct(">8sHHI16s16s16sQQQ32s")
ENTRY = struct.Struct(">Q32s")
LABEL = b"qubes-wyng manifest\0"
ZERO = bytes(32)
MAC_SIZE = 32
PART = 1 << 20


class ChunkMap:
    """The id of every chunk of one volume version: 32 bytes per chunk."""

    def __init__(self, count=0, ids=None):
        self.ids = ids if ids is not None else bytearray(32 * count)

    def __len__(self):
        return len(self.ids) // 32

    def resize(self, count):
        del self.ids[32 * count:]  # cut, or zero ids appended (+= of bytes: no second copy in memory)
        self.ids += bytes(32 * max(0, count - len(self)))

    def __getitem__(self, i):
        return bytes(self.ids[32 * i:32 * i + 32])

    def __setitem__(self, i, ids):
        """Set the id of chunk ``i``, or the ids of a run of chunks from ``i``
        (32 bytes each; the caller keeps them within the map)."""
        self.ids[32 * i:32 * i + len(ids)] = ids


def chunk_count(size, chunk_size):
    return -(-size // chunk_size)


class Head(collections.namedtuple("Head", "chunk_size archive_id volume_id session time size count parent")):
    """A manifest header; ``parent`` is the previous session's name ("" for
    the first session), stored NUL-padded in the 32-byte parent field."""

    def pack(self):
        return HEAD.pack(MAGIC, 1, 0, self.chunk_size, self.archive_id, self.volume_id,
                         self.session.encode(), self.time, self.size, self.count, self.parent.encode())


def encode(keys, head, ids, listed):
    """Yield the manifest in parts of at most PART bytes, MAC last: an
    entry for each chunk whose bit is set in the bitmap ``listed``, its id
    from the ChunkMap ``ids``."""
    mac = hmac.new(keys.mac, LABEL, hashlib.sha256)
    part = bytearray(head.pack())
    for first, stop in runs(listed, len(ids)):
        while first < stop:
            n = min(stop - first, (PART - MAC_SIZE - len(part)) // ENTRY.size)
            part += packed(ids.ids, first, first + n)
            first += n
            if len(part) > PART - ENTRY.size - MAC_SIZE:
                mac.update(part)
                yield bytes(part)
                part = bytearray()
    mac.update(part)
    yield bytes(part) + mac.digest()


def count_set(bits):
    """How many bits of the bitmap ``bits`` are set."""
    return bin(int.from_bytes(bits, "little")).count("1")


def runs(bits, count):
    """(first, stop) of each run of set bits of the bitmap ``bits`` below
    ``count``; bytes all set or all clear are passed over whole."""
    first = None
    for byte, value in enumerate(bits):
        if value == (0 if first is None else 255):
            continue
        for i in range(8 * byte, min(8 * byte + 8, count)):
            if value >> (i & 7) & 1 and first is None:
                first = i
            elif not value >> (i & 7) & 1 and first is not None:
                yield first, i
                first = None
    if first is not None:
        yield first, count


def packed(ids, first, stop):
    """The entries of chunks [first, stop) as stored: index bytes and id
    bytes interleaved by slice assignment (C loops, not one per entry)."""
    if stop - first < 16:  # a short run: entry by entry is quicker
        return b"".join(ENTRY.pack(i, ids[32 * i:32 * i + 32]) for i in range(first, stop))
    out, index = bytearray(ENTRY.size * (stop - first)), struct.pack(">%dQ" % (stop - first), *range(first, stop))
    for j in range(8):
        out[j::ENTRY.size] = index[j::8]
    for j in range(32):
        out[8 + j::ENTRY.size] = ids[32 * first + j:32 * stop:32]
    return out


def entries(runs):
    """(index, id) of each chunk in the runs that ``read`` yields."""
    for first, ids in runs:
        for k in range(0, len(ids), 32):
            yield first + k // 32, bytes(ids[k:k + 32])


def unpacked(block, last, limit, session):
    """The runs (first index, ids) of a block of whole entries of the
    manifest of ``session``, which must follow index ``last`` and stay below
    ``limit``.  A block of consecutive indexes (a first session lists every
    chunk) is one run, taken apart by slices as ``packed`` puts it
    together; any other block goes entry by entry."""
    n, first = len(block) // ENTRY.size, int.from_bytes(block[:8], "big")
    run = struct.pack(">%dQ" % n, *range(first, first + n)) if last < first <= limit - n else None
    if run and all(block[j::ENTRY.size] == run[j::8] for j in range(8)):
        ids = bytearray(32 * n)
        for j in range(32):
            ids[j::32] = block[8 + j::ENTRY.size]
        yield first, ids
        return
    for index, cid in ENTRY.iter_unpack(block):
        if not last < index < limit:
            raise Fail("manifest of %s lists chunks out of order or range" % session)
        last = index
        yield index, cid


def read(keys, parts, expect_mac, expect):
    """Check a manifest streamed from the agent; yield its entries as runs
    (first index, the ids of that chunk and those after it).

    ``expect`` is the Head the verified root implies (all fields but count
    and time); the header is compared with it before any entry is used, so
    no size or count from the agent decides how much memory dom0 spends.
    The final MAC check raises Fail: callers discard what they built."""
    mac = hmac.new(keys.mac, LABEL, hashlib.sha256)
    parts = iter(parts)
    buf = bytearray()
    while len(buf) < HEAD.size:
        part = next(parts, None)
        if part is None:
            raise Fail("manifest is truncated")
        buf += part
    fields = HEAD.unpack(bytes(buf[:HEAD.size]))
    if fields[:2] != (MAGIC, 1) or fields[3:7] != (expect.chunk_size, expect.archive_id, expect.volume_id,
                                                   expect.session.encode().ljust(16, b"\0")) \
            or fields[8] != expect.size or fields[10] != expect.parent.encode().ljust(32, b"\0"):
        raise Fail("manifest of %s does not belong where the archive root puts it" % expect.session)
    mac.update(buf[:HEAD.size])
    del buf[:HEAD.size]
    count, limit = fields[9], chunk_count(expect.size, expect.chunk_size)
    seen, last = 0, -1
    while True:
        whole = min(len(buf) // ENTRY.size, count - seen) * ENTRY.size
        if whole:
            block = bytes(buf[:whole])
            del buf[:whole]
            mac.update(block)
            yield from unpacked(block, last, limit, expect.session)
            last = int.from_bytes(block[-ENTRY.size:-32], "big")
            seen += whole // ENTRY.size
        if seen == count and len(buf) > MAC_SIZE:
            break  # too long: fails below
        part = next(parts, None)
        if part is None:
            break
        buf += part
    tag = mac.digest()
    if seen != count or bytes(buf) != tag or not hmac.compare_digest(tag, expect_mac):
        raise Fail("manifest of %s fails authentication" % expect.session)
