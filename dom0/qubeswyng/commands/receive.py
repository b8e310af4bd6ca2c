"""receive and verify: rebuild a session from the archive, checking each chunk.

The manifest chain is verified and merged first (nothing is written before
every MAC matched); then every chunk is fetched and checked against its
keyed id before it is written.  A regular file is written to a temporary
name beside the target and renamed into place only when all of it checked
out, so a failed restore never leaves a file that looks complete.  A block
device is written in place, only with chunks that checked out (never
discarded as a whole first); its zero chunks are left where they read as
zeros, else discarded, and zeros written only where they still do not (a
thin volume stays thin); a failure says that the device is partly
overwritten.  With --local the pool gives the target (sources:
``receive_path``).

Wyng's modes restore onto the existing target, in place (an interrupted
one leaves it part restored, and says so: run it again): --sparse-write
writes only the chunks whose bytes differ and makes zero chunks read as
zeros (a hole punched in a file, a discard on a device); --sparse reads
each local chunk once and fetches only those whose keyed id differs from
the session's; --use-snapshot (--local) starts from a copy of the
volume's snapshot of its last send and writes only the chunks that may
differ from it.  Over data (a file that is not empty, a device not all
zeros in its first MiB, an existing --local volume for the in-place modes)
receive goes on only after a yes on the terminal, or with --force
(``consent``).
"""
import contextlib
import ctypes
import fcntl
import functools
import itertools
import os
import secrets
import stat
import struct

from ..archive import Archive
from ..errors import Fail
from ..manifest import ZERO, chunk_count, entries
from ..progress import Progress, notice, say, size
from ..sources import open_source
from ..sources.snapshots import Rotation, size_runs
from . import Several, chosen_volumes, confirm, pick_session

BLKDISCARD = 0x1277
SYNC_FILE_RANGE_WRITE = 2
PUNCH_HOLE = 3  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
ZEROS = bytes(1 << 22)
BLOCK = 64 << 10  # zero blocks of a chunk left as holes in a new file
ZERO_BLOCK = ZEROS[:BLOCK]
HOLES = 64  # zero chunks that receive passes over at once (a 2 KiB window of the chunk map)
LIBC = ctypes.CDLL(None, use_errno=True)


class FileTarget(contextlib.AbstractContextManager):
    """--save-to or a --local volume: a new or replaced regular file, or in
    place an existing block device (its zero chunks: ``zero``) or
    (``in_place``) an existing file.  As a context, it is made durable
    and ``commit`` runs, or on an error the temporary file is removed and
    ``abort`` runs (the pool's part: ``receive_path``)."""

    def __init__(self, path, size, in_place=False, commit=None, abort=None):
        self.path, self.commit, self.abort, self.fd, self.temp = path, commit, abort, None, None
        try:
            mode = os.stat(path).st_mode if os.path.lexists(path) else 0
            self.device = stat.S_ISBLK(mode)
            if mode and not (self.device or stat.S_ISREG(mode)):
                raise Fail("%s: not a regular file or block device" % path)
            folder, base = os.path.split(os.path.abspath(path))
            self.temp = None if self.device or in_place else os.path.join(
                folder, ".%s.qwyng-%s" % (base, secrets.token_hex(4)))
            flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT | os.O_EXCL if self.temp else 0)
            self.fd = os.open(self.temp or path, flags, 0o600)
            if not self.device:
                os.ftruncate(self.fd, size)
            elif os.lseek(self.fd, 0, os.SEEK_END) < size:
                raise Fail("%s: device is smaller than the volume (%d bytes)" % (path, size))
        except BaseException as e:
            self.__exit__(e)
            if isinstance(e, OSError):
                raise Fail("%s: %s" % (path, e.strerror)) from None
            raise

    def read(self, offset, length):
        return os.pread(self.fd, length, offset)

    def write(self, offset, data, compare=False):
        """Write ``data`` at ``offset``; with ``compare`` only if the bytes there
        differ.  A new file already reads zeros: its zero blocks stay holes."""
        if compare and self.read(offset, len(data)) == data:
            return
        view = memoryview(data)
        for at in range(0, len(data), BLOCK):
            done = len(data) if self.temp and data.startswith(ZERO_BLOCK, at, at + BLOCK) else at
            while done < min(at + BLOCK, len(data)):
                done += os.pwrite(self.fd, view[done:at + BLOCK], offset + done)
        # writeback starts now, not all at the closing fsync (which then finds little left)
        LIBC.sync_file_range(self.fd, ctypes.c_int64(offset), ctypes.c_int64(len(data)), SYNC_FILE_RANGE_WRITE)

    def zero(self, offset, length):
        """Make the range read as zeros, writing as little as possible: a hole
        punched (files) or a discard (devices), zeros written only if then
        it still does not read as zeros."""
        if self.read(offset, length) != ZEROS[:length]:
            if self.device:
                with contextlib.suppress(OSError):
                    fcntl.ioctl(self.fd, BLKDISCARD, struct.pack("=QQ", offset, length))
            else:
                LIBC.fallocate(self.fd, PUNCH_HOLE, ctypes.c_int64(offset), ctypes.c_int64(length))
            self.write(offset, ZEROS[:length], compare=True)

    def __exit__(self, failed, *_exc):
        if not failed:
            try:
                os.fsync(self.fd)
                os.close(self.fd)
                self.fd = None
                if self.temp:
                    os.rename(self.temp, self.path)
                    self.temp = None
                if self.commit:
                    self.commit()
                return
            except BaseException as e:
                self.__exit__(e)
                raise
        if self.fd is not None:
            os.close(self.fd)
        if self.temp:
            os.unlink(self.temp)
        if self.abort:
            self.abort()


