"""Power loss, not only SIGKILL: sends, prunes and deletes on ext4 over
dm-log-writes in the qemu guest, then the log replayed on the host up to
every flush and FUA write, mounted (ext4 replays its journal) and checked.

dm-log-writes records a write only once the device would hold it for
good (at the FLUSH that covers it, or a FUA write's completion), so the
log up to a flush is exactly what a power cut right after that flush
leaves (xfstests checks filesystems the same way).  The archive's agent
runs in the guest, on that filesystem; dom0 runs here and reaches it
through qemu's port forward (tests/guest_agent.py), so only the agent
pays for the guest's slow Python.  After each command the guest puts a
mark in the log; at a crash point the commands whose mark came before
have exited 0.  At every point: the archive opens, arch-check finds
nothing damaged, every session restores byte for byte, and the sessions
are exactly those after the last finished command or after the one in
flight (a commit is all or nothing).  ext4 is mounted in its weakest
journaling mode (data=writeback) with a commit interval longer than the
test, so nothing is made durable but what the agent syncs (the default
5 s would hide a missing fsync).
"""
import contextlib
import hashlib
import io
import os
import random
import shutil
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO, Wyng, need, need_root, which
from images import KiB, MiB

pytestmark = pytest.mark.slow

CHUNK = 64 * KiB
CHUNKS = 8
DATA, LOG = 48 * MiB, 512 * MiB
GUEST_PORT = 2000
ARCHIVE = "/mnt/wyng/archive"  # in the guest; the filesystem's /archive on the host
# dm-log-writes (drivers/md/dm-log-writes.c): a super block, then for each
# entry one sector (the entry, a mark's text) and the sectors it wrote
SUPER, ENTRY = struct.Struct("<QQQI"), struct.Struct("<QQQQ")
LOG_MAGIC, FLUSH, FUA, DISCARD, MARK = 0x6a736677736872, 1, 2, 4, 8

SCRIPT = """
busybox ip link set lo up && busybox ip link set eth0 up && busybox ip addr add 10.0.2.15/24 dev eth0
echo "0 $(blockdev --getsz $DISK_data) log-writes $DISK_data $DISK_log" | dmsetup create --noudevsync lw
dmsetup mknodes lw
mkfs.ext4 -q -F -E nodiscard,lazy_itable_init=1,lazy_journal_init=1 /dev/mapper/lw
dmsetup message lw 0 mark mkfs
mkdir -p /mnt/wyng
mount -o commit=3600,data=writeback /dev/mapper/lw /mnt/wyng
"$PYTHON" tests/guest_agent.py serve %d lw
umount /mnt/wyng
dmsetup remove lw
""" % GUEST_PORT


def log_entries(path):
    """(flags, byte offset, byte length, data or mark text) of each entry."""
    with open(path, "rb") as f:
        magic, version, count, sector = SUPER.unpack(f.read(SUPER.size))
        assert magic == LOG_MAGIC and version == 1, "not a dm-log-writes log"
        pos = sector
        for _ in range(count):
            f.seek(pos)
            first, n, flags, length = ENTRY.unpack(f.read(ENTRY.size))
            pos += sector
            data = f.read(length) if flags & MARK else b""
            if n and not flags & DISCARD:
                f.seek(pos)
                data = f.read(n * sector)
                pos += n * sector
            yield flags, first * sector, n * sector, data


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ask(port, request, timeout=60):
    deadline = time.time() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                conn.sendall(request.ljust(64))
                answer = conn.makefile("rb").readline()
            if answer:
                return answer.strip()
        except OSError:
            pass
        assert time.time() < deadline, "the guest's agent server does not answer"
        time.sleep(0.2)


