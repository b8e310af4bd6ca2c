"""``ssh://[user@]host[:port]/path``: a folder on a host the agent reaches
with the OpenSSH client, spoken to with SFTP alone (sftp.py), so that a
server allowing nothing else (``ForceCommand internal-sftp`` in a chroot,
as rented backup space is) is enough.

ssh runs with the user's own configuration: keys, ssh-agent, known_hosts,
``~/.ssh/config`` aliases, ProxyJump.  It never asks (BatchMode): an
unknown host key is refused unless that configuration accepts new keys,
and a changed key is always refused (``StrictHostKeyChecking no`` becomes
``accept-new``).  One ssh connection serves a whole command, with many
requests in flight on each of its SESSIONS SFTP sessions (ssh's own
multiplexing: a session's channel moves at most its window, 2 MiB, per
round trip, and has a server process of its own).  Every object goes
through the session its folder hashes to, so that a folder's MKDIR comes
before the OPENs below it on the same session.
"""
import collections
import contextlib
import errno
import os
import secrets
import shlex
import shutil
import subprocess
import tempfile
import threading
import zlib

from . import Store, StoreError
from . import sftp as S
from .local import TMP_SUFFIX

WRITE_WINDOW = 16  # writes of one object in flight
READ_WINDOW = 8  # reads ahead of one reader
READDIRS = 4  # READDIR requests in flight for one folder
SESSIONS = 4  # SFTP sessions on the one ssh connection
SAFE_IO = 32768  # the read and write size every SFTP server must take
FILE_MODE, FOLDER_MODE = 0o600, 0o700
USAGE = "ssh: takes the form ssh://[user@]host[:port]/absolute/path"


def open_url(url):
    netloc, slash, path = url[len("ssh://"):].partition("/")
    user, _, hostport = netloc.rpartition("@")
    if hostport.startswith("["):  # [IPv6 address]:port
        host, _, port = hostport[1:].partition("]")
        port = port[1:] if port.startswith(":") else port
    else:
        host, _, port = hostport.partition(":")
    if not host or host.startswith("-") or user.startswith("-") or not path or (port and not port.isdigit()):
        raise StoreError(USAGE)
    return SSHStore(user, host, port, "/" + path)


def ssh_argv(user, host, port):
    """The ssh command line, as (options, destination and command):
    ``WYNG_SSH_COMMAND`` (default ``ssh``), with what must hold whatever the
    configuration says."""
    base = shlex.split(os.environ.get("WYNG_SSH_COMMAND", "ssh"))
    target = (["-p", port] if port else []) + (["-l", user] if user else [])
    config = effective_config(base + target + ["-G", "--", host])
    argv = base + ["-oBatchMode=yes", "-oClearAllForwardings=yes", "-oForwardAgent=no", "-oForwardX11=no",
                   "-oPermitLocalCommand=no"]
    if config.get("stricthostkeychecking") in ("false", "no", "off"):
        argv.append("-oStrictHostKeyChecking=accept-new")
    if config.get("serveraliveinterval", "0") == "0":  # notice a peer that went silent
        argv += ["-oServerAliveInterval=15", "-oServerAliveCountMax=4"]
    return argv + target, ["-s", "--", host, "sftp"]


def effective_config(argv):
    """``ssh -G``: the options ssh would use for this host, lower-case."""
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise StoreError("cannot run %s: %s" % (argv[0], getattr(e, "strerror", None) or e)) from None
    if done.returncode != 0:
        raise StoreError("ssh: %s" % (done.stderr.strip().splitlines() or ["bad configuration"])[-1])
    return dict(line.partition(" ")[::2] for line in done.stdout.splitlines())


