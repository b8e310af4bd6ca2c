"""The per-byte CPU cost of each bulk step, on an image's own data.

    PYTHON bench/costs.py IMAGE [--chunk BYTES] [--every N]

Run with the interpreter of the install being measured (bench.py runs it
with its fresh venv's): the AEAD is the agent's own (``wyngagent.aead``),
zstd:3 the installed zstandard's, HMAC-SHA256 this Python's hashlib.
Every Nth chunk of the image is measured; a chunk in a hole costs nothing
(no step reads it).  Prints JSON: nanoseconds of CPU per byte of the
image for each step, and the compressed fraction.
"""
import argparse
import errno
import hmac
import json
import os
import time

import zstandard
from wyngagent import aead

KEY, NONCE, AAD = bytes(range(32)), bytes(24), b"chunks/00/" + b"0" * 64 + b"\0\0\0\0\1"


def in_hole(fd, offset, length):
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) >= offset + length
    except OSError as e:
        if e.errno == errno.ENXIO:
            return True  # only a hole is left
        raise


def measure(path, chunk, every):
    fd = os.open(path, os.O_RDONLY)
    size = os.fstat(fd).st_size
    z, unz = zstandard.ZstdCompressor(level=3), zstandard.ZstdDecompressor()
    cpu = dict.fromkeys(("hmac", "zstd", "unzstd", "seal", "open"), 0.0)
    sampled = stored = 0

    def timed(step, fn, *args):
        start = time.process_time()
        out = fn(*args)
        cpu[step] += time.process_time() - start
        return out
    try:
        for offset in range(0, size, chunk * every):
            length = min(chunk, size - offset)
            sampled += length
            if in_hole(fd, offset, length):
                continue
            data = os.pread(fd, length, offset)
            timed("hmac", hmac.digest, KEY, data, "sha256")
            packed = timed("zstd", z.compress, data)
            if len(packed) < len(data):
                timed("unzstd", unz.decompress, packed)
            else:
                packed = data
            sealed = timed("seal", aead.seal, KEY, NONCE, AAD, packed)
            timed("open", aead.open, KEY, NONCE, AAD, sealed)
            stored += len(packed)
    finally:
        os.close(fd)
    costs = {step: 1e9 * seconds / sampled for step, seconds in cpu.items()}
    return {"ns_per_byte": costs, "stored_fraction": stored / sampled, "sampled_bytes": sampled}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image")
    p.add_argument("--chunk", type=int, default=256 << 10)
    p.add_argument("--every", type=int, default=16, help="measure every Nth chunk (default 16)")
    args = p.parse_args()
    print(json.dumps(measure(args.image, args.chunk, args.every)))


if __name__ == "__main__":
    main()
