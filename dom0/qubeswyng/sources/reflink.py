"""Change detection on reflink filesystems (Btrfs, XFS): the low-level part.

A snapshot is a reflink copy (FICLONE): it shares every data block with
the volume at that moment.  Later, the volume's writes go to new blocks
(copy on write) while the snapshot keeps the old ones, so two snapshots of
one volume map a byte to the same physical address exactly where that byte
was not rewritten in between.  ``changed_ranges`` compares the two
logical->physical mappings (from FIEMAP) interval by interval.

This holds only while the old snapshot exists, unmodified, from the moment
it was cloned until the new map is read: its references are what keep its
blocks from being freed and reused for other data.  So read both maps when
comparing, never keep an old map for later.  See doc/reflink.md.

``Volume`` is the reflink source: a volume file of a --local directory,
its snapshots beside it and the chunks changed between two of them.
"""
import contextlib
import errno
import fcntl
import os
import re
import stat
import struct

from ..errors import Fail
from . import NoSnapshots
from .image import ImageSource, open_path


def _ioc(direction, kind, nr, size):
    """_IOC() of asm-generic/ioctl.h (x86, arm): dir:2 size:14 type:8 nr:8."""
    return direction << 30 | size << 16 | kind << 8 | nr


_WRITE, _READ = 1, 2
FICLONE = _ioc(_WRITE, 0x94, 9, struct.calcsize("i"))                  # 0x40049409
FS_IOC_GETFLAGS = _ioc(_READ, ord("f"), 1, struct.calcsize("l"))       # 0x80086601
FS_NOCOW_FL = 0x00800000

# struct fiemap: fm_start, fm_length (u64); fm_flags, fm_mapped_extents,
# fm_extent_count, fm_reserved (u32); then fm_extent_count extents of
# struct fiemap_extent: fe_logical, fe_physical, fe_length,
# fe_reserved64[2] (u64); fe_flags, fe_reserved[3] (u32).
FIEMAP = struct.Struct("=QQIIII")                                    # 32 bytes
FIEMAP_EXTENT = struct.Struct("=QQQ16xI12x")                         # 56 bytes
FS_IOC_FIEMAP = _ioc(_READ | _WRITE, ord("f"), 11, FIEMAP.size)      # 0xC020660B
FIEMAP_MAX_OFFSET = (1 << 64) - 1
FIEMAP_FLAG_SYNC = 0x1
BATCH = 512                      # extents asked for per FIEMAP call

EXTENT_LAST = 0x1
EXTENT_UNKNOWN = 0x2             # data location unknown
EXTENT_DELALLOC = 0x4            # not allocated yet (also sets UNKNOWN)
EXTENT_ENCODED = 0x8             # compressed: physical is where the encoded extent starts
EXTENT_DATA_ENCRYPTED = 0x80
EXTENT_NOT_ALIGNED = 0x100
EXTENT_DATA_INLINE = 0x200       # data lives in metadata
EXTENT_DATA_TAIL = 0x400         # packed with other files' tails
EXTENT_UNWRITTEN = 0x800         # allocated, reads as zeros
# A physical address that does not identify the bytes at that offset: such
# an extent is always taken as changed.
UNRELIABLE = (EXTENT_UNKNOWN | EXTENT_DELALLOC | EXTENT_ENCODED | EXTENT_DATA_ENCRYPTED
              | EXTENT_NOT_ALIGNED | EXTENT_DATA_INLINE | EXTENT_DATA_TAIL)
# LAST, MERGED and SHARED say nothing about the bytes (SHARED flips when the
# other snapshot goes away) and are ignored; UNWRITTEN is compared.


_CLONE_ERRORS = {errno.EXDEV: "not on the same filesystem",
                 errno.EINVAL: "the filesystem refused it (a No_COW file, or not a regular file?)"}


def clone(src_path, dst_path):
    """Make ``dst_path`` (which must not exist) a read-only reflink copy of
    ``src_path``, synced to disk.  Nothing is left behind on failure."""
    with contextlib.ExitStack() as fds:
        src = open_path(src_path, os.O_RDONLY | os.O_CLOEXEC)
        fds.callback(os.close, src)
        dst = open_path(dst_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o400)
        fds.callback(os.close, dst)
        try:
            fcntl.ioctl(dst, FICLONE, src)
            os.fsync(dst)
        except BaseException as e:  # also ^C: never leave a partial snapshot
            with contextlib.suppress(OSError):
                os.unlink(dst_path)
            if not isinstance(e, OSError):
                raise
            if e.errno in (errno.EOPNOTSUPP, errno.ENOTTY):
                raise NoSnapshots("filesystem does not support reflinks") from None
            why = _CLONE_ERRORS.get(e.errno, e.strerror)
            raise Fail("cannot reflink %s to %s: %s" % (src_path, dst_path, why)) from None


