"""Fuzz targets: every parser of bytes that come from the other side.

dom0 parses agent bytes (frames, SCAN and LOCK replies, the header, the root,
manifests, settings records); the agent parses stored objects (objects of
both ciphers and every compression, the lock file, manifests in a scan) and
frames.  bench/fuzz.py runs these under atheris (coverage-guided) and
tests/test_fuzz.py runs a short seeded pass of each in CI.

Each target is honest about its boundary: where a MAC (or AEAD tag, or
chunk id) guards the bytes, a second mode signs the fuzzed body with the
harness's known key, so the parser behind the check is fuzzed too.  The
first byte of an input picks the mode.  A target may raise only its
module's one-line errors (``allowed``); anything else is a crash.  The
harness also checks what a parser promises (lengths within the bounds it
was given, entries in order, records that passed the schema being usable).

Modules are imported in ``setup()``, after bench/fuzz.py started
atheris's instrumentation (or coverage.py's tracing).
"""
import hashlib
import hmac
import io
import json
import os
import struct
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for _p in (REPO / "dom0", REPO / "backupvm"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

ARCHIVE_ID = bytes(range(16))
VOLUME_ID = bytes(range(16, 32))
MASTER = bytes(range(100, 132))
PASS = b"fuzz passphrase"
HOST = os.uname().nodename


# imported under atheris's instrumentation before any target runs
MODULES = ("qubeswyng.archive", "qubeswyng.commands.list", "qubeswyng.formats", "qubeswyng.keys",
           "qubeswyng.manifest", "qubeswyng.settings", "qubeswyng.wire", "wyngagent.archive", "wyngagent.lease",
           "wyngagent.objects", "wyngagent.scan", "wyngagent.wire")


class Target:
    side = "dom0"
    max_len = 4096
    functions = ()  # (module file relative to the repo, qualified function names) for the coverage figure

    def setup(self):
        pass

    def seeds(self):
        return []

    def dictionary(self):
        return []


def _fdp(data):
    import atheris
    return atheris.FuzzedDataProvider(data)


# -- dom0: the frame decoder and the replies built on it -------------------------------

class _Transport:
    def exit_note(self):
        return ""

    def kill(self):
        pass

    def close(self):
        pass


def _link(data):
    """A wire.Link reading ``data`` (a file-like instead of a pipe: the
    decoder only ever calls read(n) on it) and writing to /dev/null."""
    from qubeswyng import wire
    link = wire.Link.__new__(wire.Link)
    link.transport, link.name, link.wfd, link.rfile = _Transport(), "agent", _Devnull.fd(), io.BytesIO(data)
    return link


class _Devnull:
    _fd = None

    @classmethod
    def fd(cls):
        if cls._fd is None:
            cls._fd = os.open(os.devnull, os.O_WRONLY)
        return cls._fd


def _frames(*frames):
    return b"".join(struct.pack(">BI", op, len(p)) + p for op, p in frames)


LIMITS = (0, 1, 5, 32, 300, 1000, 4096, 1 << 20)


class Frames(Target):
    """wire.Link: frame, reply, parts; and the chunk frames of a fetch
    (Archive.fetch: each checked against its keyed id)."""
    functions = ("dom0/qubeswyng/wire.py", ("printable", "Link._exact", "Link.frame", "Link.reply", "Link.parts")),

    def setup(self):
        from qubeswyng import errors, keys, wire
        self.wire, self.allowed = wire, (errors.Fail,)
        self.keys = keys.Keys(MASTER, ARCHIVE_ID)

    def run(self, data):
        wire = self.wire
        how, limit = data[:1], LIMITS[data[1] % len(LIMITS)] if len(data) > 1 else 0
        link = _link(data[2:])
        if how == b"\0":
            assert len(link.reply(limit)) <= limit
        elif how == b"\1":
            op, payload = link.frame((wire.DATA, wire.END, wire.NONE), limit)
            assert op in (wire.DATA, wire.END, wire.NONE) and len(payload) <= limit
        elif how == b"\2":
            assert sum(len(p) for p in link.parts(limit)) <= limit
        else:
            self._fetch(link, data[2:])

    def _fetch(self, link, data):
        """Chunks of a fetch: the ids are those of the first bytes of each
        frame's payload, so that some frames pass the id check."""
        from qubeswyng.archive import Archive
        reader = Archive.__new__(Archive)
        reader.link, reader.keys = link, self.keys
        batch, pos = [], 0
        while pos + 5 <= len(data) and len(batch) < 8:
            op, length = struct.unpack(">BI", data[pos:pos + 5])
            body = data[pos + 5:pos + 5 + min(length, 1 << 16)]
            batch.append((len(batch), self.keys.chunk_id(body), len(body) if op & 1 else length))
            pos += 5 + len(body)
        for index, chunk in reader.fetch(batch):
            assert self.keys.chunk_id(chunk) == batch[index][1]

    def seeds(self):
        w = _frames_ops()
        chunk = b"chunk data" * 10
        return [b"\0\3" + _frames((w.OK, b"hello")), b"\1\5" + _frames((w.DATA, b"x" * 200)),
                b"\2\6" + _frames((w.DATA, b"abc"), (w.DATA, b"def"), (w.END, b"")),
                b"\0\4" + _frames((w.ERR, b"agent: \x1b[31mred")),
                b"\3\0" + _frames((w.DATA | 1, chunk), (w.DATA, chunk), (w.DATA, b"z"))]


def _frames_ops():
    from qubeswyng import wire
    return wire


class _Opts:
    command, force, quiet = "fuzz", False, True


class ScanReply(Target):
    """Archive.scan (the SCAN report: bounded, range-checked records) and
    collect(), which reads it."""
    functions = ("dom0/qubeswyng/archive.py", ("Archive.scan", "Archive.collect")),

    def setup(self):
        from qubeswyng import archive, errors
        self.archive, self.allowed = archive, (errors.Fail,)

    def run(self, data):
        from qubeswyng.archive import Archive
        reader = Archive.__new__(Archive)
        n, groups = data[0] % 8 if data else 0, data[1] % 4 if len(data) > 1 else 0
        reader.link, reader.opts = _link(data[2:]), _Opts()
        vol = {"sessions": [{"manifest": "00" * 16, "mac": "11" * 32}] * max(n, 1)}
        reader.root = {"volumes": [vol] if n else []}
        if groups == 3:
            reader.collect()
            return
        items = [(vol, i) for i in range(n)]
        records = reader.scan(self.archive.SCAN_WHOLE, items, [i % (groups + 1) for i in range(n)] if groups else None)
        assert len(records) <= 3 * n + groups + 16
        assert all(len(r) == 5 and all(isinstance(x, int) and x >= 0 for x in r) for r in records)

    def seeds(self):
        from qubeswyng import wire
        rec = wire.SCAN_RECORD.pack
        return [b"\2\1" + _frames((wire.DATA, rec(2, 0, 3, 0, 0)), (wire.DATA, rec(8, 0, 1, 2, 3)), (wire.END, b"")),
                b"\1\3" + _frames((wire.DATA, rec(9, 0, 5, 100, 0)), (wire.END, b""))]


class Replies(Target):
    """The small replies: LOCK (flags and the previous holder's name),
    statistics (GET_STATS, PUT_ROOT), GET_FREE, and MARK_GARBAGE's OK."""
    functions = ("dom0/qubeswyng/archive.py", ("Archive.lock", "Archive.free_bytes", "Archive.agent_stats",
                                               "Archive._stats_reply", "Archive.mark_garbage")),

    def setup(self):
        from qubeswyng import errors
        self.allowed = (errors.Fail,)

    def run(self, data):
        from qubeswyng.archive import Archive
        reader = Archive.__new__(Archive)
        reader.link, reader.opts = _link(data[1:]), _Opts()
        reader.opts.force = bool(data[:1] and data[0] & 4)
        how = data[0] % 4 if data else 0
        if how == 0:
            assert reader.lock() in (True, False)
        elif how == 1:
            assert all(0 <= x < 1 << 64 for x in reader.agent_stats())
        elif how == 2:
            free = reader.free_bytes()
            assert free is None or 0 <= free < (1 << 64) - 1
        else:
            reader.mark_garbage()

    def seeds(self):
        from qubeswyng import wire
        return [b"\0" + _frames((wire.OK, b"\3qvm-wyng send on host (pid 1)")),
                b"\1" + _frames((wire.OK, wire.STATS.pack(1, 2, 3, 4))),
                b"\2" + _frames((wire.OK, struct.pack(">Q", 12345))), b"\3" + _frames((wire.OK, b""))]


# -- dom0: the header -------------------------------------------------------------------

class Header(Target):
    """formats.Header.parse, unlock (scrypt parameters bounded, the wrap
    tag) and check (the header MAC).  Mode 1 builds the header from fuzzed
    settings fields and wraps and signs it properly, so unlock and check
    pass and every parsed setting is reached."""
    functions = ("dom0/qubeswyng/formats.py", ("Header.__init__", "Header.fields", "Header.parse", "Header.unlock",
                                               "Header.check")), \
                ("dom0/qubeswyng/keys.py", ("derive_kek", "unwrap", "Keys.check"))

    def setup(self):
        from qubeswyng import errors, formats, keys
        self.formats, self.keys, self.allowed = formats, keys, (errors.Fail,)
        keys.hashlib = _CheapScrypt()

    def run(self, data):
        F, K = self.formats, self.keys
        blob = data[1:]
        if data[:1] == b"\1":
            fields = blob[:F.HEADER_FIELDS.size].ljust(F.HEADER_FIELDS.size, b"\0")
            kdf = struct.unpack(">BBB", fields[11:14])
            try:
                kek = K.derive_kek(PASS, fields[-32:], *kdf)
            except self.allowed:
                kek = bytes(64)
            body = fields + K.wrap(kek, MASTER, fields)
            blob = body + K.Keys(MASTER, fields[-48:-32]).sign(F.HEADER_LABEL, body)
        header = F.Header.parse(blob)
        assert header.chunk_size in [(64 << 10) << i for i in range(6)] and len(header.salt) == 32
        master = header.unlock(PASS)
        header.check(K.Keys(master, header.archive_id))
        assert master == MASTER

    def seeds(self):
        F = self.formats
        good = F.Header(ARCHIVE_ID, 1, 1, 3, 3, (10, 8, 1), bytes(32)).seal(PASS, MASTER)
        rewrapped = F.Header(ARCHIVE_ID, 1, 1, 3, 3, (17, 8, 2)).seal(PASS, MASTER)  # as arch-passphrase writes
        return [b"\0" + good, b"\1" + good[:F.HEADER_FIELDS.size], b"\0" + good[:-1] + b"\0", b"\0" + rewrapped]


class _CheapScrypt:
    """hashlib for keys.py in the header target: scrypt parameters that would
    cost more than 1 MiB are checked against OpenSSL's one rule that our
    bounds do not imply (N < 2^(16 r)), then derived with N = 2^10, so
    that a million inputs take minutes, not days.  The cost of the real
    thing is tested once in tests/test_kdf.py."""

    def scrypt(self, password, *, salt, n, r, p, maxmem, dklen):
        if 128 * r * n * p > 1 << 20:
            if n >= 1 << min(16 * r, 64):
                raise ValueError("invalid parameter combination for n, r, p, maxmem")
            n, p = 1 << 10, 1
        return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=dklen)


