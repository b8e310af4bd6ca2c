"""A read-only FUSE file system holding one file, on the kernel's own
protocol (``/dev/fuse``, ``linux/fuse.h``), with no FUSE library.

One folder with one file, whose bytes come from a ``read(offset, length)``
callable: that is all wyng.Browse needs, and it is a few dozen requests of
a stable kernel ABI.  A library (libfuse through fusepy, or pyfuse3) would
add a package to every template for less than this module does, and
fusepy still needs libfuse 2.  Requests are served one at a time, in the
order the kernel sends them; the mount is made with mount(2), so it needs
root (CAP_SYS_ADMIN), as wyng.Browse and ``qvm-wyng mount`` have.
"""
import ctypes
import errno
import os
import select
import stat
import struct

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, extlen, padding
OUT_HEADER = struct.Struct("<IiQ")        # len, error, unique
ATTR = struct.Struct("<6Q10I")            # ino size blocks atime mtime ctime, nsecs x3 mode nlink uid gid rdev blksize flags
ENTRY = struct.Struct("<4Q2I")            # nodeid, generation, entry_valid, attr_valid, their nsecs
ATTR_VALID = struct.Struct("<QII")        # attr_valid, nsec, dummy
INIT_IN = struct.Struct("<4I")            # major, minor, max_readahead, flags
INIT_OUT = struct.Struct("<4I2H2I2HI7I")  # ... max_background, congestion, max_write, time_gran, max_pages, ...
OPEN_OUT = struct.Struct("<QII")          # fh, open_flags, padding
READ_IN = struct.Struct("<QQI")           # fh, offset, size
DIRENT = struct.Struct("<QQII")           # ino, next offset, name length, type
STATFS = struct.Struct("<5Q4I6I")
(LOOKUP, FORGET, GETATTR, OPEN, READ, STATFS_OP, RELEASE, FLUSH, INIT, OPENDIR, READDIR, RELEASEDIR,
 ACCESS, INTERRUPT, DESTROY, BATCH_FORGET) = (1, 2, 3, 14, 15, 17, 18, 25, 26, 27, 28, 29, 34, 36, 38, 42)
NO_REPLY = (FORGET, INTERRUPT, BATCH_FORGET)
ROOT, FILE = 1, 2
MINOR = 31                   # protocol 7.31: max_pages; kernels since 5.2 speak it
ASYNC_READ, MAX_PAGES = 1, 1 << 22
KEEP_CACHE = 2               # the file never changes: keep its pages between opens
MAX_PAGES_WANTED = 256       # reads of up to 1 MiB
BUFFER = 1 << 16             # enough for any request (we take no writes)
VALID = 1 << 30              # seconds the kernel may cache names and attributes
MS_RDONLY, MS_NOSUID, MS_NODEV, MNT_DETACH = 1, 2, 4, 2


