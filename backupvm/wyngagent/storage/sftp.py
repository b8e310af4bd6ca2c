"""An SFTP client: protocol version 3 (draft-ietf-secsh-filexfer-02) and
the OpenSSH extensions it names, over the pipes of a process such as
``ssh -s host sftp``.  Standard library only: the ssh store must work
against servers that offer nothing but SFTP.

Requests are pipelined: any thread may send a request at any time; each
gets an id and a ``Reply`` to wait on, and one reader thread hands every
response to its waiter.  Many requests are in flight on the one
connection, so a batch costs about one round trip, not one per request.
OpenSSH's server handles requests in the order they arrive.
"""
import collections
import errno
import itertools
import os
import struct
import subprocess
import threading

from ..wire import write_all
from . import StoreError

(INIT, VERSION, OPEN, CLOSE, READ, WRITE, LSTAT, FSTAT, SETSTAT, FSETSTAT, OPENDIR, READDIR, REMOVE,
 MKDIR, RMDIR, REALPATH, STAT, RENAME) = range(1, 19)
STATUS, HANDLE, DATA, NAME, ATTRS = range(101, 106)
EXTENDED, EXTENDED_REPLY = 200, 201
FX_OK, FX_EOF, FX_NO_SUCH_FILE, FX_PERMISSION_DENIED, FX_FAILURE = range(5)
OPEN_READ, OPEN_WRITE, OPEN_CREAT, OPEN_TRUNC, OPEN_EXCL = 1, 2, 8, 16, 32
ATTR_SIZE, ATTR_UIDGID, ATTR_PERMISSIONS, ATTR_ACMODTIME, ATTR_EXTENDED = 1, 2, 4, 8, 1 << 31
S_IFMT, S_IFREG, S_IFDIR = 0o170000, 0o100000, 0o040000
U32, U64, HEAD = struct.Struct(">I"), struct.Struct(">Q"), struct.Struct(">IBI")
MAX_REPLY = 1 << 20  # OpenSSH sends at most 256 KiB; more is a broken peer
STDERR_KEPT = 20


def string(data):
    return U32.pack(len(data)) + data


class Failure(StoreError):
    """The server answered a request with an error status."""

    def __init__(self, code, message, path):
        super().__init__(errno.EIO, "%s (SFTP status %d)" % (message or "failure", code), path)
        self.code = code


class Reply:
    """One request's answer, once the reader thread has it.  A plain lock,
    held until the answer is in, is the signal: many requests are made per
    object, and an Event costs several times as much."""
    __slots__ = ("arrived", "kind", "body", "path")

    def __init__(self, path):
        self.arrived, self.kind, self.body, self.path = threading.Lock(), None, None, path
        self.arrived.acquire()

    def answer(self, kind, body):
        self.kind, self.body = kind, body
        self.arrived.release()

    def _wait(self):
        with self.arrived:
            pass

    def wait(self):
        """(kind, body) of the answer; an error status raises."""
        self._wait()
        if self.kind is None:
            raise StoreError(*self.body.args)
        if self.kind == STATUS:
            code, message = status(self.body)
            if code != FX_OK:
                raise error(code, message, self.path)
        return self.kind, self.body

    def ok(self):
        """True for an OK status, False for EOF; errors raise."""
        self._wait()
        if self.kind == STATUS and status(self.body)[0] == FX_EOF:
            return False
        self.wait()
        return True


def status(body):
    code, = U32.unpack_from(body)
    message = bytes(Parser(body[4:]).string()).decode("utf-8", "replace") if len(body) >= 8 else ""
    return code, message


def error(code, message, path):
    if code == FX_NO_SUCH_FILE:
        return FileNotFoundError(errno.ENOENT, "no such file", path)
    if code == FX_PERMISSION_DENIED:
        return PermissionError(errno.EACCES, "permission denied", path)
    return Failure(code, message, path)


class Parser:
    def __init__(self, data):
        self.data, self.pos = memoryview(data), 0

    def u32(self):
        self.pos += 4
        return U32.unpack_from(self.data, self.pos - 4)[0]

    def u64(self):
        self.pos += 8
        return U64.unpack_from(self.data, self.pos - 8)[0]

    def string(self):
        n = self.u32()
        self.pos += n
        if self.pos > len(self.data):
            raise StoreError("malformed SFTP reply")
        return self.data[self.pos - n:self.pos]

    def attrs(self):
        """(size or None, mode or None)."""
        flags, size, mode = self.u32(), None, None
        if flags & ATTR_SIZE:
            size = self.u64()
        if flags & ATTR_UIDGID:
            self.pos += 8
        if flags & ATTR_PERMISSIONS:
            mode = self.u32()
        if flags & ATTR_ACMODTIME:
            self.pos += 8
        if flags & ATTR_EXTENDED:
            for _ in range(2 * self.u32()):
                self.string()
        return size, mode


