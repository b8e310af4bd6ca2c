"""LVM thin pools: the lvm2 CLI, thin snapshots and their deltas (doc/sources.md).

A snapshot is ``lvcreate -s`` of the thin volume: read-only, skipped at
activation, named ``<volume>.qwyng-<archive>.tick|tock`` and tagged
``qubes-wyng:<archive id>``.  The changes between two of them come from
``thin_delta`` on the pool's reserved metadata snapshot, which is released
whatever happens (exception, SIGINT, SIGTERM).  Every lvm2 and dmsetup
call goes through ``run``.
"""
import contextlib
import fcntl
import functools
import json
import os
import re
import signal
import subprocess

from ..errors import Fail
from .image import ImageSource
from .thin_delta import run_thin_delta

TAG = "qubes-wyng:"
NAME = re.compile(r"[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,95}")
FIELDS = "lv_name,lv_uuid,lv_attr,lv_size,pool_lv,thin_id,lv_tags,vg_extent_size,data_percent"


def run(*argv):
    """Run an lvm2 or device-mapper command; its output, or Fail with one line."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              env=dict(os.environ, LC_ALL="C", LVM_SUPPRESS_FD_WARNINGS="1"))
    except OSError as e:
        raise Fail("%s: cannot run it (%s); is lvm2 installed?" % (argv[0], e.strerror)) from None
    if done.returncode:
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        raise Fail("%s %s: %s" % (argv[0], argv[-1], lines[-1] if lines else "exit %d" % done.returncode))
    return done.stdout


def dm_name(vg, lv):
    """device-mapper's name of an LV: dashes doubled, joined by one."""
    return "%s-%s" % (vg.replace("-", "--"), lv.replace("-", "--"))


def report(vg):
    """{LV name: its FIELDS} for every visible LV of ``vg``."""
    out = run("lvs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", FIELDS, vg)
    try:
        return {lv["lv_name"]: lv for lv in json.loads(out)["report"][0]["lv"]}
    except (ValueError, KeyError, IndexError, TypeError):
        raise Fail("lvs: unexpected output for %s" % vg) from None


def mapped(lv):
    """Bytes of its pool a thin volume maps (from its report)."""
    return int(int(lv["lv_size"]) * float(lv["data_percent"] or 0) / 100)


