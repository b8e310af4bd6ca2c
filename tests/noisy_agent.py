#!/usr/bin/env python3
"""An agent that talks on stderr: ``NOISE=<what>`` writes to stderr, then
runs the real agent (``REAL_AGENT``) or ends as told.

  escape   terminal escapes and a fake passphrase prompt, then the agent
  flood    4 MiB of text (fails with status 7 if no one reads it), then the agent
  fail     escapes and two lines, then exit status 3
  rtsig    killed by a real-time signal (SIGRTMIN + 2)
"""
import fcntl
import os
import signal
import sys
import time

ESCAPES = b"\x1b[2J\x1b]0;owned\x07\x1b[31mPassphrase: "


def write_all(data, patience=10):
    """Write ``data`` to stderr; exit 7 if it stays full (no one reads it)."""
    fd = sys.stderr.fileno()
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    view, deadline = memoryview(data), time.monotonic() + patience
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            if time.monotonic() > deadline:
                os._exit(7)
            time.sleep(0.01)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags)


def main():
    noise = os.environ["NOISE"]
    if noise == "rtsig":
        os.kill(os.getpid(), signal.SIGRTMIN + 2)
    write_all({"escape": ESCAPES, "flood": b"chatter\n" * (1 << 19),
               "fail": ESCAPES + b"\nfirst line\nError: the last \x1b[1mline\x07\n"}[noise])
    if noise == "fail":
        os._exit(3)
    agent = os.environ["REAL_AGENT"]
    os.execv(agent, [agent])


if __name__ == "__main__":
    main()