def extent_map(fd):
    """The file's extents as sorted ``(logical, physical, length, flags)``,
    asked for ``BATCH`` at a time, delayed allocation flushed first."""
    buf = bytearray(FIEMAP.size + BATCH * FIEMAP_EXTENT.size)
    extents, start = [], 0
    while True:
        FIEMAP.pack_into(buf, 0, start, FIEMAP_MAX_OFFSET - start, FIEMAP_FLAG_SYNC, 0, BATCH, 0)
        try:
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOTTY):
                raise Fail("filesystem does not report extent maps (FIEMAP)") from None
            raise Fail("cannot read the extent map: %s" % e.strerror) from None
        count = FIEMAP.unpack_from(buf)[3]
        end, last = start, count == 0
        for i in range(count):
            logical, physical, length, flags = FIEMAP_EXTENT.unpack_from(
                buf, FIEMAP.size + i * FIEMAP_EXTENT.size)
            if logical < start:  # an extent that began before this call's start
                cut = min(start - logical, length)
                logical, physical, length = logical + cut, physical + cut, length - cut
            if length:
                extents.append((logical, physical, length, flags))
                end = max(end, logical + length)
            last = last or flags & EXTENT_LAST
        if last:
            break
        if end <= start:
            raise Fail("the extent map does not advance past byte %d" % start)
        start = end
    return sorted(extents)


_HOLE = "hole"


def _segments(extents, limit):
    """Sorted, non-overlapping ``(start, end, key)`` within [0, limit);
    equal keys mean equal bytes, key None means "cannot tell"."""
    out, pos = [], 0
    for logical, physical, length, flags in sorted(extents):
        start, end = max(logical, pos), min(logical + length, limit)
        if start >= end:
            continue
        out.append((start, end, None if flags & UNRELIABLE else (physical - logical, bool(flags & EXTENT_UNWRITTEN))))
        pos = end
    return out


def changed_ranges(old_map, new_map, old_size, new_size):
    """Sorted, merged ``[(start, end), …]`` byte ranges of the new file
    that may differ from the old one.  A byte is unchanged only if both
    files have a hole there, or both map it to the same physical address
    through reliable extents of the same kind (written or unwritten)."""
    limit = min(old_size, new_size)
    old, new = _segments(old_map, limit), _segments(new_map, limit)
    # past limit (the old end) there is one piece, [limit, new_size): changed
    cuts = sorted({0, limit, new_size}.union(*((s, e) for s, e, _k in old), *((s, e) for s, e, _k in new)))
    ranges, i, j = [], 0, 0
    for a, b in zip(cuts, cuts[1:]):
        while i < len(old) and old[i][1] <= a:
            i += 1
        while j < len(new) and new[j][1] <= a:
            j += 1
        k_old = old[i][2] if i < len(old) and old[i][0] <= a else _HOLE
        k_new = new[j][2] if j < len(new) and new[j][0] <= a else _HOLE
        if b <= limit and k_old is not None and k_old == k_new:
            continue
        if ranges and ranges[-1][1] == a:
            ranges[-1] = (ranges[-1][0], b)
        else:
            ranges.append((a, b))
    return ranges


def is_nodatacow(fd):
    """True if the file has the No_COW attribute (``chattr +C``): its
    blocks may be overwritten in place, so its map cannot be trusted."""
    buf = bytearray(struct.calcsize("l"))
    try:
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf)
    except OSError as e:
        if e.errno in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL):
            return False  # no attributes at all
        raise Fail("cannot read file attributes: %s" % e.strerror) from None
    return bool(struct.unpack_from("i", buf)[0] & FS_NOCOW_FL)


# -- the source: a volume file and its snapshots (doc/sources.md) --------------

SNAPSHOT = re.compile(r"^\.(.+)\.qwyng-([0-9a-f]{16})\.(?:[0-9a-f]{8}\.)?(tick|tock)$")


