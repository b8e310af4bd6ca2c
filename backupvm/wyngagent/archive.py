"""The archive as the agent keeps it: named objects in a store.

Layout (doc/FORMAT.md): ``header`` (opaque to the agent, written by dom0),
``archive`` (the root), ``manifests/<32 hex>``, ``chunks/<2 hex>/<64 hex>``,
``lock``.  Chunk data is never rewritten; the root is written last in every
mutation, after everything it refers to is durable.
"""
import collections
import contextlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from .hooks import point
from .lease import LOCK_NAME, Lease
from .objects import MAGIC, ObjectError
from .storage.local import TMP_SUFFIX

HEADER_NAME, ROOT_NAME, GARBAGE_NAME, DAMAGED_NAME = "header", "archive", "garbage", "damaged"
LOCK_GARBAGE = 1  # a flag of LOCK's reply; lease.py has the others
MAX_HEADER = 64 << 10
PART = 1 << 20  # plaintext per segment of manifests and the root
# an object shorter than this cannot be a sealed chunk: a crash left it
MIN_OBJECT = len(MAGIC) + 1 + 4 + 1
# chunk objects being read and opened, or sealed and written, at once: the
# store's I/O, the AEAD and zstd release the GIL, so they use every core,
# and a store with latency has that many requests waiting (doc/PROTOCOL.md)
IN_FLIGHT = 8
MAX_IN_FLIGHT = 32 << 20  # bytes of chunks a store with latency may have in flight
BATCH, BATCH_BYTES = 64, 8 << 20  # new chunks whose existence one call checks
CHUNK, MANIFEST = 0, 1  # object kinds in HAVE, GET_OBJECTS, PUT_OBJECT
MAX_DAMAGED = 32768  # chunk ids the damaged list keeps (1 MiB)


class ArchiveError(Exception):
    pass


def chunk_name(chunk_id):
    h = chunk_id.hex()
    return "chunks/%s/%s" % (h[:2], h)


def manifest_name(mid):
    return "manifests/" + mid.hex()