class Connection:
    """An SFTP session over a child process's stdin and stdout."""

    def __init__(self, argv, what, master=None):
        self.what = what  # "ssh user@host", for messages
        self.master = master  # the Connection whose ssh this one multiplexes through
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, bufsize=0)
        except OSError as e:
            raise StoreError("cannot run %s: %s" % (argv[0], e.strerror)) from None
        self.wfd, self.rfile = self.proc.stdin.fileno(), os.fdopen(self.proc.stdout.fileno(), "rb", 1 << 20)
        self.send_lock, self.ids = threading.Lock(), itertools.count(1)
        self.waiting, self.broken = {}, None
        self.stderr = collections.deque(maxlen=STDERR_KEPT)
        self.stderr_thread = self._thread(self._read_stderr)
        write_all(self.wfd, [HEAD.pack(5, INIT, 3)])  # INIT has no id: the version (3) is in its place
        kind, body = self._packet()
        if kind != VERSION:
            raise StoreError("%s: the server did not start SFTP" % what)
        parser, self.extensions = Parser(body[4:]), {}
        while parser.pos < len(body) - 4:
            name = bytes(parser.string()).decode("ascii", "replace")
            self.extensions[name] = bytes(parser.string())
        self._thread(self._read_replies)

    def _thread(self, target):
        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        return thread

    # -- sending ----------------------------------------------------------------
    def request(self, kind, *fields, path=None):
        """Send a request; returns its ``Reply`` (not waited for)."""
        reply = Reply(path)
        length = 5 + sum(len(f) for f in fields)
        with self.send_lock:
            if self.broken:
                raise StoreError(*self.broken.args)
            rid = next(self.ids)
            self.waiting[rid] = reply
            try:
                write_all(self.wfd, [HEAD.pack(length, kind, rid), *fields])
            except OSError:
                self.waiting.pop(rid, None)
                raise self._lost() from None
        return reply

    def call(self, kind, *fields, path=None):
        return self.request(kind, *fields, path=path).wait()

    def extended(self, name, *fields, path=None):
        return self.request(EXTENDED, string(name.encode()), *fields, path=path)

    # -- receiving ----------------------------------------------------------------
    def _packet(self):
        head = self.rfile.read(5)
        if len(head) < 5:
            raise self._lost()
        length, kind = U32.unpack_from(head)[0], head[4]
        if not 1 <= length <= MAX_REPLY:
            raise StoreError("%s: malformed SFTP reply" % self.what)
        body = self.rfile.read(length - 1)
        if len(body) != length - 1:
            raise self._lost()
        return kind, body

    def _read_replies(self):
        try:
            while True:
                kind, body = self._packet()
                rid, = U32.unpack_from(body)
                reply = self.waiting.pop(rid, None)
                if reply is not None:
                    reply.answer(kind, memoryview(body)[4:])
        except (OSError, struct.error) as e:
            failure = e if isinstance(e, StoreError) else self._lost()
        with self.send_lock:
            self.broken = failure
            waiting, self.waiting = self.waiting, {}
        for reply in waiting.values():
            reply.answer(None, failure)

    def _read_stderr(self):
        for line in self.proc.stderr:
            text = line.decode("utf-8", "replace").strip()
            if text and not text.startswith("@@@"):
                self.stderr.append(text[:300])

    def _lost(self):
        """The error for a connection that ended: what ssh said last."""
        try:
            code = self.proc.wait(5)
        except subprocess.TimeoutExpired:
            code = None
        self.stderr_thread.join(1)
        said = list(self.stderr)
        if self.master is not None and self.master.proc.poll() is not None:
            return self.master._lost()  # it lost the connection: what its ssh said is the reason
        reason = said[-1] if said else "exit status %s" % code
        if any("IDENTIFICATION HAS CHANGED" in s for s in said):
            reason = "the server's host key has CHANGED (an attack, or a reinstalled server): " + reason
        return StoreError(errno.ECONNRESET, "%s: connection closed: %s" % (self.what, reason))

    def close(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
