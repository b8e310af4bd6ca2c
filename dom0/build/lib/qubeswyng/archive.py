"""dom0's side of one archive connection: authenticate, read, commit.

Order of a connection (doc/PROTOCOL.md): HELLO, GET_HEADER, unlock the
master key, OPEN (hand the agent K_enc), LOCK for writers, GET_ROOT and
check its MAC and that it is not older than the last root seen.  Nothing
from the agent is used before its MAC or chunk id matched.
"""
import os
import struct
import time

from . import keys as K
from . import manifest, wire
from .errors import Fail
from .formats import MAX_ROOT, Header, new_root, open_root, seal_root
from .manifest import ZERO, ChunkMap, Head
from .meta import Meta
from .transport import start

LOCK_TTL = 120
FETCH_BATCH = 256


class Archive:
    def __init__(self, opts, app=None):
        self.opts = opts
        self.transport, self.path = start(opts.dest, app)
        self.link = wire.Link(self.transport)
        self.link.send(wire.HELLO, struct.pack(">H", wire.PROTOCOL_VERSION), self.path.encode())
        reply = self.link.reply(64)
        if len(reply) < 2 or struct.unpack(">H", reply[:2])[0] != wire.PROTOCOL_VERSION:
            raise wire.AgentError("the agent speaks another protocol version")
        self.locked = False

    # -- creating and opening ----------------------------------------------
    def create(self, header, passphrase):
        master = os.urandom(32)
        self.link.send(wire.INIT, header.seal(passphrase, master))
        self.link.reply()
        self._start(header, master)
        self.lock()
        self.root = new_root(header.archive_id)
        self.commit()

    def open(self, write=False):
        header = Header.parse(self._get_header())
        opts = self.opts
        master = K.cached_master(opts.auth_dir, header.archive_id, opts.authmin)
        if master is None:
            master = header.unlock(K.read_passphrase(opts))
        self._start(header, master, check=True)
        if write:
            self.lock()
        self._load_root()
        try:
            K.store_master(opts.auth_dir, header.archive_id, master, opts.authmin)
        except OSError:
            pass  # no tmpfs to remember it in: ask again next time
        return self

    def _get_header(self):
        self.link.send(wire.GET_HEADER)
        return self.link.frame((wire.DATA,), 4096)[1]

    def _start(self, header, master, check=False):
        """Derive the keys and hand the agent its storage key (only after
        the header's settings proved authentic)."""
        self.header, self.keys = header, K.Keys(master, header.archive_id)
        if check:
            header.check(self.keys)
        self.chunk_size = header.chunk_size
        self.meta = Meta(self.opts.meta_dir, header.archive_id)
        self.link.send(wire.OPEN, struct.pack(">BBbI", header.cipher, header.compression,
                                              header.level, header.chunk_size), self.keys.enc)
        self.link.reply()

    def lock(self):
        owner = "qvm-wyng %s" % self.opts.command
        self.link.send(wire.LOCK, struct.pack(">IB", LOCK_TTL, bool(self.opts.force)), owner.encode())
        self.link.reply()
        self.locked = True

    def _load_root(self):
        self.link.send(wire.GET_ROOT)
        op, data = self.link.frame((wire.DATA, wire.END, wire.NONE), wire.PART)
        if op == wire.NONE:
            raise Fail("the archive has no root: it is damaged, or arch-init was interrupted")
        blob = bytearray(data)
        if op == wire.DATA:
            for part in self.link.parts(MAX_ROOT - len(blob)):
                blob += part
        self.root, mac = open_root(self.keys, bytes(blob), self.header.archive_id)
        seen = self.meta.last_seen()
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
        for vol in self.root["volumes"]:
            if vol["name"] == name:
                return vol
        return None

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
        chunk_map, parent = ChunkMap(), ZERO
        for ses in sessions[:upto + 1]:
            chunk_map.resize(manifest.chunk_count(ses["size"], self.chunk_size))
            for index, cid in self.read_manifest(vol, ses, parent):
                chunk_map[index] = cid
            parent = bytes.fromhex(ses["mac"])
        if upto == len(sessions) - 1:
            self.meta.save_map(vol["id"], head_mac, chunk_map)
        return chunk_map

    def read_manifest(self, vol, ses, parent_mac):
        expect = Head(self.chunk_size, self.header.archive_id, bytes.fromhex(vol["id"]),
                      ses["name"], 0, ses["size"], 0, parent_mac)
        self.link.send(wire.GET_MANIFEST, bytes.fromhex(ses["manifest"]))
        # 40 bytes per entry, at most one entry per chunk
        limit = manifest.HEAD.size + 40 * manifest.chunk_count(ses["size"], self.chunk_size) + 32
        return manifest.read(self.keys, self.link.parts(limit), bytes.fromhex(ses["mac"]), expect)

    def write_manifest(self, vol, name, size, count, entries, tags):
        """Store a new session's manifest listing ``count`` (index, id)
        ``entries``; returns its session record."""
        sessions = vol["sessions"]
        parent = bytes.fromhex(sessions[-1]["mac"]) if sessions else ZERO
        mid, now = os.urandom(16), int(time.time())
        head = Head(self.chunk_size, self.header.archive_id, bytes.fromhex(vol["id"]),
                    name, now, size, count, parent)
        last = self.link.send_stream(wire.PUT_MANIFEST, mid, manifest.encode(self.keys, head, entries))
        ses = {"name": name, "manifest": mid.hex(), "mac": last[-32:].hex(), "size": size,
               "time": now, "changed": count, "tags": tags}
        sessions.append(ses)
        return ses

    def put_chunk(self, cid, data):
        self.link.send(wire.PUT_CHUNK, cid, data)

    def fetch(self, wanted):
        """Yield (index, data) for ``wanted`` (index, id) pairs, in order;
        each chunk is checked against its id before it is yielded."""
        batches, pending = _batches(wanted, FETCH_BATCH), []
        for batch in batches:
            self.link.send(wire.GET_CHUNKS, b"".join(cid for _i, cid, _n in batch))
            pending.append(batch)
            if len(pending) < 2:
                continue
            yield from self._receive(pending.pop(0))
        while pending:
            yield from self._receive(pending.pop(0))

    def _receive(self, batch):
        for index, cid, length in batch:
            try:
                data = self.link.frame((wire.DATA,), length)[1]
            except wire.AgentError as e:
                raise Fail("chunk %d: %s" % (index, e)) from None
            if len(data) != length or self.keys.chunk_id(data) != cid:
                raise Fail("chunk %d fails authentication: the archive returned other data" % index)
            yield index, data

    # -- committing ----------------------------------------------------------
    def commit(self):
        """Write the root; everything it refers to is stored first."""
        self.root["seq"] += 1
        self.root["time"] = int(time.time())
        blob = seal_root(self.keys, self.root)
        self.link.send_parts(wire.PUT_ROOT, b"", blob)
        self._stats_reply()
        self.meta.save_seen(self.root["seq"], blob[-32:])

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

    def close(self):
        try:
            self.link.send(wire.BYE)
            self.link.reply()
        except Fail:
            pass
        self.link.close()


def _batches(wanted, size):
    batch = []
    for item in wanted:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
