"""dom0's side of one archive connection: authenticate, read, commit.

Order of a connection (doc/PROTOCOL.md): HELLO, GET_HEADER, unlock the
master key, OPEN (hand the agent K_enc), LOCK for writers, GET_ROOT and
check its MAC and that it is not older than the last root seen.  Nothing
from the agent is used before its MAC or chunk id matched.
"""
import collections
import contextlib
import hashlib
import itertools
import os
import struct
from concurrent.futures import ThreadPoolExecutor

from . import keys as K
from . import manifest, wire
from .clock import now, point
from .errors import Fail
from .formats import MAX_ROOT, Header, new_root, open_root, seal_root
from .manifest import ChunkMap, Head
from .meta import Meta, write_atomic
from .progress import notice
from .transport import parse_dest, start

LOCK_TTL = 120
MAX_SCAN = 110000  # manifests in one SCAN request (36-byte items in a 4 MiB frame)
FETCH_BATCH = 256
AHEAD = 8  # chunks whose ids a worker thread computes ahead of their use
# SCAN modes and record kinds (doc/PROTOCOL.md)
SCAN_OBJECTS, SCAN_WHOLE, SCAN_CLEAN, SCAN_SIZES = 1, 2, 4, 8
(BAD_MANIFEST, MISSING, DAMAGED, UNUSED_CHUNKS, UNUSED_MANIFESTS, LEFTOVERS, GROUP,
 TOTAL, REMOVED) = range(1, 10)


