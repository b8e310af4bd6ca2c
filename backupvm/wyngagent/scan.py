"""Walking every chunk that a list of manifests uses: garbage collection,
arch-check and dedup figures (SCAN in doc/PROTOCOL.md, design in
doc/lifecycle.md), in memory bounded independently of the archive's size.

Pass 1 reads each manifest dom0 named and appends a (chunk id, manifest
number) record per entry to one of 256 bucket files on local disk, by the
id's first byte (chunk folders are cut the same way).  Pass 2 takes one
bucket at a time, in slices of at most SLICE records (split by the id's
second byte when a bucket is larger), sorts the slice and walks it beside
the matching chunk folder: an id without an object is missing, an object
without a record is unused.  Unused chunks are removed (CLEAN) only after
the walk, and only if every manifest ended in the MAC the root records for
it (dom0 sends its first 16 bytes) and every chunk they list is there:
otherwise the lists themselves may be wrong and no chunk is removed (and
while a manifest cannot be read or is not the root's, nothing at all).
"""
import contextlib
import fcntl
import itertools
import os
import shutil
import struct
import tempfile
import time

from .archive import GARBAGE_NAME, IN_FLIGHT, MAX_DAMAGED, ArchiveError, Workers, chunk_name, manifest_name
from .hooks import point
from .objects import ObjectError

OBJECTS, WHOLE, CLEAN, SIZES = 1, 2, 4, 8
(BAD_MANIFEST, MISSING, DAMAGED, UNUSED_CHUNKS, UNUSED_MANIFESTS, LEFTOVERS, GROUP,
 TOTAL, REMOVED) = range(1, 10)
RECORD = struct.Struct(">32sI")  # chunk id, manifest number
REPORT = struct.Struct(">BIQQQ")  # kind, index, three counts
MANIFEST_HEAD, ENTRY, MAC = 120, struct.Struct(">Q32s"), 32
ZERO = bytes(32)
SLICE = 1 << 18  # records sorted at once: about 25 MB
DELETERS = 8  # unused chunks are looked at and removed by a few threads (I/O bound)
SIZE_BATCH = 1024  # chunks whose sizes one call asks for
TMP = ".tmp-"
SCRATCH = "wyng-scan-"  # prefix of the temporary folders