# -- dom0: the root ----------------------------------------------------------------------

def _root_json():
    ses = [{"name": "2026010%d-000000" % i, "time": 1767225600 + i, "size": 5 << 20, "changed": 3,
            "manifest": "%032x" % i, "mac": "%064x" % i, "tags": {"weekly": "a tag"} if i else {}}
           for i in range(1, 3)]
    return {"format": 1, "archive": ARCHIVE_ID.hex(), "seq": 7, "time": 1767225700,
            "volumes": [{"id": VOLUME_ID.hex(), "name": "qubes/work/private", "sessions": ses},
                        {"id": ARCHIVE_ID.hex(), "name": "qubes/work/settings", "sessions": ses[:1]},
                        {"id": MASTER[:16].hex(), "name": "vol", "sessions": []}]}


class Root(Target):
    """formats.open_root: the MAC, then the JSON and its schema; mode 1
    signs the fuzzed body, and what open_root returns must be usable by
    every command (list, the qube index, rollback checks)."""
    functions = ("dom0/qubeswyng/formats.py", ("open_root", "_int", "_hex")),
    max_len = 8192

    def setup(self):
        from qubeswyng import errors, formats, keys
        self.formats, self.allowed = formats, (errors.Fail,)
        self.k = keys.Keys(MASTER, ARCHIVE_ID)

    def run(self, data):
        from qubeswyng.commands.list import session_info
        from qubeswyng.settings import qubes_in
        F = self.formats
        blob = data[1:]
        if data[:1] == b"\1":
            blob = blob + self.k.sign(F.ROOT_LABEL, blob)
        root, mac = F.open_root(self.k, blob, ARCHIVE_ID)
        assert mac == blob[-32:] and root["seq"] >= 0 and root["seq"] < 1 << 63 and root["time"] >= 0
        qubes_in(root)
        for vol in root["volumes"]:
            bytes.fromhex(vol["id"])
            for ses in vol["sessions"]:
                json.dumps(session_info(ses))
                bytes.fromhex(ses["manifest"]), bytes.fromhex(ses["mac"])
                assert ses["size"] >= 0 and isinstance(ses["name"], str)

    def seeds(self):
        body = json.dumps(_root_json(), sort_keys=True, separators=(",", ":")).encode()
        return [b"\1" + body, b"\0" + body + self.k.sign(self.formats.ROOT_LABEL, body)]

    def dictionary(self):
        return ['"%s"' % k for k in ("format", "archive", "seq", "time", "volumes", "id", "name", "sessions",
                                     "size", "changed", "manifest", "mac", "tags")] + \
            ['"%s"' % ARCHIVE_ID.hex(), "-1", "1e999", "NaN", "[]", "{}", "null", "true", '""']


