"""Human output: a progress line on stderr, sizes, and notices."""
import sys
import time


def size(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return ("%d %s" % (n, unit)) if unit == "B" else ("%.1f %s" % (n, unit))
        n /= 1024


class Progress:
    """``label: 42% 1.2 GiB 310 MB/s`` rewritten in place, at most 4 times a
    second, only on a terminal and never with --quiet."""

    def __init__(self, opts, label, total):
        self.on = not opts.quiet and sys.stderr.isatty()
        self.label, self.total = label, max(total, 1)
        self.start = self.last = time.monotonic()

    def update(self, done):
        now = time.monotonic()
        if not self.on or now - self.last < 0.25:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-6) / 1e6
        print("\r%s: %3d%% %s %.0f MB/s\x1b[K" % (self.label, 100 * done // self.total, size(done), rate),
              end="", file=sys.stderr, flush=True)

    def close(self):
        if self.on:
            print("\r\x1b[K", end="", file=sys.stderr, flush=True)


def notice(opts, text):
    if not opts.quiet:
        print(text, file=sys.stderr)


def say(opts, text):
    """A result line on stdout, unless --quiet."""
    if not opts.quiet:
        print(text)
