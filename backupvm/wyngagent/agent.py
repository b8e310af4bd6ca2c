"""The wyng.Agent service: requests from dom0 on stdin, replies on stdout.

The request/reply table is doc/PROTOCOL.md.  The agent holds no secret but
the storage key dom0 hands it in OPEN; it never decides what a backup
contains, it only stores, finds and returns objects.
"""
import ctypes
import struct
import sys

from . import __version__, wire
from .archive import CHUNK, MANIFEST, Archive, ArchiveError, PART
from .hooks import point
from .lease import LeaseError
from .objects import Codec, ObjectError
from .scan import CLEAN, Scan, sweep
from .storage import open_store

OPEN = struct.Struct(">BBbI")  # cipher, compression, level, chunk size
CHUNK_ID = 32
MANIFEST_ID = 16
MAX_CHUNK = 2 << 20
SCAN_ITEM = struct.Struct(">16s16sI")  # manifest name, the first half of its MAC (the root's record), group
OBJECT_ID = {CHUNK: CHUNK_ID, MANIFEST: MANIFEST_ID}  # id length of each kind
MAX_URL = 4096
BEFORE_OPEN = {wire.HELLO, wire.GET_HEADER, wire.INIT, wire.OPEN, wire.BYE}
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt() parameters (glibc's malloc.h)
FATAL = (ArchiveError, LeaseError, ObjectError, OSError, wire.ProtocolError)


class Session:
    def __init__(self, reader, writer):
        self.reader, self.out = reader, writer
        self.archive = None

    def run(self):
        while True:
            frame = self.reader.frame()
            if frame is None:
                return 0
            op, payload = frame
            handler = HANDLERS.get(op)
            if handler is None:
                raise wire.ProtocolError("unknown request %d" % op)
            if op != wire.HELLO and self.archive is None:
                raise wire.ProtocolError("HELLO must come first")
            if op not in BEFORE_OPEN and self.archive.codec is None:
                raise wire.ProtocolError("OPEN must come first")
            if handler(self, payload) is False:
                return 0
            if self.archive and self.archive.lease.lost:  # found by the renewal thread
                raise LeaseError(self.archive.lease.lost)

    def stream(self, op, first):
        """Parts of a multi-frame upload: ``last:u8 | bytes`` frames of one op."""
        payload = first
        while True:
            if not payload:
                raise wire.ProtocolError("empty part")
            if len(payload) - 1 > PART:
                raise wire.ProtocolError("part too large")
            point("agent:in-upload")
            yield payload[1:]
            if payload[0]:
                return
            frame = self.reader.frame()
            if frame is None or frame[0] != op:
                raise wire.ProtocolError("upload interrupted")
            payload = frame[1]

    def send_parts(self, parts):
        for part in parts:
            self.out.send(wire.DATA, part)
        self.out.send(wire.END)

    def ok_stats(self):
        self.out.send(wire.OK, wire.STATS.pack(*self.archive.stats))

    # -- handlers ---------------------------------------------------------
    def hello(self, payload):
        if len(payload) < 2:
            raise wire.ProtocolError("short HELLO")
        (version,) = struct.unpack(">H", payload[:2])
        if version != wire.PROTOCOL_VERSION:
            raise wire.ProtocolError("protocol version %d is not %d" % (version, wire.PROTOCOL_VERSION))
        if len(payload) > 2 + MAX_URL:
            raise wire.ProtocolError("storage URL too long")
        try:
            url = payload[2:].decode()
        except UnicodeDecodeError:
            raise wire.ProtocolError("storage URL is not UTF-8") from None
        self.archive = Archive(open_store(url))
        self.out.send(wire.OK, struct.pack(">H", wire.PROTOCOL_VERSION), __version__.encode())

    def get_header(self, _payload):
        header = self.archive.header()
        if header is None:
            self.out.send(wire.NONE)
        else:
            self.out.send(wire.DATA, header)

    def init(self, payload):
        self.archive.init(payload)
        self.out.send(wire.OK)

    def open(self, payload):
        if len(payload) != OPEN.size + 32:
            raise wire.ProtocolError("bad OPEN")
        cipher, compression, level, chunk_size = OPEN.unpack(payload[:OPEN.size])
        if not 0 < chunk_size <= MAX_CHUNK:
            raise wire.ProtocolError("bad chunk size")
        self.archive.open(Codec(cipher, compression, level, payload[OPEN.size:]), chunk_size)
        self.out.send(wire.OK)

    def lock(self, payload):
        ttl, force = struct.unpack(">IB", payload[:5])
        flags, holder = self.archive.lock(payload[5:].decode(errors="replace"), ttl, force)
        self.out.send(wire.OK, bytes([flags]), holder.encode("utf-8", "replace")[:300])

    def unlock(self, _payload):
        self.archive.unlock()
        self.out.send(wire.OK)

    def get_root(self, _payload):
        parts = self.archive.root()
        if parts is None:
            self.out.send(wire.NONE)
        else:
            self.send_parts(parts)

    def put_chunk(self, payload):
        if not CHUNK_ID < len(payload) <= CHUNK_ID + self.archive.chunk_size:
            raise wire.ProtocolError("bad chunk length")
        self.archive.put_chunk(payload[:CHUNK_ID], memoryview(payload)[CHUNK_ID:])

    def put_manifest(self, payload):
        mid = payload[:MANIFEST_ID]
        if len(mid) != MANIFEST_ID:
            raise wire.ProtocolError("bad manifest id")
        self.archive.put_manifest(mid, self.stream(wire.PUT_MANIFEST, payload[MANIFEST_ID:]))

    def put_root(self, payload):
        self.archive.put_root(self.stream(wire.PUT_ROOT, payload))
        self.ok_stats()

    def get_manifest(self, payload):
        if len(payload) != MANIFEST_ID:
            raise wire.ProtocolError("bad manifest id")
        # a manifest that is missing or fails to open mid-way ends in ERR
        try:
            self.send_parts(self.archive.get_manifest(payload))
        except (ArchiveError, ObjectError) as e:
            self.out.error(str(e))

    def get_chunks(self, payload):
        ids = _ids(payload, CHUNK_ID)
        for chunk_id, data in zip(ids, self.archive.get_chunks(ids)):
            if isinstance(data, Exception):
                self.archive.note_damaged([chunk_id])  # now: dom0 may hang up at this ERR
                self.out.error(str(data))
            else:
                self.out.send(wire.DATA, data)

    # -- arch-copy: sealed objects as they are stored ----------------------------
    def objects(self, payload):
        """(kind, [ids]) of a HAVE or GET_OBJECTS request."""
        if not payload or payload[0] not in OBJECT_ID:
            raise wire.ProtocolError("bad object kind")
        return payload[0], _ids(payload[1:], OBJECT_ID[payload[0]])

    def have(self, payload):
        self.out.send(wire.OK, self.archive.have(*self.objects(payload)))

    def get_objects(self, payload):
        for parts in self.archive.get_objects(*self.objects(payload)):
            if isinstance(parts, Exception):
                self.out.error(str(parts))
            else:
                self.send_parts(parts)

    def put_object(self, payload):
        kind = payload[0] if payload else None
        if kind not in OBJECT_ID or len(payload) < 1 + OBJECT_ID[kind]:
            raise wire.ProtocolError("bad PUT_OBJECT")
        n = 1 + OBJECT_ID[kind]
        self.archive.put_object(kind, payload[1:n], self.stream(wire.PUT_OBJECT, payload[n:]))

    def scan(self, payload):
        if len(payload) < 5:
            raise wire.ProtocolError("short SCAN")
        mode, n = struct.unpack(">BI", payload[:5])
        if len(payload) != 5 + n * SCAN_ITEM.size:
            raise wire.ProtocolError("bad SCAN list")
        if mode & CLEAN:
            self.archive.require_lock()
        items = list(SCAN_ITEM.iter_unpack(payload[5:]))
        for record in Scan(self.archive, mode, [(m, mac) for m, mac, _g in items], [g for _m, _a, g in items]).run():
            self.out.send(wire.DATA, record)
        self.out.send(wire.END)

    def mark_garbage(self, _payload):
        self.archive.mark_garbage()
        self.out.send(wire.OK)

    def put_header(self, payload):
        self.archive.put_header(payload)
        self.out.send(wire.OK)

    def get_free(self, _payload):
        free = self.archive.store.free_bytes()
        self.out.send(wire.OK, struct.pack(">Q", (1 << 64) - 1 if free is None else free))

    def get_damaged(self, _payload):
        self.out.send(wire.OK, b"".join(sorted(self.archive.damaged())))

    def get_stats(self, _payload):
        self.archive.drain()
        self.ok_stats()

    def bye(self, _payload):
        self.archive.drain()
        self.archive.unlock()
        self.out.send(wire.OK)
        return False


HANDLERS = {
    wire.HELLO: Session.hello, wire.GET_HEADER: Session.get_header, wire.INIT: Session.init,
    wire.OPEN: Session.open, wire.LOCK: Session.lock, wire.UNLOCK: Session.unlock,
    wire.GET_ROOT: Session.get_root, wire.PUT_CHUNK: Session.put_chunk,
    wire.PUT_MANIFEST: Session.put_manifest, wire.PUT_ROOT: Session.put_root,
    wire.GET_MANIFEST: Session.get_manifest, wire.GET_CHUNKS: Session.get_chunks,
    wire.BYE: Session.bye, wire.GET_STATS: Session.get_stats, wire.SCAN: Session.scan,
    wire.MARK_GARBAGE: Session.mark_garbage, wire.GET_FREE: Session.get_free, wire.HAVE: Session.have,
    wire.GET_OBJECTS: Session.get_objects, wire.PUT_OBJECT: Session.put_object,
    wire.GET_DAMAGED: Session.get_damaged, wire.PUT_HEADER: Session.put_header,
}


def _ids(payload, size):
    if len(payload) % size:
        raise wire.ProtocolError("bad id list")
    return [payload[i:i + size] for i in range(0, len(payload), size)]


def keep_freed_memory():
    """glibc gives a freed buffer of 128 KiB or more back to the kernel
    and maps the next one afresh (unless a larger one was freed before), so
    chunk-sized buffers can page-fault their memory in again (zeroed by the
    kernel) for every chunk: measured, sealing 1 GiB of incompressible
    256 KiB chunks in a loop took 3.1 million page faults and 2.7 times the
    CPU.  Buffers up to 16 MiB come from the heap instead, which keeps up to
    64 MiB freed for reuse; what is in use stays bounded by the chunks in
    flight."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, 16 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 64 << 20)
    except (OSError, AttributeError):
        pass  # not glibc: only slower


def main():
    keep_freed_memory()
    try:
        sweep()
    except OSError:
        pass  # only tidiness
    session = Session(wire.Reader(0), wire.Writer(1))
    try:
        return session.run()
    except FATAL as e:
        # a failed request ends the connection: dom0 reads this line, the
        # archive keeps its last committed root
        try:
            session.out.error(str(e) if not isinstance(e, OSError) else _oserror(e))
        except OSError:
            pass
        return 1
    except KeyboardInterrupt:  # Ctrl-C reaches a local agent too: dom0 says so, the agent ends quietly
        return 130
    finally:
        if session.archive:
            session.archive.writers.settle()
            try:
                session.archive.unlock()
            except OSError:
                pass
            session.archive.store.close()


def _oserror(e):
    text = e.strerror or str(e)
    return "storage error: %s%s" % (text, (": " + e.filename) if e.filename else "")


if __name__ == "__main__":
    sys.exit(main())