class OneFile:
    def __init__(self, name, size, mtime, read):
        self.name, self.size, self.mtime, self.read = name.encode(), size, mtime, read
        self.uid, self.gid = os.getuid(), os.getgid()

    # -- mounting --------------------------------------------------------------
    def mount(self, target):
        """Mount on folder ``target``; returns the /dev/fuse descriptor to serve."""
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        options = "fd=%d,rootmode=40000,user_id=%d,group_id=%d,default_permissions" % (fd, self.uid, self.gid)
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mount(b"qubes-wyng", os.fsencode(target), b"fuse.qubes-wyng", MS_RDONLY | MS_NOSUID | MS_NODEV,
                      options.encode()) != 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, "cannot mount FUSE on %s: %s" % (target, os.strerror(err)))
        return fd

    @staticmethod
    def unmount(target):
        """Detach the mount (it goes once nothing uses it); no error if it is gone."""
        ctypes.CDLL(None, use_errno=True).umount2(os.fsencode(target), MNT_DETACH)

    # -- serving ---------------------------------------------------------------
    def serve(self, fd, watch=None, on_watch=None):
        """Answer the kernel until the file system is unmounted.  When ``watch``
        (a descriptor) becomes readable while no request is pending, call
        ``on_watch()`` once and stop watching: the peer that feeds ``read``
        has gone."""
        while True:
            if watch is not None and watch in select.select([fd, watch], [], [])[0]:
                watch = None
                on_watch()
                continue
            try:
                request = os.read(fd, BUFFER)
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.EINTR, errno.EAGAIN):
                    continue  # an interrupted request, or a signal
                if e.errno in (errno.ENODEV, errno.EBADF):
                    return  # unmounted
                raise
            length, opcode, unique, node = IN_HEADER.unpack_from(request)[:4]
            if opcode in NO_REPLY:
                continue
            try:
                reply = self.handle(opcode, node, request[IN_HEADER.size:length])
                error = 0
            except Exception as e:  # an answer in any case: a request left unanswered hangs its caller
                reply, error = b"", getattr(e, "errno", None) or errno.EIO
            try:
                os.writev(fd, [OUT_HEADER.pack(OUT_HEADER.size + len(reply), -error, unique), reply])
            except OSError as e:
                if e.errno != errno.ENOENT:  # ENOENT: the request was interrupted meanwhile
                    raise
            if opcode == DESTROY:
                return

    def handle(self, opcode, node, arg):
        if opcode == INIT:
            major, minor, readahead, flags = INIT_IN.unpack_from(arg)
            if major != 7:
                raise OSError(errno.EPROTO, "FUSE protocol %d" % major)
            wanted = flags & (ASYNC_READ | MAX_PAGES)
            return INIT_OUT.pack(7, min(minor, MINOR), min(readahead, 1 << 20), wanted, 16, 12, 4096, 1,
                                 MAX_PAGES_WANTED if wanted & MAX_PAGES else 0, 0, 0, *[0] * 7)
        if opcode == LOOKUP:
            if node != ROOT or arg.rstrip(b"\0") != self.name:
                raise OSError(errno.ENOENT, "")
            return ENTRY.pack(FILE, 0, VALID, VALID, 0, 0) + self.attr(FILE)
        if opcode == GETATTR:
            return ATTR_VALID.pack(VALID, 0, 0) + self.attr(node)
        if opcode in (OPEN, OPENDIR):
            flags = struct.unpack_from("<I", arg)[0]
            if (node == FILE) != (opcode == OPEN) or flags & os.O_ACCMODE != os.O_RDONLY:
                raise OSError(errno.EACCES if node in (ROOT, FILE) else errno.ENOENT, "")
            return OPEN_OUT.pack(0, KEEP_CACHE if opcode == OPEN else 0, 0)
        if opcode == READ:
            _fh, offset, size = READ_IN.unpack_from(arg)
            size = max(0, min(size, self.size - offset))
            return self.read(offset, size) if size else b""
        if opcode == READDIR:
            _fh, offset, size = READ_IN.unpack_from(arg)
            entries = [(ROOT, b"."), (ROOT, b".."), (FILE, self.name)]
            out = b""
            for index, (ino, name) in enumerate(entries[offset:], offset + 1):
                kind = (stat.S_IFDIR if ino == ROOT else stat.S_IFREG) >> 12
                record = DIRENT.pack(ino, index, len(name), kind) + name
                record += bytes(-len(record) % 8)
                if len(out) + len(record) > size:
                    break
                out += record
            return out
        if opcode == STATFS_OP:
            return STATFS.pack(0, 0, 0, 2, 0, 4096, 255, 4096, 0, *[0] * 6)
        if opcode in (RELEASE, RELEASEDIR, FLUSH, ACCESS, DESTROY):
            return b""
        raise OSError(errno.ENOSYS, "")

    def attr(self, node):
        if node == ROOT:
            mode, nlink, size = stat.S_IFDIR | 0o555, 2, 0
        elif node == FILE:
            mode, nlink, size = stat.S_IFREG | 0o444, 1, self.size
        else:
            raise OSError(errno.ENOENT, "")
        t = self.mtime
        return ATTR.pack(node, size, -(-size // 512), t, t, t, 0, 0, 0, mode, nlink, self.uid, self.gid, 0, 4096, 0)
