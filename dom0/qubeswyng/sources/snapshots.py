"""Snapshot rotation, change maps and local clean-up: the rules both
snapshot sources share (doc/sources.md).

For each archive and volume id dom0 keeps ``snapshots/<volume id>.json``
under --meta-dir: the pool (--local), the volume name, the archive's chunk
size and records ``{"mac", "snap", "ident", "size", "changed"}``.  A record
says: snapshot ``snap`` (identity ``ident``, ``size`` bytes) holds the
session whose manifest MAC is ``mac``, except perhaps in the chunk runs
``changed``.  A send uses a record only when ``mac`` is the archive's head
for the volume and the snapshot is still there, ours and unchanged;
otherwise it reads the whole new snapshot and compares every chunk id
with the verified map.  State is written before snapshots are removed, so
a kill at any moment leaves a record that is true, or none.
"""
import contextlib
import fcntl
import os
import pathlib
import shutil

from ..clock import point
from ..errors import Fail
from ..manifest import chunk_count
from ..meta import Meta
from ..progress import notice, size
from . import NoSnapshots, backend, open_source

SLOTS = ("tick", "tock")


def merge(runs):
    """Sorted, disjoint [start, stop] chunk runs covering ``runs``."""
    out = []
    for start, stop in sorted((a, b) for a, b in runs if a < b):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], stop)
        else:
            out.append([start, stop])
    return out


