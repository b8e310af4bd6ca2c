"""Frames of the wyng.Agent protocol (doc/PROTOCOL.md), agent side.

A frame is ``op:u8 | length:u32 (big-endian) | payload``.  The agent only
ever talks to dom0, but it still refuses frames longer than MAX_PAYLOAD so
that a confused peer cannot make it allocate without bound.
"""
import os
import struct

PROTOCOL_VERSION = 2
HEADER = struct.Struct(">BI")
MAX_PAYLOAD = (4 << 20) + 64  # the largest chunk (2 MiB) with room to spare

# requests (dom0 -> agent)
HELLO, GET_HEADER, INIT, OPEN, LOCK, UNLOCK, GET_ROOT, PUT_CHUNK, \
    PUT_MANIFEST, PUT_ROOT, GET_MANIFEST, GET_CHUNKS, BYE, GET_STATS, \
    SCAN, MARK_GARBAGE, GET_FREE, PUT_HEADER = range(1, 19)
HAVE, GET_OBJECTS, PUT_OBJECT, GET_DAMAGED = range(19, 23)
# replies (agent -> dom0)
OK, ERR, DATA, END, NONE = range(0x80, 0x85)

STATS = struct.Struct(">QQQQ")  # chunks stored, chunks deduplicated, bytes in, bytes stored


class ProtocolError(Exception):
    pass


class Reader:
    """Reads frames from a file descriptor through a large buffer."""

    def __init__(self, fd):
        self.file = os.fdopen(fd, "rb", buffering=1 << 20, closefd=False)

    def frame(self):
        """Return (op, payload) or None at a clean end of input."""
        head = self.file.read(HEADER.size)
        if not head:
            return None
        if len(head) != HEADER.size:
            raise ProtocolError("truncated frame header")
        op, length = HEADER.unpack(head)
        if length > MAX_PAYLOAD:
            raise ProtocolError("frame of %d bytes is too large" % length)
        payload = self.file.read(length)
        if len(payload) != length:
            raise ProtocolError("truncated frame")
        return op, payload


class Writer:
    def __init__(self, fd):
        self.fd = fd

    def send(self, op, *parts):
        write_all(self.fd, [HEADER.pack(op, sum(len(p) for p in parts)), *parts])

    def error(self, text):
        self.send(ERR, text.encode("utf-8", "replace")[:1000])


def write_all(fd, parts):
    """Write every part, in as many gathering writes as it takes."""
    pending = list(parts)
    while pending:
        written = os.writev(fd, pending)
        while pending and written >= len(pending[0]):
            written -= len(pending[0])
            pending.pop(0)
        if written:
            pending[0] = memoryview(pending[0])[written:]
