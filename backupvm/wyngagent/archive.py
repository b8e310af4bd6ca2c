"""The archive as the agent keeps it: named objects in a store.

Layout (doc/FORMAT.md): ``header`` (opaque to the agent, written by dom0),
``archive`` (the root), ``manifests/<32 hex>``, ``chunks/<2 hex>/<64 hex>``,
``lock``.  Chunk data is never rewritten; the root is written last in every
mutation, after everything it refers to is durable.
"""
import collections
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from .hooks import point
from .lease import LOCK_NAME, Lease
from .objects import MAGIC, ObjectError
from .storage.local import TMP_SUFFIX

HEADER_NAME, ROOT_NAME, GARBAGE_NAME = "header", "archive", "garbage"
LOCK_GARBAGE = 1  # a flag of LOCK's reply; lease.py has the others
MAX_HEADER = 64 << 10
PART = 1 << 20  # plaintext per segment of manifests and the root
# an object shorter than this cannot be a sealed chunk: a crash left it
MIN_OBJECT = len(MAGIC) + 1 + 4 + 1
# chunk objects being read and opened, or sealed and written, at once: the
# store's I/O, the AEAD and zstd release the GIL, so they use every core,
# and a store with latency has that many requests waiting (doc/PROTOCOL.md)
IN_FLIGHT = 8


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
        # sealing is CPU work: a thread per core (up to 4), as many queued;
        # more threads measured more CPU per byte on 2 cores, not more speed
        self.writers = Workers(min(IN_FLIGHT // 2, os.cpu_count() or 1))
        self.writing = set()  # ids of chunks being stored right now
        self.readers = None  # made by the first get_chunks

    # -- creation and header ---------------------------------------------
    def init(self, header):
        if len(header) > MAX_HEADER:
            raise ArchiveError("header too large")
        # a folder holding only a header (and the lock and temporary files of
        # its writer) is an arch-init that was interrupted
        if any(name != HEADER_NAME and name.split(".")[0] != LOCK_NAME and TMP_SUFFIX not in name
               for name in self.store.list("")):
            raise ArchiveError("destination %s exists and is not empty" % self.store.root)
        self.store.make_root()
        self.store.write(HEADER_NAME, header, durable=True)

    def header(self):
        try:
            data = self.store.read(HEADER_NAME)
        except FileNotFoundError:
            raise ArchiveError("no archive at %s" % self.store.root) from None
        except NotADirectoryError:
            raise ArchiveError("no archive at %s (not a directory)" % self.store.root) from None
        if len(data) > MAX_HEADER:
            raise ArchiveError("archive header is too large")
        return data

    def open(self, codec, chunk_size):
        self.codec, self.chunk_size = codec, chunk_size

    # -- writer lock (lease.py) ----------------------------------------------
    def lock(self, owner, ttl, force):
        """Take the writer lock; returns (flags, previous holder)."""
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
        """Store a chunk unless it is there already; compression, encryption
        and the write happen on worker threads (they release the GIL)."""
        self.require_lock()
        name = chunk_name(chunk_id)
        with self.writers.mutex:
            self.stats[2] += len(data)
            duplicate = chunk_id in self.writing
            if not duplicate:
                self.writing.add(chunk_id)
        if duplicate:
            self._count(1, 0)
            return
        self.writers.submit(self._store_chunk, name, chunk_id, data)

    def _store_chunk(self, name, chunk_id, data):
        try:
            size = self.store.size(name)
            if size is not None and size >= MIN_OBJECT:
                self._count(1, 0)
                return
            sealed = self.codec.seal(name, data)
            self.store.write(name, sealed)
            self._count(0, len(sealed))
        finally:
            with self.writers.mutex:
                self.writing.discard(chunk_id)

    def _count(self, duplicate, stored_bytes):
        with self.writers.mutex:
            self.stats[1 if duplicate else 0] += 1
            self.stats[3] += stored_bytes

    def drain(self):
        """Wait for every chunk write; raise the first failure."""
        self.writers.drain()

    def get_chunk(self, chunk_id):
        name = chunk_name(chunk_id)
        try:
            blob = self.store.read(name)
        except FileNotFoundError:
            raise ArchiveError("chunk %s is missing" % chunk_id.hex()) from None
        return self.codec.open(name, blob, self.chunk_size)

    def get_chunks(self, ids):
        """Yield, in the order of ``ids``, each chunk's plaintext or the
        ArchiveError or ObjectError that opening it raised.  Up to IN_FLIGHT
        chunks are read and opened ahead on worker threads, so memory is
        that many chunks whatever the number of ids."""
        if self.readers is None:
            self.readers = ThreadPoolExecutor(IN_FLIGHT, "chunk-reader")
        pending = collections.deque()
        for chunk_id in ids:
            pending.append(self.readers.submit(self._get_or_error, chunk_id))
            if len(pending) >= IN_FLIGHT:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def _get_or_error(self, chunk_id):
        try:
            return self.get_chunk(chunk_id)
        except (ArchiveError, ObjectError) as e:
            return e

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
        self.store.sync()
        sealed = list(self.codec.seal_stream(ROOT_NAME, parts))
        point("agent:before-root")
        self.lease.confirm()  # a writer that lost the lock must not replace the root
        self.store.write(ROOT_NAME, sealed, durable=True)
        point("agent:after-root")



class Workers:
    """A few threads and a bounded backlog, so memory stays a few chunks."""

    def __init__(self, count):
        self.count = count
        self.mutex = threading.Lock()
        self.done = threading.Condition(self.mutex)
        self.running = 0
        self.failure = None
        self.threads = []
        self.queue = []

    def submit(self, fn, *args):
        with self.done:
            while self.running >= 2 * self.count and not self.failure:
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