class Scan:
    def __init__(self, archive, mode, manifests, groups):
        self.archive, self.store, self.mode = archive, archive.store, mode
        self.manifests, self.groups = manifests, groups
        n, g = len(manifests), max(groups, default=-1) + 1
        self.bad, self.missing, self.damaged = set(), [0] * n, [0] * n
        self.group = [[0, 0, 0] for _ in range(g)]  # references, distinct chunks, stored bytes
        self.total = [0, 0, 0]  # distinct chunks, stored bytes, chunks opened
        self.unused, self.unused_manifests, self.leftovers, self.removed = [0, 0], 0, 0, [0, 0]
        self.lost = []  # ids of chunks missing or damaged (the first MAX_DAMAGED): the damaged list
        self.deleters = Workers(DELETERS)
        # OBJECTS: chunks read and opened at once (and as many queued); more for a store with latency
        self.openers = Workers(max(IN_FLIGHT // 2, archive.writers.count))

    def run(self):
        with scratch() as tmp:
            counts = self._distribute(tmp)
            # a manifest that cannot be read, or is not the one the root names, may list
            # any object: remove nothing at all then (leftovers are met in the buckets too)
            self.may_delete = self.mode & CLEAN and self.mode & WHOLE and not self.bad
            with open(os.path.join(tmp, "unused"), "w+b") as self.unused_ids:
                for b in range(256):
                    if self.mode & CLEAN:  # a writer that lost the lock deletes nothing more
                        self.archive.lease.confirm()
                    self._bucket(os.path.join(tmp, "%02x" % b), b, counts[b])
                    if b == 127:
                        point("agent:scan-half")
                self.openers.drain()
                self.deleters.drain()
                self.archive.note_damaged(self.lost)
                # a listed chunk that is missing may be a damaged id: remove no chunk then
                chunks = self.may_delete and not any(self.missing)
                if chunks:
                    self.archive.lease.confirm()
                    self._remove_unused()
        if self.mode & WHOLE:
            self._manifests_and_leftovers()
        if chunks:
            self.archive.lease.confirm()
            point("agent:before-garbage-removed")
            self.store.delete(GARBAGE_NAME)
            point("agent:after-garbage-removed")
        return self.report()

    # -- pass 1 ------------------------------------------------------------
    def _distribute(self, tmp):
        files = [open(os.path.join(tmp, "%02x" % b), "wb", buffering=1 << 15) for b in range(256)]
        counts = [0] * 256
        try:
            for n, (mid, mac) in enumerate(self.manifests):
                number = struct.pack(">I", n)
                try:
                    for cid in self._ids(mid, mac):
                        files[cid[0]].write(cid + number)
                        counts[cid[0]] += 1
                except (ArchiveError, ObjectError):
                    self.bad.add(n)
        finally:
            for f in files:
                f.close()
        return counts

    def _ids(self, mid, mac):
        """The non-zero chunk ids a manifest lists (layout: doc/FORMAT.md);
        its MAC must begin with ``mac`` (dom0's record), so that another
        manifest in its place (an older one, another archive's: the agent
        cannot check a MAC, but can compare it) is not taken for it."""
        buf, count, seen = bytearray(), None, 0
        for part in self.archive.get_manifest(mid):
            buf += part
            if count is None:
                if len(buf) < MANIFEST_HEAD:
                    continue
                count = struct.unpack_from(">Q", buf, 80)[0]
                del buf[:MANIFEST_HEAD]
            whole = min(len(buf) // ENTRY.size, count - seen) * ENTRY.size
            for _index, cid in ENTRY.iter_unpack(bytes(buf[:whole])):
                if cid != ZERO:
                    yield cid
            del buf[:whole]
            seen += whole // ENTRY.size
        if count is None or seen != count or len(buf) != MAC or bytes(buf[:len(mac)]) != mac:
            raise ObjectError("manifest %s is malformed, or not the one the root names" % mid.hex())

    # -- pass 2 ------------------------------------------------------------
    def _bucket(self, path, b, count):
        slices = min(256, max(1, -(-count // SLICE)))
        for j in range(slices):
            low, high = 256 * j // slices, 256 * (j + 1) // slices
            refs = self._records(path, low, high)
            present = self._present(b, low, high, first=j == 0) if self.mode & WHOLE else None
            self._compare(refs, present)
            for cid in present or ():
                self._unused(cid)

    def _records(self, path, low, high):
        refs = []
        with open(path, "rb", buffering=0) as f:
            while True:
                block = f.read(RECORD.size * 4096)
                if not block:
                    break
                refs.extend(block[i:i + RECORD.size] for i in range(0, len(block), RECORD.size)
                            if low <= block[i + 1] < high)
        refs.sort()
        return refs

    def _present(self, b, low, high, first):
        """Ids of the chunk objects stored in this slice; leftovers of
        interrupted writes are counted (and removed) on the first slice."""
        present = set()
        for name in self.store.list("chunks/%02x" % b):
            base = name.rsplit("/", 1)[-1]
            try:
                cid = bytes.fromhex(base) if len(base) == 64 else None
            except ValueError:
                cid = None
            if cid is None:
                if first:
                    self._leftover(name)
            elif low <= cid[1] < high:
                present.add(cid)
        return present

    def _compare(self, refs, present):
        sizes = self._sizes(refs) if present is None or self.mode & SIZES else itertools.repeat(0)
        i = 0
        while i < len(refs):
            cid, users = refs[i][:32], set()
            while i < len(refs) and refs[i][:32] == cid:
                n = RECORD.unpack(refs[i])[1]
                users.add(n)
                if self.mode & SIZES:
                    self.group[self.groups[n]][0] += 1
                i += 1
            name, size = chunk_name(cid), next(sizes)
            stored = cid in present if present is not None else size is not None
            if not stored:
                self._lost(cid, users, self.missing)
                continue
            if present is not None:
                present.discard(cid)
            if self.mode & OBJECTS:
                self.openers.submit(self._open, name, cid, users)
            if self.mode & SIZES:
                self.total[0] += 1
                self.total[1] += size or 0
                for g in {self.groups[n] for n in users}:
                    self.group[g][1] += 1
                    self.group[g][2] += size or 0

    def _sizes(self, refs):
        """The stored size of each distinct chunk of ``refs``, in order,
        asked for in batches (a round trip each over a network)."""
        ids = (r[:32] for i, r in enumerate(refs) if i == 0 or refs[i - 1][:32] != r[:32])
        for batch in iter(lambda: list(itertools.islice(ids, SIZE_BATCH)), []):
            yield from self.store.sizes([chunk_name(cid) for cid in batch])

    def _lost(self, cid, users, counts):
        for n in users:
            counts[n] += 1
        if len(self.lost) < MAX_DAMAGED:
            self.lost.append(cid)

    def _open(self, name, cid, users):
        """On a worker thread: open a chunk; count it damaged for its users
        if it fails to."""
        try:
            self.archive.codec.open(name, self.store.read(name), self.archive.chunk_size)
            sound = True
        except (ObjectError, OSError):
            sound = False
        with self.openers.mutex:
            self.total[2] += 1
            if not sound:
                self._lost(cid, users, self.damaged)

    def _unused(self, cid):
        self.unused_ids.write(cid)
        self.deleters.submit(self._count, chunk_name(cid), self.unused)

    def _count(self, name, figures, remove=False):
        """On a worker thread: add an unused chunk to ``figures`` (count,
        bytes), removing it first if asked."""
        size = self.store.size(name) or 0
        if remove:
            self.archive.lease.valid()
            self.store.delete(name)
        with self.deleters.mutex:
            figures[0] += 1
            figures[1] += size

    def _remove_unused(self):
        self.unused_ids.seek(0)
        for block in iter(lambda: self.unused_ids.read(32 << 12), b""):
            for i in range(0, len(block), 32):
                self.deleters.submit(self._count, chunk_name(block[i:i + 32]), self.removed, True)
        self.deleters.drain()

    def _leftover(self, name):
        self.leftovers += 1
        if self.may_delete:
            self._remove(name)

    def _remove(self, name):
        self.archive.lease.valid()
        self.removed[1] += self.store.size(name) or 0
        self.store.delete(name)
        self.removed[0] += 1

    def _manifests_and_leftovers(self):
        live = {manifest_name(mid) for mid, _mac in self.manifests}
        for name in list(self.store.list("manifests")):
            if TMP in name:
                self._leftover(name)
            elif name not in live:
                self.unused_manifests += 1
                if self.may_delete:
                    self._remove(name)
        for name in list(self.store.list("", recursive=False)):
            if TMP in name or self.archive.lease.debris(name):
                self._leftover(name)

    def report(self):
        out = [REPORT.pack(BAD_MANIFEST, n, 1, 0, 0) for n in sorted(self.bad)]
        for n in range(len(self.manifests)):
            if self.missing[n]:
                out.append(REPORT.pack(MISSING, n, self.missing[n], 0, 0))
            if self.damaged[n]:
                out.append(REPORT.pack(DAMAGED, n, self.damaged[n], 0, 0))
        if self.mode & WHOLE:
            out += [REPORT.pack(UNUSED_CHUNKS, 0, self.unused[0], self.unused[1], 0),
                    REPORT.pack(UNUSED_MANIFESTS, 0, self.unused_manifests, 0, 0),
                    REPORT.pack(LEFTOVERS, 0, self.leftovers, 0, 0)]
        if self.mode & SIZES:
            out += [REPORT.pack(GROUP, g, *fig) for g, fig in enumerate(self.group)]
        out.append(REPORT.pack(TOTAL, 0, *self.total))
        if self.mode & CLEAN:
            out.append(REPORT.pack(REMOVED, 0, self.removed[0], self.removed[1], 0))
        return out


@contextlib.contextmanager
def scratch():
    """A private temporary folder for one scan's bucket files.  Its owner
    holds a lock on ``.owner`` inside while it works, so that ``sweep`` in
    a later agent can tell a killed agent's folder from one in use."""
    tmp = tempfile.mkdtemp(prefix=SCRATCH)
    try:
        with open(os.path.join(tmp, ".owner-new"), "wb") as owner:
            fcntl.flock(owner, fcntl.LOCK_EX)
            os.rename(owner.name, os.path.join(tmp, ".owner"))
            yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sweep():
    """At agent start: remove the scan folders of agents that were killed
    (their ``.owner`` is unlocked, or missing for an hour)."""
    top = tempfile.gettempdir()
    for entry in os.scandir(top):
        if not entry.name.startswith(SCRATCH) or not entry.is_dir(follow_symlinks=False) or \
                entry.stat(follow_symlinks=False).st_uid != os.geteuid():
            continue
        try:
            fd = os.open(os.path.join(entry.path, ".owner"), os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            if time.time() - entry.stat(follow_symlinks=False).st_mtime > 3600:
                shutil.rmtree(entry.path, ignore_errors=True)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # in use
        finally:
            os.close(fd)
        shutil.rmtree(entry.path, ignore_errors=True)