class Volume:
    """Thin volume ``VG/<name>`` of pool ``VG/POOL``."""
    nodatacow = False

    def __init__(self, local, name, create=False):
        self.local, self.name = local, name
        self.vg, self.pool = local.split("/")
        if not NAME.fullmatch(name):
            raise Fail("%r is not an LVM volume name" % name)
        self.lvs = report(self.vg)
        pool = self.lvs.get(self.pool)
        if not pool or pool["lv_attr"][:1] != "t":
            raise Fail("--local=%s: not a thin pool" % local)
        info = self.lvs.get(name)
        if info and (info["pool_lv"] != self.pool or info["lv_attr"][:1] != "V"):
            raise Fail("%s/%s is not a thin volume of %s" % (self.vg, name, local))
        if not info and not create:
            raise Fail("%s/%s: no such volume" % (self.vg, name))
        self.path = self._dev(name)
        self.size = int(info["lv_size"]) if info else None

    def exists(self):
        return self.name in self.lvs

    def _dev(self, lv):
        return "/dev/mapper/" + dm_name(self.vg, lv)

    def _lv(self, lv):
        return "%s/%s" % (self.vg, lv)

    def snapshot_name(self, archive_id, slot):
        return "%s.qwyng-%s.%s" % (self.name, archive_id.hex()[:16], slot)

    def snapshots(self, archive_id, slots):
        return [n for n in (self.snapshot_name(archive_id, s) for s in slots) if self.ident(n, archive_id)]

    def usage(self, snap):
        """Bytes of the pool the snapshot maps (0 if it is gone)."""
        return mapped(self.lvs[snap]) if snap in self.lvs else 0

    def take(self, snap, archive_id):
        run("lvcreate", "-y", "-s", "-pr", "-ky", "-K", "-ay", "--addtag", TAG + archive_id.hex(), "-n", snap,
            self._lv(self.name))
        self.lvs = report(self.vg)
        return self.ident(snap, archive_id)

    def ident(self, snap, archive_id):
        """[uuid, thin id, size] of our read-only thin snapshot, or None."""
        lv = self.lvs.get(snap)
        if not lv or lv["pool_lv"] != self.pool or lv["lv_attr"][:2] != "Vr" \
                or TAG + archive_id.hex() not in lv["lv_tags"].split(","):
            return None
        return [lv["lv_uuid"], int(lv["thin_id"]), int(lv["lv_size"])]

    def delta(self, old, new, chunk_size):
        """Chunk runs where snapshot ``new`` may differ from ``old``, from
        thin_delta between their thin ids (the pool must be active)."""
        with self._metadata_snapshot() as tmeta:
            runs = run_thin_delta(tmeta, old["ident"][1], new["ident"][1], chunk_size, new["ident"][2])
        return [(r.start, r.stop) for r in runs]

    @contextlib.contextmanager
    def _metadata_snapshot(self):
        """Reserve the pool's metadata snapshot; release it also on errors,
        ^C and SIGTERM (blocked while reserving and releasing).  qvm-wyng
        processes take turns through a lock on the _tmeta device, so one
        that finds a reservation left by a killed run releases it first."""
        pool = dm_name(self.vg, self.pool)
        tpool = pool + "-tpool" if os.path.exists("/dev/mapper/%s-tpool" % pool) else pool
        tmeta = "/dev/mapper/%s_tmeta" % pool
        with open(tmeta, "rb", buffering=0) as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            signals = {signal.SIGINT, signal.SIGTERM}
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
            term = signal.signal(signal.SIGTERM, signal.default_int_handler)  # KeyboardInterrupt
            try:
                try:
                    run("dmsetup", "message", tpool, "0", "reserve_metadata_snap")
                except Fail:
                    run("dmsetup", "message", tpool, "0", "release_metadata_snap")
                    run("dmsetup", "message", tpool, "0", "reserve_metadata_snap")
                try:
                    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                    yield tmeta
                finally:
                    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
                    run("dmsetup", "message", tpool, "0", "release_metadata_snap")
            finally:
                signal.signal(signal.SIGTERM, term)
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def reader(self, snap=None):
        lv = snap or self.name
        if not os.path.exists(self._dev(lv)):
            run("lvchange", "-ay", "-K", self._lv(lv))
        return ImageSource(self._dev(lv))

    def release(self, snap):
        run("lvchange", "-an", self._lv(snap))

    def remove(self, snap):
        if self.lvs.pop(snap, None):
            run("lvremove", "-f", self._lv(snap))

    def receive_path(self, size, overwrite, snap=None):
        """receive --local: an existing volume is written over in place (with
        --overwrite, and only when no one has it open), resized to the
        session; a new one, or (--use-snapshot) a writable thin snapshot of
        ``snap``, is made as ``<name>.qwyng-new`` and takes the volume's name
        when complete (an existing volume is removed first: a kill between
        the two leaves no volume, and receiving again restores it).  Sizes
        round up to the extent size."""
        extent = int(self.lvs[self.pool]["vg_extent_size"])
        size = -(-max(size, 1) // extent) * extent
        info = self.lvs.get(self.name)
        if info and not overwrite:
            raise Fail("%s exists: give --overwrite to restore over it" % self._lv(self.name))
        if info and info["lv_attr"][5:6] == "o":
            raise Fail("%s is in use" % self._lv(self.name))
        lv, commit, abort = self.name, None, None
        if snap or not info:
            lv = self.name + ".qwyng-new"
            if lv in self.lvs and TAG + "new" in self.lvs[lv]["lv_tags"].split(","):
                self.remove(lv)  # left by an interrupted receive
            run("lvcreate", "-y", "--addtag", TAG + "new", "-n", lv, *(
                ("-s", "-prw", "-kn", self._lv(snap)) if snap else ("-V", "%db" % size, "-T", self.local)))

            def commit():
                if info:
                    run("lvremove", "-f", self._lv(self.name))
                run("lvrename", self.vg, lv, self.name)
                run("lvchange", "--deltag", TAG + "new", self._lv(self.name))
            abort = functools.partial(run, "lvremove", "-f", self._lv(lv))
            self.lvs = report(self.vg)
        if int(self.lvs[lv]["lv_size"]) != size:
            run("lvresize", "-f", "-L", "%db" % size, self._lv(lv))
        self.reader(lv).close()  # activates it
        return self._dev(lv), commit, abort


def clean(local, archive_id=None):
    """Remove our snapshots in pool ``local`` (of one archive, or of all);
    returns (name, bytes of the pool it mapped) of each."""
    vg, pool = local.split("/")
    removed = []
    for name, lv in report(vg).items():
        if lv["pool_lv"] == pool and any(t == TAG + archive_id.hex() if archive_id else
                                         t.startswith(TAG) and t != TAG + "new" for t in lv["lv_tags"].split(",")):
            run("lvremove", "-f", "%s/%s" % (vg, name))
            removed.append(("%s/%s" % (vg, name), mapped(lv)))
    return removed