class Workload:
    """The commands run on the archive in the guest, and the sessions the
    archive holds after each: {(volume, session): sha256 of its data}."""

    def __init__(self, wyng, tmp_path, port):
        self.wyng, self.port, self.rng = wyng, port, random.Random(7)
        self.images = {v: tmp_path / v for v in ("a", "b")}
        for path in self.images.values():
            path.write_bytes(self.rng.randbytes(CHUNKS * CHUNK))
        self.when, self.states, self.sessions = 1767225600, [], {}

    def run(self, *args):
        self.when += 3600
        env = {"QVM_WYNG_AGENT": str(REPO / "tests" / "guest_agent.py"), "WYNG_GUEST_PORT": str(self.port),
               "QVM_WYNG_TEST_NOW": str(self.when)}
        assert self.wyng.main(*args, env=env) == 0, args
        assert _ask(self.port, b"mark end-%d" % len(self.states)) == b"0"
        self.states.append(dict(self.sessions))

    def send(self, *vols):
        name = time.strftime("%Y%m%d-%H%M%S", time.gmtime(self.when + 3600))
        for vol in vols:
            with open(self.images[vol], "r+b") as f:
                f.seek(self.rng.randrange(CHUNKS) * CHUNK)
                f.write(self.rng.randbytes(self.rng.choice([100, CHUNK, 2 * CHUNK])))
            self.sessions[(vol, name)] = hashlib.sha256(self.images[vol].read_bytes()).hexdigest()
        self.run("send", "--send-unchanged", *["--import-other-from=%s:|:%s" % (v, self.images[v]) for v in vols])

    def prune(self, vol, *indexes):
        names = sorted(n for v, n in self.sessions if v == vol)
        for i in indexes:
            del self.sessions[(vol, names[i])]
        self.run("prune", vol, "--session=" + ",".join(names[i] for i in indexes))

    def delete(self, vol):
        for key in [k for k in self.sessions if k[0] == vol]:
            del self.sessions[key]
        self.run("delete", "-u", vol)


def _commands(work):
    work.run("arch-init", "--chunk-factor=1")
    work.send("a", "b")
    work.send("a")
    work.send("a", "b")
    work.prune("a", 0)
    work.send("a", "b")
    work.prune("a", 0, 1)  # a range: the two oldest
    work.send("b")
    work.delete("b")
    work.send("a")


class Checker:
    """Mounts a copy of the replayed filesystem and checks the archive."""

    def __init__(self, tmp_path, states):
        self.tmp, self.states = tmp_path, states
        self.mnt = tmp_path / "mnt"
        self.mnt.mkdir()
        self.wyng = Wyng(tmp_path / "check")
        self.wyng.archive = self.mnt / "archive"
        self.wyng.dest = "file:%s" % self.wyng.archive
        self.seen = {}  # (archive fingerprint, commands ended) -> outcome
        self.points = self.checked = 0

    def point(self, image, ended):
        """The filesystem as a power cut at this point leaves it, with
        ``ended`` commands finished (exited 0) before the cut."""
        self.points += 1
        work = self.tmp / "cut.img"
        work.unlink(missing_ok=True)  # a new file: nothing that held the last one sees this one
        subprocess.run(["cp", "--sparse=always", str(image), str(work)], check=True)
        subprocess.run(["mount", "-o", "loop", str(work), str(self.mnt)], check=True)
        try:
            key = (self._fingerprint(), ended)
            if key not in self.seen:
                self.checked += 1
                self.seen[key] = self._check(ended)
            assert self.seen[key] is None, "crash point %d (%d commands done): %s" % (
                self.points, ended, self.seen[key])
        finally:
            _unmount(self.mnt)

    def _fingerprint(self):
        digest = hashlib.sha256()
        for path in sorted(p for p in self.wyng.archive.rglob("*") if p.is_file()) if self.wyng.archive.is_dir() else ():
            digest.update(str(path.relative_to(self.mnt)).encode() + b"\0" + path.read_bytes())
        return digest.hexdigest()

    def _check(self, ended):
        """None if the archive is as it must be, else what is wrong."""
        meta = self.tmp / "check" / "meta"
        shutil.rmtree(meta, ignore_errors=True)  # no memory of roots: each cut is a first contact
        if ended == 0:  # arch-init in flight: no archive, or a whole one
            code, _out, err = self._cli("list")
            return None if code == 0 or ("no archive at" in err or "arch-init was interrupted" in err) \
                else "list: %s" % err
        # the lock of the agent in the guest may look live: take it over
        code, out, err = self._cli("arch-check", "--force")
        damaged = [line for line in out.splitlines() if not line.startswith(("checked ", "archive: ", "arch-check: "))]
        if code not in (0, 1) or damaged or "error" in err:  # notices (a first contact, --force) are fine
            return "arch-check exit %d: %s %s" % (code, out, err)
        found = {(vol, name): digest for vol, sessions in self.wyng.restore_all().items()
                 for name, digest in sessions.items()}
        allowed = self.states[ended - 1:ended + 1]
        if found not in allowed:
            lost = set(allowed[0]) - set(found)
            return "sessions %s, expected %s%s" % (sorted(found), " or ".join(str(sorted(s)) for s in allowed),
                                                   "; committed sessions lost: %s" % sorted(lost) if lost else "")
        return None

    def _cli(self, *args):
        from qubeswyng import cli
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(self.wyng.args(args))
        return code, out.getvalue(), err.getvalue()


