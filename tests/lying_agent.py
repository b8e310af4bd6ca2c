#!/usr/bin/env python3
"""A backup VM that lies: it runs the real agent and tampers with one reply.

Environment: ``LIE=<mode>:<n>`` picks the n-th frame the agent sends (1 is
HELLO's reply) and what to do with it:

  truncate  send the header and half the payload, then hang up
  oversize  claim a 4 GiB payload
  garbage   send random bytes instead of the frame
  unknown   send the payload under an op code that does not exist
  errflood  send a 1 MiB error message
  escape    send an error full of terminal escape sequences
  replay    send the previous DATA payload again (a stale chunk)
  shrink    drop the last byte of the payload
  empties   send empty DATA frames without end instead
  bigstats  statistics of 2^64 - 1 each
  bigscan   a scan record with figures of 2^64 - 1
  errmute   send an error, then nothing more (pipes left open)
  errstall  send half an error, then nothing more
  deafmute  stop reading requests (dom0's writes fail), then nothing more
"""
import os
import random
import struct
import subprocess
import sys
import threading
import time

HEADER = struct.Struct(">BI")
DATA = 0x82
ERR = 0x81


def read_exact(f, n):
    data = f.read(n)
    return data if len(data) == n else None


def main():
    mode, nth = os.environ["LIE"].split(":")
    nth = int(nth)
    agent = subprocess.Popen([os.environ["REAL_AGENT"]], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    inp, out = sys.stdin.buffer, sys.stdout.buffer

    def forward_requests():
        for block in iter(lambda: inp.read1(1 << 16), b""):
            try:
                agent.stdin.write(block)
                agent.stdin.flush()
            except BrokenPipeError:
                return
        agent.stdin.close()
    threading.Thread(target=forward_requests, daemon=True).start()

    count, previous = 0, None
    while True:
        head = read_exact(agent.stdout, HEADER.size)
        if head is None:
            break
        op, length = HEADER.unpack(head)
        payload = read_exact(agent.stdout, length)
        count += 1
        if count == nth:
            if mode == "truncate":
                out.write(head + payload[:length // 2])
                out.flush()
                os._exit(0)
            if mode == "oversize":
                out.write(HEADER.pack(op, 0xFFFFFFFF) + payload)
                out.flush()
                os._exit(0)
            if mode == "garbage":
                out.write(random.randbytes(64))
                out.flush()
                os._exit(0)
            if mode == "empties":
                while True:
                    out.write(HEADER.pack(DATA, 0) * 4096)
            if mode in ("errmute", "errstall", "deafmute"):
                if mode == "deafmute":  # this reply goes through; then requests fail
                    out.write(head + payload)
                    out.flush()
                    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
                else:
                    text = b"the storage failed"
                    out.write(HEADER.pack(ERR, len(text)) + text[:len(text) // 2 if mode == "errstall" else None])
                    out.flush()
                time.sleep(60)  # silent, pipes open: dom0 must not wait for ever
                os._exit(0)
            if mode == "unknown":
                op = 0x99
            elif mode == "errflood":
                op, payload = ERR, b"x" * (1 << 20)
            elif mode == "escape":
                op, payload = ERR, b"\x1b[2J\x1b]0;owned\x07 evil\nsecond line\r"
            elif mode == "replay" and op == DATA and previous is not None:
                payload = previous
            elif mode == "shrink" and payload:
                payload = payload[:-1]
            elif mode == "bigstats":
                payload = b"\xff" * len(payload)
            elif mode == "bigscan":
                payload = payload[:5] + b"\xff" * (len(payload) - 5)
            head = HEADER.pack(op, len(payload))
        if op == DATA:
            previous = payload
        out.write(head + payload)
        out.flush()
    agent.wait()


if __name__ == "__main__":
    try:
        main()
    except OSError:  # dom0 hung up on us, as it should
        os._exit(0)
