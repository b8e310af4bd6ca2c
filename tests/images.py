"""Small deterministic disk images for tests."""
import hashlib
import os
import random
from pathlib import Path

KiB, MiB = 1 << 10, 1 << 20


def make(path, size, pieces=(), seed=0):
    """A sparse file of ``size`` bytes with ``pieces`` = [(offset, length,
    kind)] written in it; kind is 'random', 'text' or bytes to repeat."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length, kind in pieces:
            f.seek(offset)
            f.write(content(rng, length, kind))
    return Path(path)


def content(rng, length, kind):
    if kind == "random":
        return rng.randbytes(length)
    if kind == "text":
        words = [b"volume", b"backup", b"qubes", b"chunk", b"session", b"\n"]
        out = b" ".join(rng.choice(words) for _ in range(length // 4))
        return (out * 2)[:length]
    return (kind * (length // len(kind) + 1))[:length]


def overwrite(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def pwrite_pieces(path, pieces, data=None):
    """pwrite random bytes that differ from every byte they replace (or
    ``data``) at (offset, length) pieces, then fsync."""
    fd = os.open(path, os.O_RDWR)
    try:
        for offset, length in pieces:
            os.pwrite(fd, data if data is not None else _changed(os.pread(fd, length, offset), length), offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def _changed(old, length):
    """Random bytes, each different from the one at its place in ``old``
    (a random byte equal to the old one would leave a chunk unchanged)."""
    flip = int.from_bytes(os.urandom(length), "little") | int.from_bytes(b"\x01" * length, "little")
    return (int.from_bytes(old.ljust(length, b"\0"), "little") ^ flip).to_bytes(length, "little")


def digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tree_digests(root):
    """{relative path: sha256} of every file under ``root``."""
    return {str(p.relative_to(root)): digest(p) for p in Path(root).rglob("*") if p.is_file()}


def chunk_files(archive):
    return sorted(p.name for p in (Path(archive) / "chunks").rglob("*") if p.is_file())


def same(a, b):
    return os.path.getsize(a) == os.path.getsize(b) and digest(a) == digest(b)