# -- dom0: manifests ---------------------------------------------------------------------

class Manifest(Target):
    """manifest.read over parts cut where the input says: the header
    against the one the root implies, entries in order and range, the MAC.
    Mode 1 appends the right MAC (and expects it), so the checks of the
    header and entries behind it are reached."""
    functions = ("dom0/qubeswyng/manifest.py", ("read", "unpacked", "entries")),
    max_len = 8192

    def setup(self):
        from qubeswyng import errors, keys, manifest
        self.m, self.allowed = manifest, (errors.Fail,)
        self.k = keys.Keys(MASTER, ARCHIVE_ID)
        self.expect = manifest.Head(64 << 10, ARCHIVE_ID, VOLUME_ID, "20260102-000000", 0, 40 << 16, 0,
                                    "20260101-000000")

    def run(self, data):
        m = self.m
        body = data[2:]
        if data[:1] == b"\1":
            tag = hmac.new(self.k.mac, m.LABEL + body, hashlib.sha256).digest()
            body, expect_mac = body + tag, tag
        else:
            expect_mac = body[-32:]
        cut = data[1] * len(body) // 255 if len(data) > 1 else 0
        limit = m.chunk_count(self.expect.size, self.expect.chunk_size)
        last = -1
        for index, cid in m.entries(m.read(self.k, [body[:cut], body[cut:]], expect_mac, self.expect)):
            assert last < index < limit and len(cid) == 32
            last = index

    def seeds(self):
        m = self.m
        head = self.expect._replace(count=5, time=1)
        good = encode_entries(self.k, head, [(i * 7, bytes([i]) * 32) for i in range(5)])
        run = encode_entries(self.k, head._replace(count=20), [(i + 3, bytes([i]) * 32) for i in range(20)])
        return [b"\1\100" + good[:-32], b"\0\3" + good, b"\1\0" + head._replace(count=0).pack(),
                b"\1\200" + run[:-32]]


