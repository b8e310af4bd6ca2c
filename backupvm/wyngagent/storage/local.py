"""``file:/path``: a directory on a local or FUSE-mounted filesystem
(an s3fs mount included: doc/storage.md says what that gives)."""
import ctypes
import errno
import os
import secrets

from ..hooks import point
from . import Store, StoreError

_libc = ctypes.CDLL(None, use_errno=True)
TMP_SUFFIX = ".tmp-"
SYNC_FILE_RANGE_WRITE = 2
# link() refused by the filesystem (FUSE mounts such as s3fs)
NO_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK)


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
        self._made_dirs = set()
        # an exclusive create on a FUSE mount (s3fs) holds only within that mount
        self.conditional_create = not _filesystem(self.root).startswith("fuse")

    def path(self, name):
        return os.path.join(self.root, name)

    def make_root(self):
        os.makedirs(self.root, mode=0o700, exist_ok=True)

    def write(self, name, parts, durable=False):
        final = self.path(name)
        folder = os.path.dirname(final)
        if folder not in self._made_dirs:
            os.makedirs(folder, mode=0o700, exist_ok=True)
            self._made_dirs.add(folder)
        temp = final + TMP_SUFFIX + secrets.token_hex(4)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
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
            os.unlink(temp)
            raise
        os.close(fd)
        point("agent:before-rename-" + name.split("/")[0])
        os.rename(temp, final)
        if durable:
            self._fsync_dir(folder)

    def create_exclusive(self, name, data):
        """Written aside, then linked into place (link() fails if the name
        exists): a reader never sees the object empty (the lock relies on
        it).  Where the filesystem has no links, an exclusive create."""
        final = self.path(name)
        temp = final + TMP_SUFFIX + secrets.token_hex(4)
        self._write_new(temp, data)
        try:
            os.link(temp, final)
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in NO_LINKS:
                raise
            try:
                self._write_new(final, data)
            except FileExistsError:
                return False
        finally:
            os.unlink(temp)
        return True

    def _write_new(self, path, data):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self, name):
        with open(self.path(name), "rb") as f:
            return f.read()

    def open(self, name):
        return open(self.path(name), "rb", buffering=1 << 20)

    def size(self, name):
        try:
            return os.stat(self.path(name)).st_size
        except FileNotFoundError:
            return None

    def list(self, prefix, recursive=True):
        try:
            entries = os.scandir(self.path(prefix))
        except (FileNotFoundError, NotADirectoryError):
            return
        with entries:
            for entry in entries:
                name = prefix.rstrip("/") + "/" + entry.name if prefix else entry.name
                if not entry.is_dir(follow_symlinks=False):
                    yield name
                elif recursive:
                    yield from self.list(name)

    def delete(self, name):
        try:
            os.unlink(self.path(name))
        except FileNotFoundError:
            pass

    def sync(self):
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if _libc.syncfs(fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
        finally:
            os.close(fd)

    def free_bytes(self):
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def _fsync_dir(self, folder):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
