"""Retries, as a wrapper around any store (restic's model): a call that
fails with ``Transient`` (throttling such as S3's 503 SlowDown, a timeout,
a server restarting) is made again after an exponential backoff with
jitter, for up to ``WYNG_RETRY_SECONDS`` (default 300) in all; then the
last failure is reported.  Backends only say which failures are transient.
A batch (``sizes``) that fails is split and its halves retried.
A streamed object (a manifest, the root) is kept in memory for a retry
while it is at most 8 MiB; a larger one fails at its first transient error
(the command is run again, and finds its chunks already stored).
"""
import os
import random
import time

from . import Store, StoreError, Transient

FIRST_DELAY, MAX_DELAY = 0.25, 15.0
REPLAY_MAX = 8 << 20  # a streamed object is kept for a retry up to this size


class RetryStore(Store):
    def __init__(self, store, seconds=None):
        self.store = store
        self.seconds = float(os.environ.get("WYNG_RETRY_SECONDS", 300)) if seconds is None else seconds
        for flag in ("location", "atomic_replace", "conditional_create", "connections", "needs_sync"):
            setattr(self, flag, getattr(store, flag))

    def _retry(self, fn, *args, again=lambda: True):
        deadline, delay, tries = time.monotonic() + self.seconds, FIRST_DELAY, 1
        while True:
            try:
                return fn(*args)
            except Transient as e:
                if time.monotonic() + delay > deadline or not again():
                    raise StoreError("%s (given up after %d tries)" % (e.strerror or e, tries)) from None
            time.sleep(delay * random.uniform(0.5, 1.0))
            delay, tries = min(2 * delay, MAX_DELAY), tries + 1

    def write(self, name, parts, durable=False):
        if isinstance(parts, (bytes, bytearray, memoryview, list, tuple)):
            return self._retry(self.store.write, name, parts, durable)
        replay = _Replay(parts)
        return self._retry(lambda: self.store.write(name, iter(replay), durable), again=replay.can_replay)

    def create_exclusive(self, name, data):
        attempts = []

        def create():
            attempts.append(1)
            if self.store.create_exclusive(name, data):
                return True
            # an earlier try may have created it and lost the answer
            return len(attempts) > 1 and self._same(name, data)
        return self._retry(create)

    def _same(self, name, data):
        try:
            return self.store.read(name) == data
        except FileNotFoundError:
            return False

    def read(self, name):
        return self._retry(self.store.read, name)

    def open(self, name):
        return self._retry(self.store.open, name)

    def sizes(self, names):
        """A batch that fails is asked again in halves: under throttling a
        batch of many requests may never pass whole."""
        try:
            return self.store.sizes(names)
        except Transient:
            if len(names) == 1:
                return self._retry(self.store.sizes, names)
        time.sleep(FIRST_DELAY * random.uniform(0.5, 1.0))
        half = len(names) // 2
        return self.sizes(names[:half]) + self.sizes(names[half:])

    def size(self, name):
        return self._retry(self.store.size, name)

    def list(self, prefix, recursive=True):
        """Retried until the first name arrives; a listing that fails later
        is not restarted (it would repeat names)."""
        names = self._retry(lambda: _first(self.store.list(prefix, recursive)))
        yield from names

    def delete(self, name):
        return self._retry(self.store.delete, name)

    def make_root(self):
        return self._retry(self.store.make_root)

    def sync(self):
        return self._retry(self.store.sync)

    def free_bytes(self):
        return self._retry(self.store.free_bytes)

    def close(self):
        self.store.close()


def _first(names):
    """``names`` with its first item already fetched (so that a failure to
    start the listing happens here)."""
    first = next(names, None)
    return iter(()) if first is None else _chain(first, names)


def _chain(first, rest):
    yield first
    yield from rest


class _Replay:
    """A stream of parts that can be iterated again (from its start) as
    long as what it yielded so far fits in REPLAY_MAX."""

    def __init__(self, parts):
        self.parts, self.kept, self.size = iter(parts), [], 0

    def can_replay(self):
        return self.kept is not None

    def __iter__(self):
        yield from list(self.kept)
        for part in self.parts:
            if self.kept is not None:
                self.size += len(part)
                if self.size <= REPLAY_MAX:
                    self.kept.append(bytes(part))
                else:
                    self.kept = None
            yield part