# -- dom0: settings records --------------------------------------------------------------

def encode_entries(keys, head, entries):
    """A manifest listing ``entries`` ((index, id) in order) as dom0 writes it."""
    from qubeswyng import manifest
    count = manifest.chunk_count(head.size, head.chunk_size)
    ids, listed = manifest.ChunkMap(count), bytearray((count + 7) // 8)
    for index, cid in entries:
        ids[index] = cid
        listed[index >> 3] |= 1 << (index & 7)
    return b"".join(manifest.encode(keys, head, ids, listed))


def _record():
    return {"version": 2, "name": "work", "class": "AppVM", "label": "blue", "template": "fedora-40",
            "properties": {"memory": 800, "netvm": "sys-firewall", "autostart": True, "kernelopts": "quiet",
                           "default_dispvm": None},
            "features": {"service.crond": "1"}, "tags": ["project-x"],
            "firewall": ["action=accept specialtarget=dns", "action=drop"], "notes": "notes\nline",
            "volumes": ["private"], "devices": [{"class": "usb", "backend": "sys-usb", "port": "2-1",
                                                 "device": "0781:5581", "mode": "auto-attach",
                                                 "options": {"read-only": "yes"}}]}


class Settings(Target):
    """settings.parse (UTF-8 JSON, then the whole schema).  The bytes come
    after their chunk ids were checked, so both modes fuzz behind that check:
    mode 0 raw bytes, mode 1 a valid record with fuzz-chosen fields replaced
    by fuzz-built JSON values (the schema's branches need that structure)."""
    functions = ("dom0/qubeswyng/settings.py", ("parse", "check", "_text", "is_name")),
    max_len = 4096

    def setup(self):
        from qubeswyng import errors, settings
        self.s, self.allowed = settings, (errors.Fail,)

    def run(self, data):
        s = self.s
        if data[:1] == b"\1":
            fdp = _fdp(data[1:])
            rec = _record()
            for _ in range(fdp.ConsumeIntInRange(1, 4)):
                _mutate(fdp, rec)
            data = b"\0" + json.dumps(rec).encode("utf-8", "surrogatepass")
        rec = s.parse(data[1:], "work")
        assert s.check(json.loads(s.encode(rec)), "work") == rec

    def seeds(self):
        return [b"\0" + self.s.encode(_record()), b"\1" + bytes(range(40))]

    def dictionary(self):
        return ['"%s"' % k for k in list(_record()) + list(_record()["properties"]) + ["qid", "AdminVM"]]


FIELDS = list(_record()) + ["extra"]


def _value(fdp, depth=0):
    kind = fdp.ConsumeIntInRange(0, 8 if depth < 3 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return fdp.ConsumeBool()
    if kind == 2:
        return fdp.ConsumeIntInRange(-(1 << 70), 1 << 70) if fdp.ConsumeBool() else fdp.ConsumeIntInRange(-2, 2)
    if kind == 3:
        return fdp.ConsumeRegularFloat() if fdp.ConsumeBool() else fdp.PickValueInList([float("nan"), float("inf")])
    if kind == 4:
        return fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 40))
    if kind == 5:
        return fdp.PickValueInList(["work", "fedora-40", "AppVM", "private", "settings", "none", "a" * 32, "",
                                    "action=drop", "sys-net", "x\0y", "é"])
    if kind == 6:
        return [_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    if kind == 7:
        return {fdp.PickValueInList(FIELDS + ["memory", "qid", "netvm"]) if fdp.ConsumeBool()
                else fdp.ConsumeUnicode(8): _value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))}
    return float(fdp.ConsumeIntInRange(0, 3))  # 1.0 == 1 in JSON's eyes, not in the schema's


