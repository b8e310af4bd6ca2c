"""Sealing and opening stored objects: compression, then XChaCha20-Poly1305.

Every stored object (chunk, manifest, root) is a sequence of segments
(doc/FORMAT.md, "Object container").  A segment's plaintext is one
compression byte followed by the (maybe compressed) payload; when
encryption is on it is sealed with a random 24-byte nonce and the associated
data ``object name | segment index | last flag``, so an object moved to
another name, a segment moved, dropped or appended fails to open.
"""
import bz2
import io
import os
import struct
import threading
import zlib

import zstandard

from . import aead

MAGIC = b"QWO\x01"
CIPHER_NONE, CIPHER_XCHACHA = 0, 1
COMP_NONE, COMP_ZSTD, COMP_ZLIB, COMP_BZ2 = 0, 1, 2, 3
SEGMENT = struct.Struct(">I")  # high bit: last segment; low 31 bits: stored length
LAST = 1 << 31
NONCE, TAG = aead.NONCE, aead.TAG
MAX_SEGMENT = 4 << 20


class ObjectError(Exception):
    pass


class Codec:
    def __init__(self, cipher, compression, level, key):
        if cipher not in (CIPHER_NONE, CIPHER_XCHACHA):
            raise ObjectError("unknown cipher %d" % cipher)
        if cipher == CIPHER_XCHACHA and len(key) != 32:
            raise ObjectError("encryption key must be 32 bytes")
        self.cipher, self.key = cipher, key
        self.compression = compression
        if compression == COMP_ZSTD:
            local = threading.local()  # a ZstdCompressor must not be shared between threads

            def compress(data):
                if not hasattr(local, "zstd"):
                    local.zstd = zstandard.ZstdCompressor(level=level)
                return local.zstd.compress(data)
            self.compress = compress
        elif compression == COMP_ZLIB:
            self.compress = lambda data: zlib.compress(data, level)
        elif compression == COMP_BZ2:
            self.compress = lambda data: bz2.compress(data, max(1, level))
        elif compression == COMP_NONE:
            self.compress = None
        else:
            raise ObjectError("unknown compression %d" % compression)

    # -- writing ---------------------------------------------------------
    def seal(self, name, data):
        """One object of one segment."""
        return b"".join(self.seal_parts(name, data))

    def seal_parts(self, name, data):
        """One object of one segment as [head, body], for a store to write
        as they are (chunks are large: joining them would copy them)."""
        head, body = self._segment(name, 0, True, data)
        return [MAGIC + bytes([self.cipher]) + head, body]

    def seal_stream(self, name, parts):
        """Yield the bytes of an object made of the given plaintext parts."""
        yield MAGIC + bytes([self.cipher])
        index, previous = 0, None
        for part in parts:
            if previous is not None:
                yield self.segment(name, index, False, previous)
                index += 1
            previous = part
        yield self.segment(name, index, True, previous or b"")

    def segment(self, name, index, last, data):
        return b"".join(self._segment(name, index, last, data))

    def _segment(self, name, index, last, data):
        """A segment as (head, body): its length word and nonce, and the
        sealed or plain payload, so that it is copied only once."""
        packed = self.compress(data) if self.compress and data else None
        if packed is not None and len(packed) < len(data):
            plain = bytes([self.compression]) + packed
        else:
            plain = bytes([COMP_NONE]) + data
        if self.cipher == CIPHER_XCHACHA:
            nonce = os.urandom(NONCE)
            body = aead.seal(self.key, nonce, _aad(name, index, last), plain)
        else:
            nonce, body = b"", plain
        return SEGMENT.pack((len(nonce) + len(body)) | (LAST if last else 0)) + nonce, body

    def plausible(self, size, length):
        """Whether a stored object of ``size`` bytes can be a sealed chunk
        of ``length`` plaintext bytes: one segment, its payload 1 to
        ``length`` bytes.  An object cut below that, or grown, cannot."""
        low = len(MAGIC) + 1 + SEGMENT.size + 1 + (NONCE + TAG if self.cipher == CIPHER_XCHACHA else 0)
        return size is not None and low < size <= low + length

    # -- reading ---------------------------------------------------------
    def open(self, name, blob, max_plain):
        """The plaintext of a whole object held in memory (a bytes-like
        object: one segment's plaintext is not copied again)."""
        parts = list(self.open_stream(name, _BytesSource(blob), max_plain))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def open_stream(self, name, source, max_part):
        """Yield the plaintext segments of an object read from ``source``
        (anything with read(n)); each is at most ``max_part`` bytes."""
        if _exact(source, 5, name) != MAGIC + bytes([self.cipher]):
            raise ObjectError("%s: not an object of this archive" % name)
        index = 0
        while True:
            (word,) = SEGMENT.unpack(_exact(source, 4, name))
            last, length = bool(word & LAST), word & ~LAST
            if length > MAX_SEGMENT:
                raise ObjectError("%s: segment too large" % name)
            yield self._open_segment(name, index, last, _exact(source, length, name), max_part)
            if last:
                if source.read(1):
                    raise ObjectError("%s: data after the last segment" % name)
                return
            index += 1

    def checked(self, name, parts, max_part):
        """The stored bytes of an object arriving in ``parts`` (copied as it
        was sealed), passed on only once the segments holding them opened
        under ``name``: a damaged or misnamed object raises ObjectError
        before its end is passed on."""
        source = _Tee(parts)
        for _plain in self.open_stream(name, source, max_part):
            yield source.take()
        yield source.take()

    def _open_segment(self, name, index, last, stored, max_part):
        if self.cipher == CIPHER_XCHACHA:
            if len(stored) < NONCE + TAG + 1:
                raise ObjectError("%s: segment too short" % name)
            body = aead.open(self.key, stored[:NONCE], _aad(name, index, last), stored[NONCE:])
            if body is None:
                raise ObjectError("%s: fails authentication" % name)
        else:
            body = stored
        if not body:
            raise ObjectError("%s: empty segment" % name)
        return _decompress(name, body[0], memoryview(body)[1:], max_part)


