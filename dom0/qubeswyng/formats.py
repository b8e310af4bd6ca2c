"""The archive header and the root, as dom0 writes and checks them.

Byte layouts are in doc/FORMAT.md.  The header is the one thing dom0 parses
before it can check a MAC (it holds the salt and KDF parameters), so it is
a fixed-size record read field by field with every value bounded.  The root
is canonical JSON followed by its MAC; it is parsed only after the MAC
matched.
"""
import json
import os
import struct

from . import keys as K
from .errors import AuthFail, Fail

FORMAT_VERSION = 1
HEADER_MAGIC = b"QWYNGHDR"
HEADER_FIELDS = struct.Struct(">8sHBBBBBBbB16s32s")
HEADER_SIZE = HEADER_FIELDS.size + K.WRAPPED_SIZE + 32
HEADER_LABEL = b"qubes-wyng header\0"
CIPHERS = {"off": 0, "xchacha20-poly1305": 1}
COMPRESSIONS = {"off": 0, "zstd": 1, "zlib": 2, "bz2": 3}
LEVELS = {"off": (0, 0, 0), "zstd": (1, 22, 3), "zlib": (0, 9, 6), "bz2": (1, 9, 9)}
ROOT_LABEL = b"qubes-wyng root\0"
MAX_ROOT = 64 << 20
MAC_SIZE = 32


class Header:
    """Archive settings, fixed at arch-init."""

    def __init__(self, archive_id, cipher, compression, level, chunk_factor, kdf, salt=None):
        self.archive_id, self.cipher, self.compression = archive_id, cipher, compression
        self.level, self.chunk_factor, self.kdf = level, chunk_factor, kdf
        self.salt = salt or os.urandom(32)
        self.chunk_size = (64 << 10) << (chunk_factor - 1)

    def fields(self):
        return HEADER_FIELDS.pack(HEADER_MAGIC, FORMAT_VERSION, 1, *self.kdf, self.cipher,
                                  self.compression, self.level, self.chunk_factor,
                                  self.archive_id, self.salt)

    def seal(self, passphrase, master):
        """The header bytes: settings, the wrapped master key, and a MAC
        under K_mac, so that settings are authenticated even when the
        master key comes from the auth cache instead of the passphrase."""
        fields = self.fields()
        body = fields + K.wrap(K.derive_kek(passphrase, self.salt, *self.kdf), master, fields)
        return body + K.Keys(master, self.archive_id).sign(HEADER_LABEL, body)

    @classmethod
    def parse(cls, blob):
        if len(blob) != HEADER_SIZE or blob[:8] != HEADER_MAGIC:
            raise Fail("the archive header is damaged, or the destination is not a qubes-wyng archive")
        (_m, version, kdf_id, log_n, r, p, cipher, comp, level, factor,
         archive_id, salt) = HEADER_FIELDS.unpack(blob[:HEADER_FIELDS.size])
        if version != FORMAT_VERSION:
            raise Fail("archive format version %d is not supported (this is %d)" % (version, FORMAT_VERSION))
        if kdf_id != 1 or cipher not in CIPHERS.values() or comp not in COMPRESSIONS.values() \
                or not 1 <= factor <= 6 or not -7 <= level <= 22:
            raise Fail("the archive header holds unknown settings")
        header = cls(archive_id, cipher, comp, level, factor, (log_n, r, p), salt)
        header.wrapped, header.body, header.mac = blob[HEADER_FIELDS.size:-32], blob[:-32], blob[-32:]
        return header

    def unlock(self, passphrase):
        """The master key, or Fail for a wrong passphrase."""
        return K.unwrap(K.derive_kek(passphrase, self.salt, *self.kdf), self.wrapped, self.fields())

    def check(self, keys):
        if not keys.check(HEADER_LABEL, self.body, self.mac):
            raise AuthFail("the archive header was altered (or the cached key is not this archive's)")


def parse_compression(spec):
    name, _, level = spec.partition(":")
    if name not in COMPRESSIONS:
        raise Fail("--compression: unknown type %r (zstd, zlib, bz2 or off)" % name)
    low, high, default = LEVELS[name]
    try:
        level = int(level) if level else default
    except ValueError:
        raise Fail("--compression: level must be a number") from None
    if not low <= level <= high:
        raise Fail("--compression: %s level must be %d to %d" % (name, low, high))
    return COMPRESSIONS[name], level


# -- the root -----------------------------------------------------------------

def new_root(archive_id, created):
    return {"format": FORMAT_VERSION, "archive": archive_id.hex(), "created": created, "seq": 0, "time": 0,
            "volumes": []}


def seal_root(keys, root):
    body = json.dumps(root, sort_keys=True, separators=(",", ":")).encode()
    if len(body) + MAC_SIZE > MAX_ROOT:
        raise Fail("the archive root would exceed %d MiB; prune old sessions" % (MAX_ROOT >> 20))
    return body + keys.sign(ROOT_LABEL, body)


def open_root(keys, blob, archive_id):
    """The root dict from agent bytes, after its MAC and archive id match,
    in the shape the commands use (only dom0 can sign one, but a key
    misused elsewhere must not turn into a traceback)."""
    body, mac = blob[:-MAC_SIZE], blob[-MAC_SIZE:]
    if len(blob) <= MAC_SIZE or not keys.check(ROOT_LABEL, body, mac):
        raise AuthFail("the archive root fails authentication: it was altered, or is not this archive's")
    try:
        root = json.loads(body)
        good = _int(root["seq"]) and _int(root["time"]) and _int(root.get("created", 0)) and all(
            _hex(v["id"], 32) and isinstance(v["name"], str) and all(
                isinstance(s["name"], str) and _int(s["time"]) and _int(s["size"]) and _int(s.get("changed", 0))
                and _hex(s["manifest"], 32) and _hex(s["mac"], 64) and isinstance(s.get("tags", {}), dict)
                for s in v["sessions"]) for v in root["volumes"])
    except (ValueError, RecursionError, TypeError, KeyError, AttributeError):
        good = False
    if not good:
        raise Fail("the archive root is malformed")
    if root.get("archive") != archive_id.hex() or root.get("format") != FORMAT_VERSION:
        raise AuthFail("the archive root belongs to another archive")
    return root, mac


def _int(value):
    return type(value) is int and 0 <= value < 1 << 53


def _hex(value, length):
    return isinstance(value, str) and len(value) == length and all(c in "0123456789abcdef" for c in value)