def _mutate(fdp, rec):
    field = fdp.PickValueInList(FIELDS)
    inner = rec.get(field)
    if isinstance(inner, dict) and fdp.ConsumeBool():
        inner[fdp.PickValueInList(list(inner) + ["qid", "netvm", "x y", "memory"])] = _value(fdp)
    elif isinstance(inner, list) and inner and fdp.ConsumeBool():
        inner[fdp.ConsumeIntInRange(0, len(inner) - 1)] = _value(fdp)
    elif fdp.ConsumeIntInRange(0, 5) == 0:
        rec.pop(field, None)
    else:
        rec[field] = _value(fdp)


# -- agent: stored objects ---------------------------------------------------------------

class StoredObject(Target):
    """objects.Codec.open / open_stream, for both ciphers and every
    compression.  Mode bit 0 of the first byte: raw bytes as the stored
    object; 1: the fuzzed segment plaintexts sealed with the known key (so
    the AEAD passes and the decompressors and segment rules are reached),
    with the index and last flag of each segment's associated data as the
    input says."""
    side = "agent"
    functions = ("backupvm/wyngagent/objects.py", ("Codec.open", "Codec.open_stream", "Codec._open_segment",
                                                   "_decompress", "_exact", "_BytesSource.read")),

    def setup(self):
        from wyngagent import objects
        self.o, self.allowed = objects, (objects.ObjectError,)
        key = bytes(range(32))
        self.codecs = {(c, z): objects.Codec(c, z, 3 if z else 0, key) for c in (0, 1) for z in range(4)}

    def run(self, data):
        if not data:
            return
        flags, body = data[0], data[1:]
        codec = self.codecs[(flags >> 1) & 1, (flags >> 2) & 3]
        limit = (1, 100, 4096, 1 << 18)[flags >> 4 & 3]
        if flags & 1:
            body = self._sealed(codec, body, flags >> 7)
        name = "chunks/ab/cd"
        if flags & 0x40:
            codec.open(name, body, limit)
        else:
            for part in codec.open_stream(name, io.BytesIO(body), limit):
                assert len(part) <= limit

    def _sealed(self, codec, body, trailing):
        """``len:u16 | index:u8 | last:u8 | plaintext`` records become
        segments sealed the way Codec.segment seals them."""
        o = self.o
        out, pos = [o.MAGIC + bytes([codec.cipher])], 0
        while pos + 4 <= len(body):
            length, index, last = struct.unpack(">HBB", body[pos:pos + 4])
            plain = body[pos + 4:pos + 4 + length]
            pos += 4 + len(plain)
            if codec.cipher:
                nonce = bytes(24)
                sealed = nonce + o.aead.seal(codec.key, nonce, o._aad("chunks/ab/cd", index, bool(last & 1)), plain)
            else:
                sealed = plain
            out.append(o.SEGMENT.pack(len(sealed) | (o.LAST if last & 2 else 0)) + sealed)
        return b"".join(out) + (body[pos:] if trailing else b"")

    def seeds(self):
        import bz2
        import zlib

        import zstandard
        out = []
        text = b"qubes volume chunk " * 30
        for cipher in (0, 1):
            for z, packed in enumerate((text, zstandard.ZstdCompressor().compress(text), zlib.compress(text),
                                        bz2.compress(text))):
                codec = self.codecs[cipher, z]
                flags = cipher << 1 | z << 2 | 3 << 4
                out.append(bytes([flags | 0x40]) + codec.seal("chunks/ab/cd", text))
                plain = bytes([z]) + packed
                out.append(bytes([flags | 1]) + struct.pack(">HBB", len(plain), 0, 3) + plain)
                two = struct.pack(">HBB", len(plain), 0, 0) + plain + struct.pack(">HBB", len(plain), 1, 3) + plain
                out.append(bytes([flags | 1]) + two)
        return out