def _unmount(mnt):
    """Unmount, waiting up to 10 s for whatever still holds the mount (the
    agent of the last command is waited for; a scanner of new block devices
    may not be) and naming it if it does not let go."""
    for _ in range(40):
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode == 0:
            return
        time.sleep(0.25)
    holders = subprocess.run(["fuser", "-vm", str(mnt)], capture_output=True, text=True)
    subprocess.run(["umount", "-l", str(mnt)])
    raise AssertionError("%s stays busy: %s" % (mnt, holders.stderr.strip() or holders.stdout.strip()))


def replay(log, image, checker):
    """Apply the log to ``image`` entry by entry; check the filesystem at
    each flush or FUA write that follows a write (after mkfs)."""
    ended, made, changed = 0, False, False
    with open(image, "wb") as f:
        f.truncate(DATA)
        for flags, offset, length, data in log_entries(log):
            if flags & MARK:
                made = made or data == b"mkfs"
                ended += data.startswith(b"end-")
                continue
            if flags & DISCARD or data:
                f.seek(offset)
                f.write(data if data else bytes(length))
                changed = True
            if flags & (FLUSH | FUA) and made and changed:
                f.flush()
                checker.point(image, ended)
                changed = False
    return ended


def test_power_cut_at_every_flush_loses_no_committed_session(lvm_guest, tmp_path):
    need_root()
    need(which("mkfs.ext4"), "mkfs.ext4 (e2fsprogs)")
    port = _free_port()
    wyng = Wyng(tmp_path)
    wyng.dest = "file:" + ARCHIVE
    work = Workload(wyng, tmp_path, port)
    outcome = {}

    def boot():
        try:
            outcome["result"] = lvm_guest.run(
                SCRIPT, disks=[("data", DATA), ("log", LOG)], timeout=400,
                qemu_args=["-netdev", "user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:%d-:%d" % (port, GUEST_PORT),
                           "-device", "virtio-net-pci,netdev=net0"])
        except Exception as e:  # reported below, in the test's thread
            outcome["error"] = e
    guest = threading.Thread(target=boot)
    guest.start()
    start = time.monotonic()
    try:
        assert _ask(port, b"ping", timeout=120) == b"pong"
        _commands(work)
    finally:
        with contextlib.suppress(AssertionError):
            _ask(port, b"quit", timeout=30)
        guest.join()
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert result.returncode == 0, result
    ran = time.monotonic() - start
    checker = Checker(tmp_path, work.states)
    ended = replay(lvm_guest.disk("log", LOG), tmp_path / "replay.img", checker)
    assert ended == len(work.states)
    assert checker.points >= 50, checker.points
    print("power loss: %d commands in %.0f s; %d crash points replayed, %d archive states checked, "
          "0 committed sessions lost (%.0f s)" % (ended, ran, checker.points, checker.checked,
                                                  time.monotonic() - start - ran))
