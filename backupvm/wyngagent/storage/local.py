"""``file:/path``: a directory on a local or FUSE-mounted filesystem
(an s3fs mount included: doc/storage.md says what that gives).

The storage may be hostile: it can put a symbolic link where a folder or
an object of the archive belongs, to make the agent read, write or delete
files elsewhere in the backup VM (or in another archive).  So the root is
opened once, as dom0 named it, and every name below it is reached one
component at a time from that descriptor, never following a link
(``O_NOFOLLOW`` and ``*at`` calls): a link in the archive is never
followed, and deleting one removes the link only.
"""
import contextlib
import ctypes
import errno
import mmap
import os
import secrets
import stat
import threading

from ..hooks import point
from . import Store, StoreError

_libc = ctypes.CDLL(None, use_errno=True)
TMP_SUFFIX = ".tmp-"
SYNC_FILE_RANGE_WRITE = 2
# link() refused by the filesystem (FUSE mounts such as s3fs)
NO_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK)
FOLDER = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE = os.O_NOFOLLOW | os.O_CLOEXEC
NOT_A_FOLDER = (errno.ELOOP, errno.ENOTDIR)


def open_url(url):
    """``file:`` and an absolute path, taken as it is (no %-decoding)."""
    path = url[len("file:"):]
    if not path.startswith("/"):
        raise StoreError("file: needs an absolute path")
    return LocalStore(path)


def _filesystem(path):
    """The type of the filesystem mounted where ``path`` is (or would be)."""
    best, kind = "", ""
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            where, fstype = line.split()[1:3]
            where = where.replace("\\040", " ")
            if (path + "/").startswith(where.rstrip("/") + "/") and len(where) >= len(best):
                best, kind = where, fstype
    return kind