class _MemoryStore:
    """The storage verbs the lock and scan code use, in memory (the fuzz
    targets need a million runs; the real stores have their own tests)."""
    root = location = "/fuzz"
    atomic_replace = conditional_create = True
    needs_sync = False
    connections = 1

    def __init__(self, objects):
        self.objects = dict(objects)

    def create_exclusive(self, name, data):
        if name in self.objects:
            return False
        self.objects[name] = bytes(data)
        return True

    def write(self, name, parts, durable=False):
        self.objects[name] = b"".join([parts] if isinstance(parts, (bytes, bytearray)) else parts)

    def read(self, name):
        try:
            return self.objects[name]
        except KeyError:
            raise FileNotFoundError(name) from None

    def open(self, name):
        return io.BytesIO(self.read(name))

    def size(self, name):
        return len(self.objects[name]) if name in self.objects else None

    def delete(self, name):
        self.objects.pop(name, None)


class LockFile(Target):
    """The agent's reading of the lock objects another writer left (JSON
    from storage: ``lock`` and its renewal ``lock.<instance>``): taking the
    lock, renewing and confirming it, releasing it.  The first byte says
    --force, whether a collection is due, whether the input also holds a
    renewal (after a NUL) and the TTL."""
    side = "agent"
    functions = ("backupvm/wyngagent/lease.py", ("Lease.take", "Lease._supersede", "Lease.renew", "Lease.confirm",
                                                 "Lease._confirm", "Lease.release", "Lease._read", "Lease._expires",
                                                 "_when", "_parse", "_live", "_number")),

    def setup(self):
        from wyngagent import archive, lease
        self.a, self.lease, self.allowed = archive, lease, (archive.ArchiveError, lease.LeaseError)

    def run(self, data):
        flags = data[0] if data else 0
        lock, _, renewal = data[1:].partition(b"\0") if flags & 4 else (data[1:], b"", b"")
        objects = ([("lock", lock)] if lock else []) + ([("garbage", b"")] if flags & 2 else [])
        if lock and flags & 4:
            objects.append(("lock." + self.lease.instance(lock), renewal))
        archive = self.a.Archive(_MemoryStore(dict(objects)))
        force, ttl = bool(flags & 1), 2 + (flags >> 3)
        result, holder = archive.lock("fuzz", ttl, force)
        assert isinstance(holder, str) and result & ~7 == 0
        try:
            archive.lease.renew()
            archive.lease.confirm()
        finally:
            archive.unlock()
        assert "lock" not in archive.store.objects

    def seeds(self):
        import time
        body = {"owner": "qvm-wyng send on %s (pid 1)" % HOST, "host": HOST, "pid": os.getpid(),
                "expires": time.time() + 3600, "token": "00" * 8}
        live = json.dumps(body).encode()
        return [b"\x08" + live, b"\x09" + json.dumps(dict(body, expires=1)).encode(),
                b"\x0a" + json.dumps(dict(body, host="other")).encode(), b"\x0f" + live,
                b"\x0c" + json.dumps(dict(body, expires=1)).encode() + b"\0" + b'{"expires": 9e9}', b"\0"]

    def dictionary(self):
        return ['"owner"', '"host"', '"pid"', '"expires"', '"token"', '"%s"' % HOST, "1e300", "NaN", "-1"]