def restore(archive, chunk_map, total, write, opts, label, zero=None, wanted=None):
    """Fetch and check the chunks ``wanted(index, id, length)`` picks (all if None)
    and ``write(offset, data)`` each; a zero chunk picked goes to
    ``zero(offset, length)`` (None: skipped, the target reads zeros there)."""
    cs, count = archive.chunk_size, len(chunk_map)

    def picked():
        after = 0
        for i in range(count):
            if i < after:
                continue
            cid, n = chunk_map[i], min(cs, total - i * cs)
            if cid == ZERO and not zero and chunk_map.ids.count(0, 32 * i, 32 * (i + HOLES)) == 32 * HOLES:
                after = i + HOLES  # so many zero chunks in a row: passed over at once
                continue
            if wanted and not wanted(i, cid, n):
                continue
            if cid != ZERO:
                yield i, cid, n
            elif zero:
                zero(i * cs, n)
    progress = Progress(opts, label, total)
    fetched = 0
    with contextlib.closing(archive.fetch(picked())) as chunks:
        for fetched, (index, data) in enumerate(chunks, 1):
            write(index * cs, data)
            progress.update(index * cs)
    progress.close()
    return fetched


def baseline(archive, rot, vol, index):
    """--use-snapshot: the record of the local snapshot that holds the
    volume's newest session (sources/snapshots.py), and a test of the chunks
    where session ``index`` may differ from it: those the record says
    changed since, those of another size, and every chunk a later session's
    manifest lists.  None if the pool has no such snapshot."""
    sessions, cs = vol["sessions"], archive.chunk_size
    rec = rot.current(sessions[-1]["mac"])
    if rec is None:
        return None
    count = chunk_count(sessions[index]["size"], cs)
    may = bytearray((count + 7) // 8)
    listed = (i for j in range(index + 1, len(sessions)) for i, _cid in entries(archive.read_manifest(vol, j)))
    runs = (range(a, b) for a, b in rec["changed"] + size_runs(rec["size"], sessions[index]["size"], cs))
    for i in itertools.chain(listed, *runs):
        if i < count:
            may[i >> 3] |= 1 << (i & 7)
    return rec, lambda i, _cid, _n: may[i >> 3] >> (i & 7) & 1


def consent(opts, what):
    """Replacing data asks first on a terminal, or needs --force."""
    if not opts.force:
        confirm(opts, "%s. Replace it?" % what, "%s: --force replaces it" % what)


def holds_data(path):
    """Whether --save-to holds data: a file that is not empty, a device not all zeros in its first MiB."""
    mode = os.stat(path).st_mode if os.path.exists(path) else 0
    if not stat.S_ISBLK(mode):
        return stat.S_ISREG(mode) and os.path.getsize(path) > 0
    with open(path, "rb", buffering=0) as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)  # no read-ahead: the first MiB only
        return bool(f.read(1 << 20).strip(b"\0"))


