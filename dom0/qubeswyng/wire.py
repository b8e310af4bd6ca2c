"""The strict, bounded decoder of what the agent sends (doc/PROTOCOL.md).

Everything that arrives from the backup VM passes through ``Link.frame``:
a frame is ``op:u8 | length:u32 | payload``; the caller says which ops it
accepts and how long the payload may be, and anything else ends the
connection with a one-line error before the payload is read.  Nothing here
trusts the content: MACs and chunk ids are checked by the callers
(``archive.py``) before any of it is used.
"""
import contextlib
import fcntl
import os
import struct
import threading

from .errors import Fail

PROTOCOL_VERSION = 2
HEADER = struct.Struct(">BI")
HELLO, GET_HEADER, INIT, OPEN, LOCK, UNLOCK, GET_ROOT, PUT_CHUNK, \
    PUT_MANIFEST, PUT_ROOT, GET_MANIFEST, GET_CHUNKS, BYE, GET_STATS, \
    SCAN, MARK_GARBAGE, GET_FREE, PUT_HEADER = range(1, 19)
HAVE, GET_OBJECTS, PUT_OBJECT, GET_DAMAGED = range(19, 23)
OK, ERR, DATA, END, NONE = range(0x80, 0x85)
STATS = struct.Struct(">QQQQ")
OPEN_ARGS = struct.Struct(">BBbI")  # then K_enc[32]
SCAN_ITEM = struct.Struct(">16s16sI")  # manifest name, the first half of its MAC, group
SCAN_RECORD = struct.Struct(">BIQQQ")  # kind, index, three counts
LOCK_GARBAGE, LOCK_FORCED, LOCK_STALE = 1, 2, 4  # flags of LOCK's reply
MAX_ERROR = 1000
PART = 1 << 20  # manifest and root parts, both directions
ERR_WAIT = 10  # seconds an agent gets to finish saying why it failed, or to answer BYE
F_SETPIPE_SZ = 1031


class AgentError(Fail):
    """The agent reported a failure or broke the protocol."""


class LinkBroken(AgentError):
    """The agent broke the protocol or hung up: the link cannot go on."""


def printable(raw):
    """Agent text made safe for a terminal: no escapes, no control bytes."""
    return "".join(c if c.isprintable() else "?" for c in bytes(raw[:MAX_ERROR]).decode("utf-8", "replace"))


class Link:
    """Frames over a pair of pipes to an agent, wherever it runs (or to
    the browse service: ``name`` is who the errors name)."""

    def __init__(self, transport, name="agent"):
        self.transport, self.name = transport, name
        self.wfd, rfd = transport.stdin_fd, transport.stdout_fd
        for fd in (self.wfd, rfd):
            with contextlib.suppress(OSError):  # not a pipe, or limited: only slower
                fcntl.fcntl(fd, F_SETPIPE_SZ, 1 << 20)
        self.rfile = os.fdopen(rfd, "rb", buffering=1 << 20, closefd=False)

    # -- sending ----------------------------------------------------------
    def send(self, op, *parts):
        pending = [HEADER.pack(op, sum(len(p) for p in parts)), *parts]
        try:
            while pending:
                n = os.writev(self.wfd, pending)
                while pending and n >= len(pending[0]):
                    n -= len(pending[0])
                    pending.pop(0)
                if n:
                    pending[0] = memoryview(pending[0])[n:]
        except BrokenPipeError:
            with self.deadline():
                self.frame((), 0)  # the agent said why (ERR) before it left, or died

    def send_stream(self, op, prefix, parts):
        """A multi-frame upload: ``prefix | last:u8 | part`` frames, the
        prefix in the first only.  Returns the last part."""
        parts = iter(parts)
        current = next(parts, b"")
        for following in parts:
            self.send(op, prefix, b"\x00", current)
            prefix, current = b"", following
        self.send(op, prefix, b"\x01", current)
        return current

    # -- receiving --------------------------------------------------------
    def _exact(self, n):
        data = self.rfile.read(n)
        if len(data) != n:
            raise LinkBroken("the %s closed the connection%s" % (self.name, self.transport.exit_note()))
        return data

    def frame(self, accept, max_len):
        """Read one frame; return (op, payload).  ERR always raises."""
        op, length = HEADER.unpack(self._exact(HEADER.size))
        if op == ERR and length <= MAX_ERROR:
            with self.deadline():
                raise AgentError("%s: %s" % (self.name, printable(self._exact(length))))
        if op not in accept:
            raise LinkBroken("%s sent an unexpected frame (op %d)" % (self.name, op))
        if length > max_len:
            raise LinkBroken("%s sent %d bytes where at most %d are allowed" % (self.name, length, max_len))
        return op, self._exact(length)

    def reply(self, max_len=0):
        return self.frame((OK,), max_len)[1]

    def call(self, op, *parts, limit=0):
        """A request and its OK reply (at most ``limit`` bytes)."""
        self.send(op, *parts)
        return self.reply(limit)

    def parts(self, max_total):
        """DATA* END, at most ``max_total`` bytes in all, in at most one
        frame per 64 KiB of that (the agent's parts are 1 MiB but the last):
        empty frames without end do not spin dom0."""
        total, frames = 0, max_total // (64 << 10) + 16
        while True:
            op, data = self.frame((DATA, END), min(PART, max_total - total))
            if op == END:
                return
            total, frames = total + len(data), frames - 1
            if frames < 0:
                raise LinkBroken("%s sent its reply in too many parts" % self.name)
            yield data

    @contextlib.contextmanager
    def deadline(self):
        """While an error is reported, or at the end: an agent silent for
        ERR_WAIT seconds is killed, so that the read ends."""
        timer = threading.Timer(ERR_WAIT, self.transport.kill)
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()

    def close(self):
        self.rfile.close()
        self.transport.close()