class Volume:
    """``<local>/<name>``; snapshots are ``.<file>.qwyng-<archive>.<slot>``
    beside it (same filesystem), read-only and owned by us.  ``size`` is
    None for a ``create`` target that does not exist."""
    nodatacow = False

    def __init__(self, local, name, create=False):
        self.local, self.name, self.path = local, name, os.path.join(local, name)
        self.dir, self.base = os.path.split(self.path)
        if not os.path.isdir(local):
            raise Fail("--local=%s: no such directory" % local)
        if create:
            self.size = os.lstat(self.path).st_size if os.path.lexists(self.path) else None
            return
        fd = open_path(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise Fail("%s: not a regular file" % self.path)
            self.size, self.nodatacow = st.st_size, is_nodatacow(fd)
        finally:
            os.close(fd)

    def exists(self):
        return os.path.isfile(self.path)

    def snapshot_name(self, archive_id, slot):
        return ".%s.qwyng-%s.%s" % (self.base, archive_id.hex()[:16], slot)

    def snapshots(self, archive_id, slots):
        return [n for n in (self.snapshot_name(archive_id, s) for s in slots)
                if os.path.lexists(os.path.join(self.dir, n))]

    def usage(self, snap):
        """Bytes the snapshot occupies (0 if it is gone)."""
        with contextlib.suppress(FileNotFoundError):
            return os.lstat(os.path.join(self.dir, snap)).st_blocks * 512
        return 0

    def take(self, snap, archive_id):
        clone(self.path, os.path.join(self.dir, snap))
        return self.ident(snap, archive_id)

    def ident(self, snap, _archive_id):
        """What must not change while a snapshot is kept: a read-only regular
        file of ours with this inode, size, mtime and ctime (a write or
        chmod changes ctime, which nothing can set back); None if absent."""
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(os.path.join(self.dir, snap))
            if stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o400 \
                    and st.st_uid == os.geteuid() and st.st_nlink == 1:
                return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
        return None

    def delta(self, old, new, chunk_size):
        """Chunk runs where snapshot ``new`` may differ from ``old`` (records
        with "snap"), from both extent maps read now; the old map is read
        again after the new one, so a relocation in between (balance) is
        seen and the reading repeated.  None: no safe answer."""
        with contextlib.ExitStack() as files:
            fds = [files.enter_context(open(os.path.join(self.dir, r["snap"]), "rb", buffering=0)).fileno()
                   for r in (old, new)]
            a, b = map(os.fstat, fds)
            if a.st_dev != b.st_dev or any(map(is_nodatacow, fds)):
                return None
            for _attempt in range(3):
                old_map, new_map = extent_map(fds[0]), extent_map(fds[1])
                if extent_map(fds[0]) == old_map:
                    return [(s // chunk_size, -(-e // chunk_size))
                            for s, e in changed_ranges(old_map, new_map, a.st_size, b.st_size)]
            return None

    def reader(self, snap=None):
        return ImageSource(os.path.join(self.dir, snap) if snap else self.path)

    def release(self, snap):
        pass

    def remove(self, snap):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.dir, snap))

    def receive_path(self, size, overwrite, snap=None):
        """receive --local: the receiver writes a temporary file beside it
        and renames it into place; an existing file only with --overwrite.
        With ``snap`` (--use-snapshot): a writable clone of that snapshot
        beside it, which the commit renames into place."""
        if os.path.lexists(self.path) and not overwrite:
            raise Fail("%s exists: give --overwrite to replace it" % self.path)
        os.makedirs(self.dir, exist_ok=True)
        if not snap:
            return self.path, None, None
        temp = os.path.join(self.dir, ".%s.qwyng-new" % self.base)
        self.remove(temp)  # left by an interrupted receive
        clone(os.path.join(self.dir, snap), temp)
        os.chmod(temp, 0o600)
        return temp, lambda: os.rename(temp, self.path), lambda: self.remove(temp)


def clean(local, archive_id=None):
    """Remove our snapshots under ``local`` (of one archive, or of all);
    returns (path, bytes it occupied) of each."""
    removed = []
    for folder, _dirs, files in os.walk(local):
        for name in files:
            m = SNAPSHOT.match(name)
            if m and (archive_id is None or m.group(2) == archive_id.hex()[:16]):
                path = os.path.join(folder, name)
                removed.append((path, os.lstat(path).st_blocks * 512))
                os.unlink(path)
    return removed