class SSHStore(Store):
    connections = 32
    needs_sync = False  # every write is fsynced on the server (fsync@openssh.com)

    def __init__(self, user, host, port, root):
        who = (user + "@" if user else "") + host
        self.root = root.rstrip("/")
        self.location = "ssh://%s%s%s" % (who, ":" + port if port else "", root)
        self.conns = self._connect(*ssh_argv(user, host, port), "ssh " + who)
        self.conn = self.conns[0]  # for what belongs to no folder
        ext = self.conn.extensions
        # without posix-rename, SFTP's RENAME never replaces: chunks only
        self.atomic_replace = "posix-rename@openssh.com" in ext
        self.fsync = "fsync@openssh.com" in ext
        self.max_read = self.max_write = SAFE_IO
        if "limits@openssh.com" in ext:
            p = S.Parser(self.conn.extended("limits@openssh.com").wait()[1])
            _packet, read, write = p.u64(), p.u64(), p.u64()
            self.max_read, self.max_write = read or SAFE_IO, write or SAFE_IO
        self.dirs, self.dir_lock = set(), threading.Lock()

    def _connect(self, argv, tail, what):
        """The first session starts the connection and listens for more on
        a socket in a private folder; each further one is a multiplexing
        client of it.  A server that allows fewer sessions gets fewer."""
        # in /tmp: a socket's path must be short (OpenSSH gives up past 107 bytes)
        self.control = tempfile.mkdtemp(prefix="wyng-ssh-", dir="/tmp")
        socket = os.path.join(self.control, "socket")
        try:
            conns = [S.Connection(argv + ["-oControlMaster=yes", "-oControlPersist=no", "-oControlPath=" + socket]
                                  + tail, what)]
        except StoreError:
            shutil.rmtree(self.control, ignore_errors=True)
            raise
        with contextlib.suppress(StoreError):
            # no socket: the first one did not listen.  A client whose session
            # the first one cannot open would log in on its own: its
            # ProxyCommand (which comes before any ProxyJump) makes that fail
            while len(conns) < SESSIONS and os.path.exists(socket):
                conns.append(S.Connection(argv + ["-oControlMaster=no", "-oControlPath=" + socket,
                                                  "-oProxyCommand=false"] + tail, what, master=conns[0]))
        return conns

    def _on(self, name):
        """The session that serves objects in ``name``'s folder."""
        return self.conns[zlib.crc32(name.rpartition("/")[0].encode()) % len(self.conns)]

    def _path(self, name):
        return (self.root + "/" + name if name else self.root or "/").encode("utf-8", "surrogateescape")

    # -- writing ------------------------------------------------------------------
    def make_root(self):
        parts = self.root.split("/")
        failed = None
        for reply in [self._mkdir(self.conn, "/".join(parts[:i]).encode()) for i in range(2, len(parts) + 1)]:
            try:
                reply.wait()
            except OSError as e:  # it exists, or is above a chroot: the check below says
                failed = e
        try:
            _size, mode = self._lstat(self._path(""), self.root).wait_attrs()
        except FileNotFoundError:
            raise failed or StoreError(errno.ENOENT, "cannot make the folder", self.location) from None
        if mode is None or mode & S.S_IFMT != S.S_IFDIR:
            raise StoreError(errno.ENOTDIR, "not a folder", self.location)

    def write(self, name, parts, durable=False):
        path = self._path(name)
        temp = path + (TMP_SUFFIX + secrets.token_hex(4)).encode()
        self._put(temp, name, parts)
        conn = self._on(name)
        try:
            if self.atomic_replace:
                conn.extended("posix-rename@openssh.com", S.string(temp), S.string(path), path=name).wait()
            else:
                conn.call(S.RENAME, S.string(temp), S.string(path), path=name)
        except OSError:
            self._forget(conn, temp)
            raise

    def create_exclusive(self, name, data):
        """A whole temporary file, then SFTP's RENAME, which never replaces."""
        path = self._path(name)
        temp = path + (TMP_SUFFIX + secrets.token_hex(4)).encode()
        self._put(temp, name, data)
        conn = self._on(name)
        try:
            conn.call(S.RENAME, S.string(temp), S.string(path), path=name)
        except S.Failure:
            self._forget(conn, temp)
            if self.size(name) is None:
                raise
            return False
        return True

    def _put(self, temp, name, parts):
        """Write a new file, fsynced, in one round trip after the open."""
        conn = self._on(name)
        handle = self._open(temp, name, S.OPEN_WRITE | S.OPEN_CREAT | S.OPEN_EXCL)
        replies, offset, closed = collections.deque(), 0, False
        try:
            for piece, length in _pieces(parts, self.max_write):
                replies.append(conn.request(S.WRITE, handle, S.U64.pack(offset), S.U32.pack(length), *piece,
                                                 path=name))
                offset += length
                if len(replies) > WRITE_WINDOW:
                    replies.popleft().wait()
            if self.fsync:
                replies.append(conn.extended("fsync@openssh.com", handle, path=name))
            closed = True
            replies.append(conn.request(S.CLOSE, handle, path=name))
            for reply in replies:
                reply.wait()
        except BaseException as e:
            if not closed:
                self._forget(conn, None, handle)
            self._forget(conn, temp)
            if isinstance(e, S.Failure) and self._full():
                raise StoreError(errno.ENOSPC, "no space left on the server", self.location) from None
            raise

    def _open(self, path, name, flags):
        """OPEN, making the folders above first (pipelined before it)."""
        for attempt in (1, 2):
            self._folders(name, wait=attempt == 2)
            try:
                return S.string(S.Parser(self._on(name).call(
                    S.OPEN, S.string(path), S.U32.pack(flags), S.U32.pack(S.ATTR_PERMISSIONS),
                    S.U32.pack(FILE_MODE), path=name)[1]).string())
            except FileNotFoundError:
                if attempt == 2 or not flags & S.OPEN_CREAT:
                    raise
                self.dirs.clear()  # a folder went away, or the server reordered: make them again and wait

    def _folders(self, name, wait=False):
        parts, conn = name.split("/")[:-1], self._on(name)
        for i in range(1, len(parts) + 1):
            folder = "/".join(parts[:i])
            if folder not in self.dirs:
                with self.dir_lock:
                    if folder not in self.dirs:
                        reply = self._mkdir(conn, self._path(folder))
                        if wait:
                            try:
                                reply.wait()
                            except OSError:
                                pass
                        self.dirs.add(folder)  # after the MKDIR went out: later OPENs follow it

    @staticmethod
    def _mkdir(conn, path):
        return conn.request(S.MKDIR, S.string(path), S.U32.pack(S.ATTR_PERMISSIONS), S.U32.pack(FOLDER_MODE))

    @staticmethod
    def _forget(conn, path, handle=None):
        """Remove a temporary file (or close a handle) without waiting."""
        try:
            if handle:
                conn.request(S.CLOSE, handle)
            else:
                conn.request(S.REMOVE, S.string(path))
        except OSError:
            pass

    def _full(self):
        try:
            free = self.free_bytes()
        except OSError:
            return False
        return free is not None and free < 1 << 20

    def delete(self, name):
        try:
            self._on(name).call(S.REMOVE, S.string(self._path(name)), path=name)
        except FileNotFoundError:
            pass

    # -- reading --------------------------------------------------------------
    def open(self, name):
        """OPEN and LSTAT go out together; the size sets how far to read ahead."""
        path, conn = self._path(name), self._on(name)
        opening, stat = conn.request(S.OPEN, S.string(path), S.U32.pack(S.OPEN_READ), S.U32.pack(0),
                                          path=name), self._lstat(path, name)
        handle = S.string(S.Parser(opening.wait()[1]).string())
        try:
            size = stat.wait_attrs()[0]
        except OSError:
            size = None
        return _Reader(conn, handle, name, size or 0, self.max_read)

    def read(self, name):
        with self.open(name) as reader:
            return reader.read()

    def sizes(self, names):
        replies = [self._lstat(self._path(name), name) for name in names]
        out = []
        for reply in replies:
            try:
                size, mode = reply.wait_attrs()
            except FileNotFoundError:
                size = mode = None
            out.append(size if mode is None or mode & S.S_IFMT == S.S_IFREG else None)
        return out

    def _lstat(self, path, name):
        return _Attrs(self._on(name).request(S.LSTAT, S.string(path), path=name))

    def list(self, prefix, recursive=True):
        conn = self._on(prefix + "/")
        try:
            handle = S.string(S.Parser(conn.call(S.OPENDIR, S.string(self._path(prefix)),
                                                      path=prefix)[1]).string())
        except FileNotFoundError:
            return
        folders, more = [], True
        try:
            while more:
                for reply in [conn.request(S.READDIR, handle, path=prefix) for _ in range(READDIRS)]:
                    if not reply.ok():
                        more = False
                        continue
                    p = S.Parser(reply.body)
                    for _ in range(p.u32()):
                        base = bytes(p.string()).decode("utf-8", "surrogateescape")
                        p.string()  # the long name
                        _size, mode = p.attrs()
                        if base in (".", ".."):
                            continue
                        name = prefix.rstrip("/") + "/" + base if prefix else base
                        if mode is not None and mode & S.S_IFMT == S.S_IFDIR:
                            folders.append(name)
                        else:
                            yield name
        finally:
            self._forget(conn, None, handle)
        for folder in folders if recursive else ():
            yield from self.list(folder)

    def free_bytes(self):
        if "statvfs@openssh.com" not in self.conn.extensions:
            return None
        p = S.Parser(self.conn.extended("statvfs@openssh.com", S.string(self._path(""))).wait()[1])
        _bsize, frsize, _blocks, _bfree, bavail = (p.u64() for _ in range(5))
        return bavail * frsize

    def close(self):
        for conn in reversed(self.conns):  # the first one last: it carries the connection
            conn.close()
        shutil.rmtree(self.control, ignore_errors=True)