class Archive(contextlib.AbstractContextManager):
    def __init__(self, opts, app=None, dest=None):
        self.opts, self.dest = opts, dest or opts.dest
        self.transport, url = start(self.dest, app)
        # which archive dom0 found at this destination (qube, storage URL) is remembered here
        self.binding = os.path.join(opts.meta_dir, "destinations",
                                    hashlib.sha256(repr(parse_dest(self.dest)).encode()).hexdigest())
        self.link = wire.Link(self.transport)
        reply = self.link.call(wire.HELLO, struct.pack(">H", wire.PROTOCOL_VERSION), url.encode(), limit=64)
        if len(reply) < 2 or struct.unpack(">H", reply[:2])[0] != wire.PROTOCOL_VERSION:
            raise wire.AgentError("the agent speaks another protocol version")

    # -- creating and opening ----------------------------------------------
    def create(self, header, passphrase):
        master = os.urandom(32)
        self.link.call(wire.INIT, header.seal(passphrase, master))
        point("dom0:init-header")
        self._start(header, master)
        write_atomic(self.binding, header.archive_id.hex().encode())
        self.lock()
        self.root = new_root(header.archive_id, now())
        self.commit()

    def open(self, write=False):
        """Authenticate and read the root (``write``: under the lock); on
        failure the connection is closed, so the agent lets the lock go."""
        try:
            self.link.send(wire.GET_HEADER)
            op, self.raw_header = self.link.frame((wire.DATA, wire.NONE), 4096)
            if op == wire.NONE:
                raise Fail("no archive at %s" % self.dest)
            header = Header.parse(self.raw_header)
            bound = self._bound(header.archive_id)
            master = K.cached_master(header.archive_id, self.opts.authmin)
            if master is None or not bound:  # the cache serves only the archive --dest is known to hold
                master = header.unlock(K.read_passphrase(self.opts))
            self._start(header, master, check=True)
            if not bound:
                write_atomic(self.binding, header.archive_id.hex().encode())
            garbage = write and self.lock()
            self._load_root()
            if garbage:
                notice(self.opts, "finishing an interrupted prune or delete: removing what no session uses")
                self.collect()
        except BaseException:
            self.close()
            raise
        with contextlib.suppress(OSError):  # no tmpfs to remember it in: ask again next time
            K.store_master(header.archive_id, master, self.opts.authmin)
        return self

    def _bound(self, archive_id):
        """Whether --dest held this archive before (False: first contact).
        Another archive there is refused: storage that swaps one archive
        for another must not get its data restored or its key used."""
        try:
            with open(self.binding) as f:
                seen = f.read(64)
        except FileNotFoundError:
            return False
        if seen != archive_id.hex() and not self.opts.force_other_archive:
            raise Fail("%s holds another archive than the one seen there before (was it swapped?); "
                       "--force-other-archive accepts it" % self.dest)
        return seen == archive_id.hex()

    def _start(self, header, master, check=False):
        """Derive the keys and hand the agent its storage key (only after
        the header's settings proved authentic)."""
        self.header, self.master, self.keys = header, master, K.Keys(master, header.archive_id)
        if check:
            header.check(self.keys)
        self.chunk_size = header.chunk_size
        self.meta = Meta(self.opts.meta_dir, header.archive_id)
        self.link.call(wire.OPEN, wire.OPEN_ARGS.pack(header.cipher, header.compression, header.level,
                                                      header.chunk_size), self.keys.enc)

    def lock(self):
        """Take the writer lock.  The agent's reply says whose lock --force
        took over, and whether a prune or delete left garbage (returned: a
        hint, collecting it is always safe)."""
        owner = ("qvm-wyng %s" % self.opts.command).encode()
        reply = self.link.call(wire.LOCK, struct.pack(">IB", LOCK_TTL, bool(self.opts.force)), owner, limit=1 + 300)
        flags = reply[0] if reply else 0
        if flags & wire.LOCK_FORCED:
            notice(self.opts, "warning: --force took over the archive lock held by %s" % wire.printable(reply[1:]))
        return bool(flags & wire.LOCK_GARBAGE)

    def _fetch_root(self):
        """(root, MAC) from the agent, the MAC checked; None if it has none."""
        self.link.send(wire.GET_ROOT)
        op, data = self.link.frame((wire.DATA, wire.END, wire.NONE), wire.PART)
        if op == wire.NONE:
            return None
        self.root_blob = data + b"".join(self.link.parts(MAX_ROOT - len(data)) if op == wire.DATA else ())
        return open_root(self.keys, self.root_blob, self.header.archive_id)

    def _load_root(self):
        found = self._fetch_root()
        if found is None:
            raise Fail("the archive has no root: it is damaged, or arch-init was interrupted")
        self.root, mac = found
        seen = self.meta.last_seen()
        if not seen:  # a new dom0, or one restoring after a disaster: say what it trusts
            newest = max((s["name"] for v in self.root["volumes"] for s in v["sessions"]), default="(none)")
            notice(self.opts, "first contact: dom0 has no earlier root of this archive to check it against; "
                   "trusting root #%d, newest session %s" % (self.root["seq"], newest))
        if seen and not self.opts.force_allow_rollback:
            if self.root["seq"] < seen[0]:
                raise Fail("the archive was rolled back: its root is #%d, but #%d was seen before "
                           "(--force-allow-rollback accepts it)" % (self.root["seq"], seen[0]))
            if self.root["seq"] == seen[0] and mac != seen[1]:
                raise Fail("the archive root differs from the one seen before with the same number")
        if not seen or self.root["seq"] > seen[0] or self.opts.force_allow_rollback:
            self.meta.save_seen(self.root["seq"], mac)

    # -- volumes and sessions --------------------------------------------------
    def volume(self, name):
        return next((vol for vol in self.root["volumes"] if vol["name"] == name), None)

    def require_volume(self, name):
        vol = self.volume(name)
        if vol is None:
            raise Fail("volume %r is not in the archive" % name)
        return vol

    def add_volume(self, name):
        vol = {"id": os.urandom(16).hex(), "name": name, "sessions": []}
        self.root["volumes"].append(vol)
        self.root["volumes"].sort(key=lambda v: v["name"])
        return vol

    def chunk_map(self, vol, upto=None, cached=False):
        """The verified map of ``vol`` at session index ``upto`` (newest if
        None), merged from its manifest chain.  With ``cached`` (send) dom0's
        copy of the newest map is used when it matches the root; receive and
        verify always read the chain, so they also prove the archive holds it."""
        sessions = vol["sessions"]
        upto = len(sessions) - 1 if upto is None else upto
        if upto < 0:
            return ChunkMap()
        head_mac = bytes.fromhex(sessions[upto]["mac"])
        if cached:
            found = self.meta.load_map(vol["id"], head_mac)
            if found is not None:
                return found
        chunk_map = ChunkMap()
        for i, ses in enumerate(sessions[:upto + 1]):
            chunk_map.resize(manifest.chunk_count(ses["size"], self.chunk_size))
            for first, ids in self.read_manifest(vol, i):  # runs below the session's count (manifest.read)
                chunk_map[first] = ids
        if upto == len(sessions) - 1:
            self.meta.save_map(vol["id"], head_mac, chunk_map)
        return chunk_map

    def read_manifest(self, vol, index):
        """The verified entries of session ``index`` of ``vol``, in runs
        (manifest.read; manifest.entries takes them apart): its header
        must match where the root puts it (volume, name, size, the previous
        session's name) and its MAC the root's record.  If checking fails
        early, the rest of the stream is read, so the link stays usable."""
        sessions = vol["sessions"]
        ses = sessions[index]
        parent = sessions[index - 1]["name"] if index else ""
        expect = Head(self.chunk_size, self.header.archive_id, bytes.fromhex(vol["id"]),
                      ses["name"], 0, ses["size"], 0, parent)
        self.link.send(wire.GET_MANIFEST, bytes.fromhex(ses["manifest"]))
        # 40 bytes per entry, at most one entry per chunk
        limit = manifest.HEAD.size + 40 * manifest.chunk_count(ses["size"], self.chunk_size) + 32
        parts = self.link.parts(limit)
        try:
            yield from manifest.read(self.keys, parts, bytes.fromhex(ses["mac"]), expect)
        except wire.AgentError as e:  # the link may be broken: no draining, but say which manifest
            raise type(e)("manifest of %s: %s" % (ses["name"], e)) from None
        except Fail:
            for _part in parts:
                pass
            raise

    def write_manifest(self, vol, ses, parent, ids, listed):
        """Store a manifest for the session record ``ses`` (name, time, size
        and tags set) after session ``parent`` ("" for none), listing the
        chunks of the ChunkMap ``ids`` whose bits are set in ``listed``.
        Fills in the record's manifest name, MAC and count; the caller puts
        it in the root."""
        mid = os.urandom(16)
        count = manifest.count_set(listed)
        head = Head(self.chunk_size, self.header.archive_id, bytes.fromhex(vol["id"]),
                    ses["name"], ses["time"], ses["size"], count, parent)
        last = self.link.send_stream(wire.PUT_MANIFEST, mid, manifest.encode(self.keys, head, ids, listed))
        ses.update(manifest=mid.hex(), mac=last[-32:].hex(), changed=count)
        point("dom0:after-manifest")
        return ses

    def put_header(self, blob):
        """Replace the header (arch-passphrase); the agent does it atomically."""
        point("dom0:before-header")
        self.link.call(wire.PUT_HEADER, blob)
        point("dom0:after-header")

    def put_chunk(self, cid, data):
        if not self.opts.dry_run:
            self.link.send(wire.PUT_CHUNK, cid, data)

    def fetch(self, wanted):
        """Yield (index, data) for ``wanted`` (index, id, length), in order;
        each chunk is checked against its id before it is yielded (the ids
        are computed on a worker while the next chunks are read).  A second
        batch is asked for before the first is read, so the agent never waits."""
        with contextlib.closing(self._received(wanted)) as received:
            for (index, cid, data), good in ahead(lambda item: self.keys.chunk_id(item[2]) == item[1], received):
                if not good:
                    raise Fail("chunk %d fails authentication: the archive returned other data" % index)
                yield index, data

    def _received(self, wanted):
        """(index, id, data) of the right length, unchecked.  Closed early (a
        chunk failed, or the caller stopped), it reads and drops the replies
        still due, so that the link can serve the next volume."""
        wanted, pending = iter(wanted), collections.deque()
        try:
            for batch in iter(lambda: collections.deque(itertools.islice(wanted, FETCH_BATCH)), collections.deque()):
                self.link.send(wire.GET_CHUNKS, b"".join(cid for _i, cid, _n in batch))
                pending.append(batch)
                if len(pending) == 2:
                    yield from self._receive(pending)
            while pending:
                yield from self._receive(pending)
        except (Fail, GeneratorExit) as e:
            for _i, _cid, length in () if isinstance(e, wire.LinkBroken) else itertools.chain(*pending):
                with contextlib.suppress(wire.AgentError):  # an ERR for a missing chunk
                    self.link.frame((wire.DATA,), length)
            raise

    def _receive(self, pending):
        """The chunks of the first pending batch, each taken off it as read."""
        batch = pending[0]
        while batch:
            index, cid, length = batch.popleft()
            try:
                data = self.link.frame((wire.DATA,), length)[1]
            except wire.AgentError as e:
                raise Fail("chunk %d: %s" % (index, e)) from None
            if len(data) != length:
                raise Fail("chunk %d fails authentication: the archive returned other data" % index)
            yield index, cid, data
        pending.popleft()

    # -- committing ----------------------------------------------------------
    def commit(self):
        """Write the root; everything it refers to is stored first."""
        self.root["seq"] += 1
        self.root["time"] = now()
        blob = seal_root(self.keys, self.root)
        point("dom0:before-root")
        self._put_root(blob)
        self.meta.save_seen(self.root["seq"], blob[-32:])
        point("dom0:after-root")

    def _put_root(self, blob):
        self.link.send_stream(wire.PUT_ROOT, b"", (blob[i:i + wire.PART] for i in range(0, len(blob), wire.PART)))
        self._stats_reply()

    # -- arch-copy: this archive is the destination ------------------------------
    def adopt(self, src):
        """Make this destination a copy of ``src``'s archive: its header if
        empty, else it must hold the same archive, with a root no newer than
        src's.  Locks it; returns whether it had a root (garbage may follow)."""
        self.link.send(wire.GET_HEADER)
        op, raw = self.link.frame((wire.DATA, wire.NONE), 4096)
        if op == wire.NONE:
            self.link.call(wire.INIT, src.raw_header)
        self._start(src.header, src.master)
        if op == wire.DATA:
            theirs = Header.parse(raw)
            if theirs.archive_id != src.header.archive_id:
                raise Fail("%s holds another archive: arch-copy copies to an empty place or a copy" % self.dest)
            theirs.check(self.keys)
        write_atomic(self.binding, src.header.archive_id.hex().encode())
        self.lock()
        found, seq = self._fetch_root(), src.root["seq"]
        if found and not self.opts.force_allow_rollback and (
                found[0]["seq"] > seq or found[0]["seq"] == seq and self.root_blob != src.root_blob):
            raise Fail("%s holds a newer or different root (#%d, the source has #%d): copying would roll it back "
                       "(--force-allow-rollback copies anyway)" % (self.dest, found[0]["seq"], seq))
        if found:
            self.mark_garbage()
        self.root = src.root
        return bool(found)

    def copy_objects(self, src, kind, ids, limit):
        """Copy the objects ``ids`` this archive lacks from ``src``, sealed
        bytes as they are stored (each at most ``limit`` bytes; dom0 does
        not look inside: the agent here checks they open)."""
        have = self.link.call(wire.HAVE, bytes([kind]), *ids, limit=(len(ids) + 7) // 8)
        missing = [oid for n, oid in enumerate(ids) if n // 8 >= len(have) or not have[n // 8] >> n % 8 & 1]
        src.link.send(wire.GET_OBJECTS, bytes([kind]), *missing)
        for oid in missing:
            self.link.send_stream(wire.PUT_OBJECT, bytes([kind]) + oid, src.link.parts(limit))
        return len(missing)

    def finish_copy(self, src):
        """The root last, then read back: it must be src's, byte for byte."""
        self._put_root(src.root_blob)
        if self._fetch_root() is None or self.root_blob != src.root_blob:
            raise Fail("the copy's root reads back different from the one written")

    # -- garbage, checks and figures (the agent does the work) ----------------
    def mark_garbage(self):
        """Before a change that drops references (prune, delete): the agent
        records that a collection is due, so that an interruption at any
        later moment is finished by the next writer."""
        self.link.call(wire.MARK_GARBAGE)

    def manifests(self):
        """[(volume, session index)] of every session in the archive."""
        return [(v, i) for v in self.root["volumes"] for i in range(len(v["sessions"]))]

    def scan(self, mode, items, groups=None):
        """Ask the agent to walk the chunks the given sessions' manifests
        list (doc/PROTOCOL.md, SCAN).  Returns its records, bounded and
        range-checked: figures to report, never to decide on."""
        groups = groups or [0] * len(items)
        if len(items) > MAX_SCAN:
            raise Fail("the archive has more than %d sessions: prune some first" % MAX_SCAN)
        self.link.send(wire.SCAN, struct.pack(">BI", mode, len(items)), b"".join(
            wire.SCAN_ITEM.pack(*(bytes.fromhex(v["sessions"][i][k][:32]) for k in ("manifest", "mac")), g)
            for (v, i), g in zip(items, groups)))  # the name, the first half of the MAC
        records, limit = [], 3 * len(items) + max(groups, default=0) + 16
        while True:
            op, data = self.link.frame((wire.DATA, wire.END), wire.SCAN_RECORD.size)
            if op == wire.END:
                return records
            if len(data) != wire.SCAN_RECORD.size or len(records) >= limit:
                raise wire.LinkBroken("agent sent a malformed scan report")
            records.append(wire.SCAN_RECORD.unpack(data))

    def collect(self):
        """Garbage collection: the agent removes every chunk and manifest
        that no session of the root uses.  Returns (objects, bytes) removed."""
        records = self.scan(SCAN_WHOLE | SCAN_CLEAN, self.manifests())
        kinds = {r[0] for r in records}
        if BAD_MANIFEST in kinds:
            notice(self.opts, "warning: a manifest cannot be read, or is not the one the root names, so nothing "
                   "was removed: run arch-check")
        elif MISSING in kinds:
            notice(self.opts, "warning: chunks that sessions use are missing, so no chunk was removed: run arch-check")
        return next(((r[2], r[3]) for r in records if r[0] == REMOVED), (0, 0))

    def damaged(self):
        """Ids of chunks the agent found missing or damaged (verify, receive,
        arch-check): send stores them again where a volume still holds them.
        A hint: a lie costs reading and sending, never trust."""
        reply = self.link.call(wire.GET_DAMAGED, limit=wire.PART)
        return {reply[i:i + 32] for i in range(0, len(reply) - 31, 32)} - {manifest.ZERO}  # zeros are never stored

    def free_bytes(self):
        """Space left at the destination as the agent sees it, or None."""
        reply = self.link.call(wire.GET_FREE, limit=8)
        return struct.unpack(">Q", reply)[0] if len(reply) == 8 and reply != b"\xff" * 8 else None

    def agent_stats(self):
        """The agent's counters so far: stored, deduplicated, bytes in,
        bytes stored.  Figures to show, never to decide on."""
        self.link.send(wire.GET_STATS)
        return self._stats_reply()

    def _stats_reply(self):
        reply = self.link.reply(wire.STATS.size)
        if len(reply) != wire.STATS.size:
            raise wire.AgentError("agent sent malformed statistics")
        return wire.STATS.unpack(reply)

    def __exit__(self, *_exc):
        self.close()

    def close(self):
        with contextlib.suppress(Fail), self.link.deadline():
            self.link.call(wire.BYE)
        self.link.close()


def ahead(fn, items):
    """Yield (item, fn(item)) in order, fn running on a worker thread up to
    AHEAD items ahead of the caller (hashlib releases the GIL, so ids are
    computed while the main thread reads or writes).  An item whose last
    field is None is not given to fn: its result is None."""
    with ThreadPoolExecutor(1) as worker:
        pending = collections.deque()
        for item in items:
            if item[-1] is None and not pending:
                yield item, None
                continue
            pending.append((item, None if item[-1] is None else worker.submit(fn, item)))
            if len(pending) > AHEAD:
                item, job = pending.popleft()
                yield item, job and job.result()
        for item, job in pending:
            yield item, job and job.result()