class LocalStore(Store):
    # the writes are CPU-bound (sealing happens on the same threads)
    connections = min(4, os.cpu_count() or 1)
    needs_sync = True

    def __init__(self, root):
        self.root = os.path.abspath(root)
        self.location = "file:" + self.root
        self._root_fd = None
        # an exclusive create on a FUSE mount (s3fs) holds only within that mount
        self.conditional_create = not _filesystem(self.root).startswith("fuse")
        self.direct, self._buffers = True, threading.local()

    def make_root(self):
        os.makedirs(self.root, mode=0o700, exist_ok=True)

    def root_fd(self):
        if self._root_fd is None:
            self._root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return self._root_fd

    @contextlib.contextmanager
    def _folder(self, path, create=False):
        """A descriptor of the folder ``path`` ("" for the root), reached
        without following links; with ``create``, missing folders are made."""
        parts = path.split("/") if path else []
        if any(p in ("", ".", "..") for p in parts):
            raise OSError(errno.EINVAL, "not a name inside the archive", path)
        fd = os.dup(self.root_fd())
        try:
            for part in parts:
                try:
                    inner = os.open(part, FOLDER, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o700, dir_fd=fd)
                    inner = os.open(part, FOLDER, dir_fd=fd)
                os.close(fd)
                fd = inner
        except OSError as e:
            os.close(fd)
            if e.errno in NOT_A_FOLDER:
                raise OSError(e.errno, "a link or a file stands where a folder of the archive belongs",
                              path) from None
            raise
        try:
            yield fd
        finally:
            os.close(fd)

    def _at(self, name, create=False):
        folder, _, base = name.rpartition("/")
        return self._folder(folder, create), base

    def write(self, name, parts, durable=False):
        folder, base = self._at(name, create=True)
        with folder as dfd:
            temp = base + TMP_SUFFIX + secrets.token_hex(4)
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | FILE, 0o600, dir_fd=dfd)
            try:
                for part in ([parts] if isinstance(parts, (bytes, bytearray, memoryview)) else parts):
                    view = memoryview(part)
                    while view:
                        view = view[os.write(fd, view):]
                if durable:
                    os.fsync(fd)
                else:
                    # start writeback now, so the commit's sync finds little left
                    _libc.sync_file_range(fd, ctypes.c_int64(0), ctypes.c_int64(0), SYNC_FILE_RANGE_WRITE)
            except BaseException:
                os.close(fd)
                os.unlink(temp, dir_fd=dfd)
                raise
            os.close(fd)
            point("agent:before-rename-" + name.split("/")[0])
            os.rename(temp, base, src_dir_fd=dfd, dst_dir_fd=dfd)  # replaces a link, never its target
            if durable:
                os.fsync(dfd)

    def create_exclusive(self, name, data):
        """Written aside, then linked into place (link() fails if the name
        exists): a reader never sees the object empty (the lock relies on
        it).  Where the filesystem has no links, an exclusive create."""
        folder, base = self._at(name)
        with folder as dfd:
            temp = base + TMP_SUFFIX + secrets.token_hex(4)
            self._write_new(dfd, temp, data)
            try:
                os.link(temp, base, src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=False)
            except FileExistsError:
                return False
            except OSError as e:
                if e.errno not in NO_LINKS:
                    raise
                try:
                    self._write_new(dfd, base, data)
                except FileExistsError:
                    return False
            finally:
                os.unlink(temp, dir_fd=dfd)
        return True

    def _write_new(self, dfd, base, data):
        fd = os.open(base, os.O_WRONLY | os.O_CREAT | os.O_EXCL | FILE, 0o600, dir_fd=dfd)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self, name):
        """The whole object.  Where the filesystem allows it, read around the
        page cache (doc/decisions.md, "Performance"); elsewhere (tmpfs, FUSE
        mounts such as s3fs) a plain read."""
        if self.direct:
            try:
                return self._read_direct(name)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self.direct = False  # refused here: plain reads from now on
        with self.open(name) as f:
            return f.read()

    def _read_direct(self, name):
        """O_DIRECT into this thread's page-aligned buffer, copied out into
        bytes of their own: a receive, verify or arch-check reads each
        object once, and filling and reclaiming the page cache for it cost
        more than the copy."""
        fd, size = self._open_file(name, os.O_DIRECT)
        try:
            buf = getattr(self._buffers, "buf", None)
            if buf is None or len(buf) <= size:  # one byte more than the file: it is read whole
                buf = self._buffers.buf = mmap.mmap(-1, (size // mmap.PAGESIZE + 1) * mmap.PAGESIZE)
            return buf[:os.preadv(fd, [buf], 0)]
        finally:
            os.close(fd)

    def open(self, name):
        return os.fdopen(self._open_file(name)[0], "rb", buffering=1 << 20)

    def _open_file(self, name, flags=0):
        """(descriptor, size) of the regular file ``name``, opened for
        reading without following links; anything else is refused."""
        folder, base = self._at(name)
        with folder as dfd:
            fd = os.open(base, os.O_RDONLY | os.O_NONBLOCK | FILE | flags, dir_fd=dfd)  # a FIFO must not block
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise OSError(errno.EISDIR, "not a file", name)
        return fd, st.st_size

    def size(self, name):
        """The size of a regular file ``name``; None if there is none (a
        link or a folder there is not an object)."""
        folder, base = self._at(name)
        try:
            with folder as dfd:
                st = os.stat(base, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno in NOT_A_FOLDER:
                return None
            raise
        return st.st_size if stat.S_ISREG(st.st_mode) else None

    def list(self, prefix, recursive=True):
        """Names under the folder ``prefix``, never looking inside a link:
        a link in the folder is listed as a name, a link as the folder
        lists nothing."""
        try:
            with self._folder(prefix) as dfd:
                entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in os.scandir(dfd)]
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno in NOT_A_FOLDER:
                return
            raise
        for base, folder in entries:
            name = prefix.rstrip("/") + "/" + base if prefix else base
            if not folder:
                yield name
            elif recursive:
                yield from self.list(name)

    def delete(self, name):
        """Remove the object (a link: the link itself); absent is fine."""
        folder, base = self._at(name)
        with contextlib.suppress(FileNotFoundError), folder as dfd:
            os.unlink(base, dir_fd=dfd)

    def sync(self):
        if _libc.syncfs(self.root_fd()) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def free_bytes(self):
        st = os.fstatvfs(self.root_fd())
        return st.f_bavail * st.f_frsize

    def close(self):
        if self._root_fd is not None:
            os.close(self._root_fd)
            self._root_fd = None