def size_runs(old, new, chunk_size):
    """Chunks whose length or existence differs between the two sizes."""
    return [] if old == new else [(min(old, new) // chunk_size, chunk_count(new, chunk_size))]


def _lock(meta, vid, wait, create=0):
    """The flocked lock file of volume ``vid``'s snapshot state (``create``:
    os.O_CREAT to make it); BlockingIOError if it is busy and not ``wait``."""
    fd = os.open(os.path.join(meta.dir, "snapshots", vid + ".lock"), os.O_RDWR | os.O_CLOEXEC | create, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BaseException:
        os.close(fd)
        raise
    return fd


class Rotation:
    """The snapshots of one local volume for one archive volume, under a
    lock that send waits for and monitor does not (BlockingIOError)."""

    def __init__(self, volume, meta, vid, wait=True):
        self.volume, self.meta, self.aid, self.vid = volume, meta, meta.archive_id, vid
        self.file = ("snapshots", vid + ".json")
        # the slots carry the archive volume's id: a name sent again (a new
        # id), or one local volume sent under two names, never meets these
        self.slots = ["%s.%s" % (vid[:8], slot) for slot in SLOTS]
        os.makedirs(os.path.join(meta.dir, "snapshots"), mode=0o700, exist_ok=True)
        self.lock = _lock(meta, vid, wait, os.O_CREAT)
        state = meta.load_json(*self.file)
        state = state if isinstance(state, dict) else {}  # a damaged record costs a full comparison
        here = (state.get("local"), state.get("name")) == (volume.local, volume.name)
        self.records = state.get("records", []) if here else []  # records of another pool do not count
        self.chunk_size = state.get("chunk_size")
        self.new, self.reader, self.kept = None, None, False

    def current(self, mac):
        """The record for session ``mac`` whose snapshot is present, ours
        and unchanged; None if there is none."""
        for rec in self.records:
            with contextlib.suppress(KeyError, TypeError):
                if rec["mac"] == mac and rec["ident"] and self.volume.ident(rec["snap"], self.aid) == rec["ident"]:
                    return rec
        return None

    def ours(self):
        """Our snapshots of the volume: in its slots, or named by a record
        (those of an older release had other names)."""
        named = {r.get("snap") for r in self.records if isinstance(r, dict)}
        return set(self.volume.snapshots(self.aid, self.slots)) | {
            s for s in named if isinstance(s, str) and self.volume.ident(s, self.aid)}

    def _remove_others(self, keep):
        for snap in self.ours() - {keep}:
            self.volume.remove(snap)

    def drop(self):
        """Remove the volume's snapshots, its record and lock file (it is gone
        from the pool or from the archive); the bytes the snapshots held.
        Ends the rotation: no ``close`` after it."""
        try:
            freed = sum(map(self.volume.usage, self.ours()))
            self._remove_others(None)
            for ext in (".json", ".lock"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.meta.dir, "snapshots", self.vid + ext))
        finally:
            os.close(self.lock)
        return freed

    def start(self, keep):
        """Remove our other snapshots of the volume and take a new one in
        the slot that record ``keep`` (or None) does not use; its reader."""
        keep = keep["snap"] if keep else None
        self._remove_others(keep)
        snap = next(n for n in (self.volume.snapshot_name(self.aid, s) for s in self.slots) if n != keep)
        self.new = {"snap": snap, "ident": self.volume.take(snap, self.aid)}
        if not self.new["ident"]:
            raise Fail("%s: the new snapshot %s is not as made" % (self.volume.name, snap))
        point("cow-after-snapshot")
        self.reader = self.volume.reader(snap)
        self.new["size"] = self.reader.size
        return self.reader

    def changes(self, rec):
        """Chunk runs where the new snapshot may differ from record ``rec``'s
        session, or None if the snapshots cannot be compared."""
        runs = self.volume.delta(rec, self.new, self.chunk_size)
        if runs is None:
            return None
        return merge(runs + rec["changed"] + size_runs(rec["size"], self.new["size"], self.chunk_size))

    def save(self, records):
        self.meta.save_json({"local": self.volume.local, "name": self.volume.name, "chunk_size": self.chunk_size,
                             "records": records}, *self.file)

    def keep(self, mac, changed=()):
        """Record the new snapshot as session ``mac``, then remove the other snapshots."""
        self.save([dict(self.new, mac=mac, changed=list(changed))])
        self.kept = True
        point("cow-after-record")
        self._remove_others(self.new["snap"])

    def close(self):
        """Release the lock; remove the new snapshot unless it was kept
        (deactivate it if it was).  A leftover is removed next time."""
        try:
            with contextlib.suppress(Fail):
                if self.reader:
                    self.reader.close()
                if self.new:
                    (self.volume.release if self.kept else self.volume.remove)(self.new["snap"])
        finally:
            os.close(self.lock)


class SnapshotSource:
    """send's view of a snapshot source: ``begin`` takes the new snapshot
    and names the chunks to read (None: all), ``pending`` runs before the
    archive commit, ``done`` after it, ``close`` always."""

    def __init__(self, volume, opts):
        self.volume, self.opts = volume, opts
        self.rotation = self.head = self.reader = None

    def begin(self, archive, vol, chunk_map):
        cs, sessions = archive.chunk_size, vol["sessions"]
        if not self.opts.dry_run or sessions:  # else read it all, and make no state for a volume not sent
            self.rotation = rot = Rotation(self.volume, archive.meta, vol["id"])
            rot.chunk_size = cs
            self.head = rot.current(sessions[-1]["mac"]) if sessions else None
            try:
                reader = rot.start(self.head)
            except NoSnapshots as e:
                notice(self.opts, "%s: %s; reading all of it" % (self.volume.path, e))
                rot.close()
                self.rotation = None
            else:
                runs = rot.changes(self.head) if self.head else None
                if runs is None:
                    return reader, None
                count = chunk_count(reader.size, cs)
                runs = merge(runs + size_runs(sessions[-1]["size"], reader.size, cs) + [(len(chunk_map), count)])
                return reader, (i for start, stop in runs for i in range(start, min(stop, count)))
        self.reader = self.volume.reader()
        return self.reader, None

    def pending(self, mac):
        """Before the commit: the new snapshot will stand for ``mac`` if the
        commit lands; the old record stays true if it does not."""
        if self.rotation:
            self.rotation.save([r for r in (self.head,) if r] + [dict(self.rotation.new, mac=mac, changed=[])])
        point("cow-before-commit")

    def done(self, mac):
        point("cow-after-commit")
        if self.rotation:
            self.rotation.keep(mac)

    def close(self):
        if self.rotation:
            self.rotation.close()
        elif self.reader:
            self.reader.close()


def carry(meta, vid, old_mac, new_mac):
    """prune rewrote the newest manifest of volume ``vid`` without changing
    the volume's contents: a snapshot standing for the old manifest stands
    for the new one too.  Both records are kept, so either outcome of the
    commit finds one; the next send keeps only its own.  Left alone (costing
    one full comparison, never safety) if there is no state or a monitor is
    at work on it."""
    try:
        lock = _lock(meta, vid, wait=False)
    except (FileNotFoundError, BlockingIOError):
        return
    try:
        state = meta.load_json("snapshots", vid + ".json")
        records = state.get("records") if isinstance(state, dict) else None
        if isinstance(records, list):
            records += [dict(r, mac=new_mac) for r in records if isinstance(r, dict) and r.get("mac") == old_mac]
            meta.save_json(state, "snapshots", vid + ".json")
    finally:
        os.close(lock)


def send_source(opts, local, name):
    """The source send uses for volume ``name`` of pool ``local``."""
    volume = open_source(local, name)
    if volume.nodatacow:
        notice(opts, "%s: a No_COW file (chattr +C) has no reliable extent map: reading all of it" % volume.path)
        return volume.reader()
    return SnapshotSource(volume, opts)


def archives(meta_dir, archive_id=None):
    """Meta of every archive folder under ``meta_dir`` (named by the
    archive id in hex), or of the one of ``archive_id`` if it is there."""
    found = pathlib.Path(meta_dir).glob(archive_id.hex() if archive_id else "[0-9a-f]" * 32)
    return [Meta(meta_dir, bytes.fromhex(path.name)) for path in sorted(found)]


def states(meta_dir, archive_id=None):
    """(Meta, volume id, state) of every snapshot state under ``meta_dir``."""
    for meta in archives(meta_dir, archive_id):
        for path in sorted(pathlib.Path(meta.dir, "snapshots").glob("*.json")):
            state = meta.load_json("snapshots", path.name)
            if isinstance(state, dict):
                yield meta, path.stem, state


def forget(meta, vid):
    """delete: remove the snapshots and records of archive volume ``vid``;
    the bytes freed.  Left alone if its pool cannot be opened (``delete
    --clean`` removes them later)."""
    state = meta.load_json("snapshots", vid + ".json")
    if isinstance(state, dict) and all(isinstance(state.get(k), str) for k in ("local", "name")):
        with contextlib.suppress(Fail):
            return Rotation(open_source(state["local"], state["name"], create=True), meta, vid).drop()
    return 0


def monitor(opts, names=None):
    """Fold the changes since the last send into each volume's change map
    and replace its snapshot with a new one; remove the snapshots of a
    volume that is gone from the pool (a removed qube's).  Returns (volume,
    chunks now pending, or what was done or why not) for the volumes of
    --local (every state is listed before the first is folded)."""
    return [(state.get("name"), _fold(opts.local, meta, vid, state.get("name")))
            for meta, vid, state in list(states(opts.meta_dir))
            if state.get("local") == opts.local and (names is None or state.get("name") in names)]


def _fold(local, meta, vid, name):
    try:
        volume = open_source(local, name, create=True)
        volume = volume if volume.size is None else open_source(local, name)
        rot = Rotation(volume, meta, vid, wait=False)
    except BlockingIOError:
        return "busy: a send is running"
    except Fail as e:
        return str(e)
    if volume.size is None:
        return "the volume is gone: removed its snapshots, %s freed" % size(rot.drop())
    try:
        if len(rot.records) != 1:
            return "an interrupted send left two snapshots: send it first"
        rec = rot.current(rot.records[0].get("mac"))
        if not rec:
            return "its snapshot is gone or was changed: the next send reads it all"
        rot.start(rec)
        runs = rot.changes(rec)
        if runs is None:
            return "the snapshots cannot be compared now: kept the old one"
        rot.keep(rec["mac"], runs)
        return sum(stop - start for start, stop in runs)
    finally:
        rot.close()


def clean_local(opts, archive_id=None):
    """delete --clean: remove this tool's snapshots of one archive (of all
    with None) from every pool it has records for and from --local, then
    its records and cached maps.  root-seen stays: it is what detects a
    rolled-back archive.  Returns (snapshot, bytes it held) of those removed."""
    pools = {state.get("local") for _meta, _vid, state in states(opts.meta_dir, archive_id)} | {opts.local}
    removed = []
    for local in sorted(p for p in pools if isinstance(p, str)):
        try:
            removed += backend(local).clean(local, archive_id)
        except (Fail, OSError) as e:
            notice(opts, "could not clean %s: %s" % (local, e))
    for meta in archives(opts.meta_dir, archive_id):
        for sub in ("snapshots", "maps"):
            shutil.rmtree(os.path.join(meta.dir, sub), ignore_errors=True)
    return removed