def _aad(name, index, last):
    return name.encode() + struct.pack(">IB", index, last)


_local = threading.local()  # a ZstdDecompressor per thread (they are not thread-safe)


def _decompress(name, kind, data, limit):
    """Decompress at most ``limit`` bytes; more is an error (no bombs).
    Stored data is returned as the view it is, not copied."""
    if kind == COMP_NONE:
        out = data
    elif kind == COMP_ZSTD:
        if not hasattr(_local, "zstd"):
            _local.zstd = zstandard.ZstdDecompressor()
        try:
            # a frame that states its size (ours do) is decompressed into a
            # buffer of that size, which zstd never writes beyond; any other
            # goes through a stream reader, which caps the output
            if 0 <= zstandard.frame_content_size(data) <= limit:
                out = _local.zstd.decompress(data)
            else:
                out = _local.zstd.stream_reader(io.BytesIO(data)).read(limit + 1)
        except zstandard.ZstdError:
            raise ObjectError("%s: bad zstd data" % name) from None
    elif kind in (COMP_ZLIB, COMP_BZ2):
        reader = zlib.decompressobj() if kind == COMP_ZLIB else bz2.BZ2Decompressor()
        try:
            out = reader.decompress(data, limit + 1)
        except (zlib.error, OSError, ValueError):
            raise ObjectError("%s: bad compressed data" % name) from None
        if not reader.eof:
            raise ObjectError("%s: truncated or oversized compressed data" % name)
    else:
        raise ObjectError("%s: unknown compression %d" % (name, kind))
    if len(out) > limit:
        raise ObjectError("%s: decompresses beyond %d bytes" % (name, limit))
    return out


def _exact(source, n, name):
    data = source.read(n)
    if len(data) != n:
        raise ObjectError("%s: truncated" % name)
    return data


class _Tee:
    """``read(n)`` over an iterable of parts; ``take()`` returns the bytes
    read since it was last called."""

    def __init__(self, parts):
        self.parts, self.buf, self.taken = iter(parts), bytearray(), []

    def read(self, n):
        while len(self.buf) < n:
            part = next(self.parts, None)
            if part is None:
                break
            self.buf += part
        out = bytes(self.buf[:n])
        del self.buf[:n]
        self.taken.append(out)
        return out

    def take(self):
        out, self.taken = b"".join(self.taken), []
        return out


class _BytesSource:
    def __init__(self, blob):
        self.view, self.pos = memoryview(blob), 0

    def read(self, n):
        part = self.view[self.pos:self.pos + n]
        self.pos += len(part)
        return part