def _pieces(parts, size):
    """The bytes of ``parts`` (a bytes-like object or an iterable of them)
    as (views, length) of ``size`` bytes each, the last shorter: a small
    part goes in one WRITE with its neighbours, and nothing is copied."""
    piece, length = [], 0
    for part in [parts] if isinstance(parts, (bytes, bytearray, memoryview)) else parts:
        view = memoryview(part).cast("B")
        while view:
            take = view[:size - length]
            piece.append(take)
            length += len(take)
            view = view[len(take):]
            if length == size:
                yield piece, length
                piece, length = [], 0
    if piece:
        yield piece, length


class _Attrs:
    """A stat request's reply."""

    def __init__(self, reply):
        self.reply = reply

    def wait_attrs(self):
        """(size, mode) of the answer."""
        return S.Parser(self.reply.wait()[1]).attrs()


class _Reader:
    """An open file read front to back, with up to READ_WINDOW reads in
    flight ahead of the caller (the first ones sent with no wait beyond
    the open, covering ``expected`` bytes and one read more)."""

    def __init__(self, conn, handle, name, expected, step):
        self.conn, self.handle, self.name, self.step = conn, handle, name, step
        self.expected, self.sent, self.pos = expected, 0, 0
        self.pending, self.parts, self.have, self.eof = collections.deque(), [], 0, False

    def _fill(self):
        """Keep reads going: up to the expected end, and a few beyond once
        the file proved longer."""
        end = max(self.expected, self.pos + self.step) + self.step
        while self.sent < end and len(self.pending) < READ_WINDOW:
            self.pending.append((self.sent, self.conn.request(S.READ, self.handle, S.U64.pack(self.sent),
                                                              S.U32.pack(self.step), path=self.name)))
            self.sent += self.step

    def read(self, n=-1):
        while (n < 0 or self.have < n) and not self.eof:
            self._fill()
            offset, reply = self.pending.popleft()
            if not reply.ok():
                self.eof = True
                break
            data = S.Parser(reply.body).string()
            self.parts.append(data)
            self.have += len(data)
            self.pos = offset + len(data)
            if len(data) < self.step:
                if self.pos >= self.expected:  # OpenSSH reads short only at the end
                    self.eof = True
                else:  # a server that reads less at a time: go on from where it stopped
                    self.pending.clear()
                    self.sent, self.step = self.pos, max(len(data), 1)
        # the replies are joined once; what is left over stays a view of that
        joined = b"".join(self.parts)
        n = len(joined) if n < 0 else min(n, len(joined))
        self.parts, self.have = [memoryview(joined)[n:]], len(joined) - n
        return joined if n == len(joined) else joined[:n]

    def close(self):
        self.pending.clear()
        try:
            self.conn.request(S.CLOSE, self.handle)
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *_exc):
        self.close()