class ScanManifest(Target):
    """scan.Scan._ids: the chunk ids a stored manifest lists, as the agent
    reads them for GC and arch-check, and the check of the MAC it ends in.
    Mode 0: the plaintext parts (what the AEAD let through); mode 1: the raw
    object, opened by an unencrypted codec.  Bit 0 of the second byte: the
    MAC expected is the one the input ends in (else zeros)."""
    side = "agent"
    functions = ("backupvm/wyngagent/scan.py", ("Scan._ids",)),
    max_len = 8192

    def setup(self):
        from wyngagent import archive, objects, scan
        self.a, self.o, self.scan = archive, objects, scan
        self.allowed = (archive.ArchiveError, objects.ObjectError)

    def run(self, data):
        mid = bytes(16)
        store = _MemoryStore({})
        arch = self.a.Archive(store)
        arch.open(self.o.Codec(0, 0, 0, b""), 1 << 16)
        if data[:1] == b"\1":
            store.objects[self.a.manifest_name(mid)] = data[2:]
        else:
            cut = data[1] * len(data) // 255 if len(data) > 1 else 0
            arch.get_manifest = lambda _m: iter([data[2:cut], data[cut:]])
        walker = self.scan.Scan.__new__(self.scan.Scan)
        walker.archive = arch
        mac = data[-32:-16] if len(data) > 1 and data[1] & 1 else bytes(16)  # the stored MAC's half, or not
        for cid in walker._ids(mid, mac):
            assert len(cid) == 32 and cid != bytes(32)

    def seeds(self):
        head = bytes(80) + struct.pack(">Q", 3) + bytes(32)
        body = head + b"".join(struct.pack(">Q32s", i, bytes([i + 1]) * 32) for i in range(3)) + bytes(32)
        codec = self.o.Codec(0, 0, 0, b"")
        return [b"\0\x51" + body, b"\1\1" + codec.seal(self.a.manifest_name(bytes(16)), body)]


class AgentFrames(Target):
    """wire.Reader: the agent's frame reader (bounded payloads)."""
    side = "agent"
    functions = ("backupvm/wyngagent/wire.py", ("Reader.frame",)),

    def setup(self):
        from wyngagent import wire
        self.w, self.allowed = wire, (wire.ProtocolError,)

    def run(self, data):
        reader = self.w.Reader.__new__(self.w.Reader)
        reader.file = io.BytesIO(data)
        while True:
            frame = reader.frame()
            if frame is None:
                return
            assert len(frame[1]) <= self.w.MAX_PAYLOAD

    def seeds(self):
        return [struct.pack(">BI", 1, 4) + b"\0\1/a" + struct.pack(">BI", 13, 0)]


TARGETS = {"frames": Frames, "scan-reply": ScanReply, "replies": Replies, "header": Header, "root": Root,
           "manifest": Manifest, "settings": Settings, "object": StoredObject, "lock-file": LockFile,
           "scan-manifest": ScanManifest, "agent-frames": AgentFrames}
