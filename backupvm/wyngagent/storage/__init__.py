"""Storage: where the archive's objects live (doc/storage.md).

One interface, ``Store``, with written contracts; one backend per module
(``local``: a directory, also on a FUSE mount such as s3fs; ``ssh``: SFTP
over the OpenSSH client; ``s3``: an S3 bucket through boto3), each opened
from the URL dom0 sends in HELLO by ``open_store``, which wraps it in
``RetryStore`` (retry.py): retries live in one place, not in each backend.
The archive logic above (archive.py, scan.py) never knows which backend it
talks to; tests/test_storage.py runs one conformance suite against all.
"""
import importlib


class StoreError(OSError):
    """A storage failure, explained in its one-line message."""


class Transient(StoreError):
    """A failure that may go away if the same call is made again a little
    later (throttling, a timeout, a server restarting): retry.py retries it."""


class Store:
    """What every backend offers.  Names are relative paths of ``/``-separated
    parts (``header``, ``chunks/ab/ab12…``); folders are implied by names.
    Every method may be called from several threads at once.

    Capabilities, which the archive reads instead of asking which backend
    it has:

    - ``atomic_replace``: ``write`` over an existing object is atomic.  A
      store without it refuses to replace an object (so it can hold chunks
      but not the root).
    - ``conditional_create``: ``create_exclusive`` is atomic also against
      writers on other hosts, not only within this agent.
    - ``connections``: how many calls in flight the store serves well (the
      archive keeps that many object reads or writes going, within its
      memory bound).
    - ``needs_sync``: ``write`` without ``durable`` may be lost in a crash
      until ``sync`` returns (a store whose writes are durable anyway says
      False, and its ``sync`` does nothing).
    """

    location = ""  # the URL, for messages (never holds a secret)
    atomic_replace = True
    conditional_create = True
    connections = 1
    needs_sync = False

    def make_root(self):
        """Create the archive's folder where the backend has folders."""

    def write(self, name, parts, durable=False):
        """Store ``parts`` (a bytes-like object, or an iterable of them) as
        ``name``, creating it or replacing it atomically: a reader sees the
        old object or the whole new one, never a part.  If ``parts`` raises,
        or the write fails, the old object (or none) stays, and at most a
        leftover named ``*.tmp-*`` that garbage collection removes.
        ``durable``: the object survives a crash once this returns."""
        raise NotImplementedError

    def create_exclusive(self, name, data):
        """Create ``name`` holding ``data``, durably, only if no object has
        that name; False if one has.  The object appears whole or not at all."""
        raise NotImplementedError

    def read(self, name):
        """The whole object as bytes; FileNotFoundError if absent."""
        raise NotImplementedError

    def open(self, name):
        """A reader of the object: ``read(n)`` returns n bytes, fewer only at
        the end; ``close()``; usable in ``with``.  FileNotFoundError if absent."""
        raise NotImplementedError

    def sizes(self, names):
        """The sizes of many objects in one batched call, in order; None for
        a name that is absent (or not a plain object).  Backends with
        latency answer the whole batch in about one round trip."""
        return [self.size(name) for name in names]

    def size(self, name):
        return self.sizes([name])[0]

    def list(self, prefix, recursive=True):
        """Names of the objects under the folder ``prefix`` ("" for the
        top), streamed, in no particular order; temporary leftovers
        included.  Nothing if the folder does not exist."""
        raise NotImplementedError

    def delete(self, name):
        """Remove an object; an absent one is fine."""
        raise NotImplementedError

    def sync(self):
        """Every earlier ``write`` is durable when this returns."""

    def free_bytes(self):
        """Space left for objects, or None if the backend cannot tell."""
        return None

    def close(self):
        """Release connections; the store is not used afterwards."""


# scheme of the URL in HELLO -> module that opens it (imported on use, so
# that boto3 is needed only for s3:)
SCHEMES = {"file": "local", "ssh": "ssh", "s3": "s3"}


def open_store(url):
    """The store at a storage URL (doc/PROTOCOL.md, HELLO), retried."""
    from .retry import RetryStore
    scheme = url.partition(":")[0]
    if scheme not in SCHEMES:
        raise StoreError("unknown storage type %r (the agent knows %s)" % (scheme[:20], ", ".join(SCHEMES)))
    return RetryStore(importlib.import_module("." + SCHEMES[scheme], __name__).open_url(url))