def run(opts, app):
    if not opts.save_to and not opts.local:
        raise Fail("receive needs --save-to=PATH or --local=POOL")
    if len(opts.volumes) != 1:
        raise Fail("receive: name one volume")
    sparse = opts.sparse or opts.sparse_write
    if opts.save_to and holds_data(opts.save_to):
        consent(opts, "%s holds data" % opts.save_to)
    with Archive(opts, app).open() as archive, contextlib.ExitStack() as stack:
        vol = archive.require_volume(opts.volumes[0])
        index = pick_session(opts, vol)
        ses, chunk_map, cs = vol["sessions"][index], archive.chunk_map(vol, index), archive.chunk_size
        path, commit, abort, base = opts.save_to, None, None, None
        if not path:
            volume = open_source(opts.local, vol["name"], create=True)
            if (sparse or opts.use_snapshot) and not opts.overwrite and volume.exists():  # in place: over data
                consent(opts, "%s exists in %s" % (vol["name"], opts.local))
            if opts.use_snapshot:  # the lock keeps send and monitor from rotating it meanwhile
                rot = stack.enter_context(contextlib.closing(Rotation(volume, archive.meta, vol["id"])))
                base = baseline(archive, rot, vol, index)
            path, commit, abort = volume.receive_path(ses["size"], opts.overwrite or sparse or opts.use_snapshot,
                                                      base and base[0]["snap"])
        in_place = bool(base) or sparse and os.path.exists(path)
        missing = "snapshot" if opts.use_snapshot and not base else "volume" if sparse and not in_place else None
        if missing:
            notice(opts, "%s: no %s to start from: receiving %s" % (vol["name"], missing, "sparsely" if in_place
                                                                    else "all of it"))
        def differs(i, cid, n):  # --sparse: does the local chunk's keyed id differ?
            data = target.read(i * cs, n)
            return (ZERO if data == ZEROS[:n] else archive.keys.chunk_id(data)) != cid
        target = FileTarget(path, ses["size"], in_place, commit, abort)
        try:
            with target:
                wanted = base[1] if base else differs if opts.sparse and in_place else None
                fetched = restore(archive, chunk_map, ses["size"], functools.partial(
                    target.write, compare=in_place and not wanted), opts, vol["name"],
                    target.zero if target.device or in_place else None, wanted)
        except (Fail, OSError) as e:
            if target.temp is None and not abort:  # written in place
                raise Fail("%s; %s is partly overwritten: receive it again" % (e, path)) from None
            raise
    say(opts, "%s: session %s received to %s (%s, %d chunks)" % (
        vol["name"], ses["name"], path if opts.save_to else "%s in %s" % (vol["name"], opts.local),
        size(ses["size"]), fetched))
    return 0


def run_verify(opts, app):
    def verify(name, vol):
        index = pick_session(opts, vol)
        ses = vol["sessions"][index]
        fetched = restore(archive, archive.chunk_map(vol, index), ses["size"], lambda _o, _d: None, opts, name)
        say(opts, "%s: session %s verified (%s, %d chunks)" % (name, ses["name"], size(ses["size"]), fetched))

    with Archive(opts, app).open() as archive:
        vols = chosen_volumes(opts, archive)  # a qube name: all its volumes
        several = Several(opts, len(vols) > 1)
        several.each([(v["name"], v) for v in vols], verify)
    return several.status()
