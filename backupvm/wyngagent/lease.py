"""The archive's writer lock: a lease that one writer holds at a time.

It needs four verbs of the store, nothing more: create-if-absent, read,
atomic replace and delete (the design, and why it is safe also on storage
with latency, are in doc/decisions.md).  Objects (doc/FORMAT.md):

- ``lock``: who holds it (JSON).  Written once per holder: by
  create-if-absent, or by atomic replace when a writer takes over a stale
  (or, with --force, a live) lock.  Its holder never writes it again, so a
  holder that stalled cannot overwrite a lock that was taken from it.
- ``lock.<id>``: the holder's renewals, ``{"expires": t}``, replaced by a
  thread every ttl/4 whatever the request loop is doing.  ``<id>`` names
  the instance of ``lock`` it renews (a hash of its bytes).
- ``lock.<id>.taken``: the claim of a writer taking over instance ``<id>``,
  made by create-if-absent: of several racing takers exactly one wins.
"""
import hashlib
import json
import math
import os
import socket
import threading
import time

LOCK_NAME = "lock"
MAX_LOCK = 4096  # a lock object larger than this is not ours: it counts as stale
STALE, FORCED = 4, 2  # flags of LOCK's reply (doc/PROTOCOL.md)


class LeaseError(Exception):
    pass


