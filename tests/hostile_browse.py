#!/usr/bin/env python3
"""A browse service that misbehaves (doc/browse.md): what a compromised
disposable could send dom0.  It reads dom0's VOLUME frame, then does what
its argument says:

  beyond-end   read 4 KiB at the volume's end        overflow  at offset 2^64-1
  huge         read 64 MiB                           empty     read 0 bytes
  short        a READ of 5 bytes                     giant-frame  claim a 4 GiB frame
  unknown-op   a frame of op 9                       garbage   bytes that are no frame
  chatter      100 NOTE lines                        truncated  half a frame, then exit
  exit         exit 3 at once                        escapes   a NOTE full of terminal escapes
  flood        6000 one-byte reads, as fast as it can, then NOTE how many were answered
  hoard        200 reads of 1 MiB all over the volume, then 1000 it never reads the
               answers of (it creates $HOOK_OUT.hoarded, then waits to be killed)
"""
import os
import random
import struct
import sys
import time

FRAME = struct.Struct(">BI")
HEAD = struct.Struct(">HQQ")
RANGE = struct.Struct(">QI")
READ, NOTE, DATA = 2, 3, 0x82


def main():
    mode = sys.argv[1]
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    op, length = FRAME.unpack(inp.read(FRAME.size))
    size = HEAD.unpack(inp.read(length)[:HEAD.size])[1]

    def send(op, payload):
        out.write(FRAME.pack(op, len(payload)) + payload)
        out.flush()

    def read(offset, n):
        send(READ, RANGE.pack(offset, n))
        op, length = FRAME.unpack(inp.read(FRAME.size))
        assert op == DATA and length == n
        return inp.read(length)

    bad = {"beyond-end": (size, 4096), "overflow": ((1 << 64) - 1, 4096), "huge": (0, 64 << 20), "empty": (0, 0)}
    if mode in bad:
        read(0, 512)  # one good read first
        send(READ, RANGE.pack(*bad[mode]))
    elif mode == "short":
        send(READ, b"\0" * 5)
    elif mode == "giant-frame":
        out.write(FRAME.pack(READ, 0xFFFFFFFF))
    elif mode == "unknown-op":
        send(9, b"")
    elif mode == "garbage":
        out.write(b"\xff" + random.Random(1).randbytes(5000))
    elif mode == "chatter":
        for i in range(100):
            send(NOTE, b"line %d" % i)
    elif mode == "truncated":
        out.write(FRAME.pack(READ, RANGE.size) + b"\0\0\0")
    elif mode == "exit":
        return 3
    elif mode == "escapes":
        send(NOTE, b"\x1b[2J\x1b]0;owned\x07")
    elif mode == "flood":
        for i in range(6000):
            read(i % size, 1)
        send(NOTE, b"answered 6000")
    elif mode == "hoard":
        rng = random.Random(2)
        for _ in range(200):
            read(rng.randrange(0, size - (1 << 20)), 1 << 20)
        for i in range(1000):
            out.write(FRAME.pack(READ, RANGE.size) + RANGE.pack((i << 20) % size, 1 << 20))
        out.flush()
        open(os.environ["HOOK_OUT"] + ".hoarded", "w").close()
        time.sleep(600)
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