class Archive:
    def __init__(self, store):
        self.store = store
        self.codec = None
        self.chunk_size = None
        self.lease = Lease(store)
        self.stats = [0, 0, 0, 0]  # stored, deduplicated, bytes in, bytes stored
        # sealing is CPU work: the local store wants a thread per core (up to
        # 4), as many queued (more measured more CPU per byte on 2 cores, not
        # more speed); a store with latency wants more (open() sets them)
        self.writers = Workers(store.connections)
        self.writing = set()  # ids of chunks being stored right now
        self.batch, self.batch_bytes, self.checking = [], 0, None
        self.checker = ThreadPoolExecutor(1, "exists")
        self.readers = ThreadPoolExecutor(max(IN_FLIGHT, store.connections), "chunk-reader")
        self.window = IN_FLIGHT
        self._damaged, self.damaged_changed = None, False

    # -- creation and header ---------------------------------------------
    def init(self, header):
        if len(header) > MAX_HEADER:
            raise ArchiveError("header too large")
        # a folder holding only a header (and the lock and temporary files of
        # its writer) is an arch-init that was interrupted
        if any(name != HEADER_NAME and name.split(".")[0] != LOCK_NAME and TMP_SUFFIX not in name
               for name in self.store.list("")):
            raise ArchiveError("destination %s exists and is not empty" % self.store.location)
        self.store.make_root()
        self.store.write(HEADER_NAME, header, durable=True)

    def header(self):
        """The header's bytes, or None if there is no archive here."""
        try:
            data = self.store.read(HEADER_NAME)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if len(data) > MAX_HEADER:
            raise ArchiveError("archive header is too large")
        return data

    def put_header(self, header):
        """A new passphrase: the new header replaces the old in one atomic,
        durable write (every store's contract), so that exactly one of them
        is there whenever the agent dies.  It must be the same archive's: same magic
        and archive id (bytes 0-8 and 18-34, doc/FORMAT.md)."""
        self.require_lock()
        old = self.header()
        if len(header) > MAX_HEADER or header[:8] != old[:8] or header[18:34] != old[18:34]:
            raise ArchiveError("the new header is not this archive's")
        point("agent:before-header")
        self.store.write(HEADER_NAME, header, durable=True)
        point("agent:after-header")

    def open(self, codec, chunk_size):
        """The storage key and settings: objects can be sealed and opened.
        As many chunks are written at once as the store wants connections,
        and read at least IN_FLIGHT ahead, within MAX_IN_FLIGHT bytes."""
        self.codec, self.chunk_size = codec, chunk_size
        most = max(1, MAX_IN_FLIGHT // chunk_size)
        self.writers.count = min(self.store.connections, most)
        # a checked batch is queued whole, so that the request loop goes on
        # gathering the next one while the writers work through it
        self.writers.backlog = self.writers.count + min(BATCH, max(1, BATCH_BYTES // chunk_size))
        self.window = min(max(IN_FLIGHT, self.store.connections), most)

    # -- writer lock (lease.py) ----------------------------------------------
    def lock(self, owner, ttl, force):
        """Take the writer lock; returns (flags, previous holder)."""
        if not self.store.atomic_replace:
            raise ArchiveError("%s cannot replace objects atomically (an SFTP server without "
                               "posix-rename@openssh.com): the archive can be read there, not written" %
                               self.store.location)
        flags, holder = self.lease.take(owner, ttl, force)
        if self.store.size(GARBAGE_NAME) is not None:
            flags |= LOCK_GARBAGE
        return flags, holder

    def mark_garbage(self):
        """A prune or delete starts: whatever happens next, the next writer
        collects garbage (this marker goes when a collection completes)."""
        self.require_lock()
        self.store.write(GARBAGE_NAME, b"", durable=True)

    def unlock(self):
        self.lease.release()

    def require_lock(self):
        if self.lease.body is None:
            raise ArchiveError("a writer must hold the archive lock")

    # -- objects ------------------------------------------------------------
    def root(self):
        """The root's plaintext in parts, or None if there is no root yet."""
        try:
            source = self.store.open(ROOT_NAME)
        except FileNotFoundError:
            return None
        return self._parts(ROOT_NAME, source)

    def put_chunk(self, chunk_id, data):
        """Store a chunk unless it is there already.  New chunks gather in
        a batch whose existence one call checks (a round trip for the whole
        batch, made while the next batch gathers); compression, encryption
        and the writes happen on worker threads (they release the GIL)."""
        self.require_lock()
        self.damaged()
        with self.writers.mutex:
            self.stats[2] += len(data)
            duplicate = chunk_id in self.writing
            if not duplicate:
                self.writing.add(chunk_id)
        if duplicate:
            self._count(1, 0)
            return
        self.batch.append((chunk_name(chunk_id), chunk_id, data))
        self.batch_bytes += len(data)
        if len(self.batch) >= BATCH or self.batch_bytes >= BATCH_BYTES:
            self._check_batch()

    def _check_batch(self):
        """Start checking the gathered batch; store what the check before
        found missing."""
        checked, self.checking = self.checking, None
        if self.batch:
            self.checking = self.batch, self.checker.submit(self.store.sizes, [n for n, _c, _d in self.batch])
            self.batch, self.batch_bytes = [], 0
        if checked:
            batch, sizes = checked
            for (name, chunk_id, data), size in zip(batch, sizes.result()):
                # a hit: an object whose size fits the chunk, not found damaged
                if chunk_id not in self._damaged and self.codec.plausible(size, len(data)):
                    self._count(1, 0)
                    self._written(chunk_id)
                else:
                    self.writers.submit(self._store_chunk, name, chunk_id, data)

    def _store_chunk(self, name, chunk_id, data):
        try:
            sealed = self.codec.seal_parts(name, data)
            self.store.write(name, sealed)
            self._count(0, sum(map(len, sealed)))
            with self.writers.mutex:
                if chunk_id in self._damaged:  # stored again: repaired
                    self._damaged.discard(chunk_id)
                    self.damaged_changed = True
        finally:
            self._written(chunk_id)

    def _written(self, chunk_id):
        with self.writers.mutex:
            self.writing.discard(chunk_id)

    def _count(self, duplicate, stored_bytes):
        with self.writers.mutex:
            self.stats[1 if duplicate else 0] += 1
            self.stats[3] += stored_bytes

    def drain(self):
        """Wait for every chunk write; raise the first failure.  Chunks
        stored again leave the damaged list."""
        while self.batch or self.checking:
            self._check_batch()
        self.writers.drain()
        if self.damaged_changed:
            self._save_damaged()

    # -- chunks found missing or damaged -------------------------------------
    def damaged(self):
        """Ids of the chunks that reads and checks found missing or damaged
        (the ``damaged`` object), until a send stores them again."""
        if self._damaged is None:
            try:
                with self.store.open(DAMAGED_NAME) as f:
                    data = f.read(MAX_DAMAGED * 32)
            except OSError:  # none, or unreadable: start afresh
                data = b""
            self._damaged = {data[i:i + 32] for i in range(0, len(data) - 31, 32)}
        return self._damaged

    def note_damaged(self, ids):
        """Remember chunks found missing or damaged, so that dom0's next send
        stores them again.  Readers write this hint without the lock: a lost
        update only delays a repair, it never loses data."""
        known = self.damaged()
        new = list(dict.fromkeys(i for i in ids if i not in known))[:MAX_DAMAGED - len(known)]
        if new:
            known.update(new)
            self._save_damaged()

    def _save_damaged(self):
        self.damaged_changed = False
        with contextlib.suppress(OSError):  # read-only storage: the hint is lost, nothing else
            if self._damaged:
                self.store.write(DAMAGED_NAME, b"".join(sorted(self._damaged)))
            else:
                self.store.delete(DAMAGED_NAME)

    def get_chunks(self, ids):
        """The plaintext of each chunk, in order, or in its place the
        ArchiveError or ObjectError saying why not; the objects are read and
        opened up to ``window`` ahead, on threads."""
        return self._ahead(self._get_chunk, ids)

    def _ahead(self, fn, items):
        pending = collections.deque()
        for item in items:
            pending.append(self.readers.submit(fn, item))
            if len(pending) >= self.window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def _get_chunk(self, chunk_id):
        name = chunk_name(chunk_id)
        try:
            return self.codec.open(name, self._read(name, "chunk %s" % chunk_id.hex()), self.chunk_size)
        except (ArchiveError, ObjectError) as e:
            return e

    def _read(self, name, what):
        try:
            return self.store.read(name)
        except FileNotFoundError:
            raise ArchiveError("%s is missing" % what) from None

    def put_manifest(self, mid, parts):
        self.require_lock()
        name = manifest_name(mid)
        self.store.write(name, self.codec.seal_stream(name, parts))

    def get_manifest(self, mid):
        name = manifest_name(mid)
        try:
            source = self.store.open(name)
        except FileNotFoundError:
            raise ArchiveError("manifest %s is missing" % mid.hex()) from None
        return self._parts(name, source)

    def _parts(self, name, source):
        with source:
            yield from self.codec.open_stream(name, source, PART)

    def put_root(self, parts):
        """Commit: make every object written so far durable, then replace
        the root atomically.  A crash before the rename leaves the old root."""
        self.require_lock()
        self.drain()
        if self.store.needs_sync:
            self.store.sync()
        sealed = list(self.codec.seal_stream(ROOT_NAME, parts))
        point("agent:before-root")
        self.lease.confirm()  # a writer that lost the lock must not replace the root
        self.store.write(ROOT_NAME, sealed, durable=True)
        point("agent:after-root")

    # -- copying sealed objects between archives (arch-copy) ---------------------
    def _object_name(self, kind, oid):
        return chunk_name(oid) if kind == CHUNK else manifest_name(oid)

    def have(self, kind, ids):
        """Which of these objects are stored: one bit each, in one call."""
        bits = bytearray((len(ids) + 7) // 8)
        for i, size in enumerate(self.store.sizes([self._object_name(kind, oid) for oid in ids])):
            if _plausible(size):
                bits[i // 8] |= 1 << (i % 8)
        return bytes(bits)

    def get_objects(self, kind, ids):
        """Each object's stored bytes as a list of parts (ArchiveError in
        place of a missing one); chunks are read ahead on threads."""
        if kind == CHUNK:
            return self._ahead(self._raw_chunk, ids)
        return (self._raw_manifest(oid) for oid in ids)

    def _raw_chunk(self, oid):
        name = self._object_name(CHUNK, oid)
        try:
            blob = self._read(name, "chunk %s" % oid.hex())
        except ArchiveError as e:
            return e
        return [blob[i:i + PART] for i in range(0, len(blob), PART)]

    def _raw_manifest(self, oid):
        try:
            source = self.store.open(self._object_name(MANIFEST, oid))
        except FileNotFoundError:
            return ArchiveError("manifest %s is missing" % oid.hex())
        return _read_parts(source)

    def put_object(self, kind, oid, parts):
        """Store an object copied as it was sealed, once it opened with this
        archive's key under its name (a chunk on a writer thread)."""
        self.require_lock()
        name = self._object_name(kind, oid)
        if kind == MANIFEST:
            self.store.write(name, self.codec.checked(name, parts, PART))
            return
        blob = bytearray()
        for part in parts:
            blob += part
            if len(blob) > 2 * self.chunk_size + PART:  # far beyond any sealed chunk: memory stays bounded
                raise ArchiveError("copied chunk %s is too large" % oid.hex())
        self.writers.submit(self._copy_chunk, name, bytes(blob))

    def _copy_chunk(self, name, blob):
        self.codec.open(name, blob, self.chunk_size)
        self.store.write(name, blob)
        self._count(0, len(blob))


def _plausible(size):
    """A stored object this size may be whole (a dedup hit): see doc/decisions.md."""
    return size is not None and size >= MIN_OBJECT


def _read_parts(source):
    with source:
        yield from iter(lambda: source.read(PART), b"")


class Workers:
    """A few threads and a bounded backlog, so memory stays a few chunks."""

    def __init__(self, count):
        self.count, self.backlog = count, 2 * count
        self.mutex = threading.Lock()
        self.done = threading.Condition(self.mutex)
        self.running = 0
        self.failure = None
        self.threads = []
        self.queue = []

    def submit(self, fn, *args):
        with self.done:
            while self.running >= self.backlog and not self.failure:
                self.done.wait()
            self._raise()
            self.running += 1
            self.queue.append((fn, args))
            if len(self.threads) < self.count:
                thread = threading.Thread(target=self._work, daemon=True)
                self.threads.append(thread)
                thread.start()
            self.done.notify_all()

    def _work(self):
        while True:
            with self.done:
                while not self.queue:
                    self.done.wait()
                fn, args = self.queue.pop(0)
            try:
                fn(*args)
            except BaseException as e:  # reported to the request loop
                with self.done:
                    self.failure = self.failure or e
            with self.done:
                self.running -= 1
                self.done.notify_all()

    def drain(self):
        with self.done:
            while self.running and not self.failure:
                self.done.wait()
            self._raise()

    def settle(self, timeout=30):
        """After a failure: let the writes in flight end (each removes its
        temporary file if it fails), so that none is cut off at exit."""
        deadline = time.monotonic() + timeout
        with self.done:
            while self.running and time.monotonic() < deadline:
                self.done.wait(deadline - time.monotonic())

    def _raise(self):
        if self.failure:
            raise self.failure