def _clock():
    """Seconds that also run while the machine is suspended (unlike
    monotonic): a writer that slept through its lease must notice."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def instance(raw):
    return hashlib.sha256(raw).hexdigest()[:32]


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class Lease:
    def __init__(self, store):
        self.store = store
        self.body = None  # our ``lock`` while we hold it
        self.ttl = 0
        self.valid_until = 0.0  # _clock() time: after it we no longer count on the lease
        self.lost = None  # why we lost it
        self.mutex = threading.RLock()
        self.stop = threading.Event()
        self.thread = None

    # -- taking ------------------------------------------------------------
    def take(self, owner, ttl, force):
        """Take the lock; returns (flags, previous holder text)."""
        if self.body is not None:
            raise LeaseError("this connection holds the lock already")
        if not 2 <= ttl <= 86400:
            raise LeaseError("lock lifetime %d s is out of range" % ttl)
        self.ttl = ttl
        for _attempt in range(5):
            start, body = _clock(), self._body(owner)
            if self.store.create_exclusive(LOCK_NAME, body):
                self._hold(body, start)
                return 0, ""
            raw = self._read(LOCK_NAME)
            if raw is None:
                continue  # released meanwhile: create it again
            holder = _parse(raw)
            text = str(holder.get("owner", "?"))[:200]
            expires = self._expires(raw, holder)
            flags = STALE
            if _live(holder, expires):
                if not force:
                    raise LeaseError("archive is locked by %s until %s (--force takes it over)" % (text, _when(expires)))
                flags = FORCED
            if self._supersede(raw, body):
                self._hold(body, start)
                return flags, text
            force = False  # --force takes over the lock it was shown, not the winner of a race
        raise LeaseError("archive lock was taken by another writer")

    def _supersede(self, raw, body):
        """Replace the lock instance ``raw`` by ``body``, unless another
        writer does so first; True if we did.  The claim makes takers of
        one instance take turns; the read after it sees whether an earlier
        taker already replaced the instance (and removed its claim)."""
        old = instance(raw)
        claim = "lock.%s.taken" % old
        if not self.store.create_exclusive(claim, body):
            return False
        if self._read(LOCK_NAME) != raw:
            self.store.delete(claim)
            return False
        self.store.write(LOCK_NAME, body)
        # no taker can use these any more: the instance they name is gone
        self.store.delete("lock." + old)
        self.store.delete(claim)
        return True

    def _hold(self, body, start):
        self.body, self.lost = body, None
        self.valid_until = start + self.ttl * 3 / 4
        self.stop.clear()
        self.thread = threading.Thread(target=self._keep, daemon=True)
        self.thread.start()

    def _body(self, owner):
        return json.dumps({"owner": "%s on %s (pid %d)" % (owner, socket.gethostname(), os.getpid()),
                           "host": socket.gethostname(), "pid": os.getpid(),
                           "expires": time.time() + self.ttl, "token": os.urandom(8).hex()}).encode()

    # -- holding -----------------------------------------------------------
    def _keep(self):
        """The renewal thread: every ttl/4, independent of requests."""
        while not self.stop.wait(self.ttl / 4):
            try:
                self.renew()
            except LeaseError:
                return
            except OSError:
                pass  # storage trouble: the next round tries again, until the lease runs out

    def renew(self):
        with self.mutex:
            start = _clock()
            self.confirm()
            self.store.write("lock." + instance(self.body), json.dumps({"expires": time.time() + self.ttl}).encode())
            self._confirm()
            self.valid_until = start + self.ttl * 3 / 4

    def confirm(self):
        """Raise LeaseError unless we hold the lock, by our clock and as
        stored.  Called right before the root is replaced and before GC
        deletes."""
        with self.mutex:
            if self.body is None:
                raise LeaseError("a writer must hold the archive lock")
            if self.lost:
                raise LeaseError(self.lost)
            if _clock() >= self.valid_until:
                self._resume()
            self._confirm()

    def valid(self):
        """The cheap check before each GC delete: the lease has not run
        out by our clock (if it has, confirm it)."""
        if self.lost or _clock() >= self.valid_until:
            self.confirm()

    def _resume(self):
        """We stalled past our lease (suspended, or storage too slow to
        renew).  If nobody took the lock meanwhile, nobody else wrote: take
        it over from ourselves as any taker would, and go on."""
        start = _clock()
        body = json.dumps(dict(json.loads(self.body), token=os.urandom(8).hex(),
                               expires=time.time() + self.ttl)).encode()
        if not self._supersede(self.body, body):
            self._lose("the archive lock ran out while this writer was stalled, and %s took it" % self._holder())
        self.body, self.valid_until = body, start + self.ttl * 3 / 4

    def _confirm(self):
        if self._read(LOCK_NAME) != self.body:
            self._lose("the archive lock was taken over by %s" % self._holder())

    def _holder(self):
        raw = self._read(LOCK_NAME)
        return str(_parse(raw).get("owner", "another writer"))[:200] if raw else "another writer"

    def _lose(self, why):
        self.lost = why + ": this writer stopped and commits nothing more"
        raise LeaseError(self.lost)

    def release(self):
        self.stop.set()
        if self.thread and self.thread is not threading.current_thread():
            self.thread.join(30)
        with self.mutex:
            # a lease that ran out may have been taken: then the lock is not ours to remove
            if self.body and not self.lost and _clock() < self.valid_until and self._read(LOCK_NAME) == self.body:
                self.store.delete(LOCK_NAME)
                self.store.delete("lock." + instance(self.body))
            self.body = None

    def debris(self, name):
        """True for a lock object of another lock than ours (left by a
        holder that lost a race or was killed): our GC may remove it."""
        parts = name.split(".")
        return self.body is not None and parts[0] == LOCK_NAME and parts[2:] in ([], ["taken"]) and \
            len(parts) > 1 and parts[1] != instance(self.body)

    # -- reading a lock ------------------------------------------------------
    def _read(self, name):
        try:
            with self.store.open(name) as f:
                return f.read(MAX_LOCK + 1)
        except FileNotFoundError:
            return None

    def _expires(self, raw, holder):
        """When the lock instance ``raw`` expires: its own time or its
        holder's latest renewal, whichever is later."""
        renewal = self._read("lock." + instance(raw))
        times = [holder.get("expires"), _parse(renewal).get("expires") if renewal else None]
        return max([t for t in times if _number(t)], default=0)


def _when(t):
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
    except (OverflowError, ValueError, OSError):
        return "the far future"


def _parse(raw):
    """A lock object's fields, or {} if it is not a lock (a stale one)."""
    if len(raw) > MAX_LOCK:
        return {}
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def _live(holder, expires):
    """A lock counts until it expires, unless its holder ran on this host
    and is gone (killed): then it is stale at once."""
    if expires <= time.time():
        return False
    pid = holder.get("pid")
    if holder.get("host") == socket.gethostname() and isinstance(pid, int) and not isinstance(pid, bool) and pid > 0:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except (PermissionError, OverflowError):
            pass
    return True
