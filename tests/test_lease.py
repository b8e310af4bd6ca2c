"""The writer lock is a lease that holds (doc/decisions.md, "The writer
lock"): renewed by the agent on a timer whatever dom0 does, never written
over another holder's lock, confirmed before the root is replaced; a
writer that lost it commits nothing and says so; of several processes
taking over one stale lock, exactly one wins.  Real agents, short TTLs."""
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from images import KiB, make

TTL = 3


@pytest.fixture
def short_ttl(monkeypatch):
    from qubeswyng import archive
    monkeypatch.setattr(archive, "LOCK_TTL", TTL)


def _writer(wyng, command="send", *extra):
    """dom0's side of a writer, in this process, holding the lock."""
    from qubeswyng import cli
    from qubeswyng.archive import Archive
    return Archive(cli.parse(wyng.args([command, *extra]))).open(write=True)


def _volumes(wyng):
    return [v["name"] for v in json.loads(wyng.run("list", "--json").stdout)["volumes"]]


def _agent_pid(writer):
    return writer.transport.proc.pid


def test_a_silent_writer_keeps_its_lease_a_stalled_one_loses_it(wyng, short_ttl):
    """The race of issue 11.  A holds the lock and its dom0 sends nothing
    for longer than the TTL (busy reading a volume): the agent's timer
    keeps the lease, B is refused.  Then A's agent stalls past the TTL (a
    paused VM): B takes the stale lock and commits; A resumes and tries
    to commit: refused, and only B's change is in the archive."""
    from qubeswyng.wire import AgentError
    wyng.init()
    a = _writer(wyng)
    time.sleep(TTL + 0.3)
    with pytest.raises(AgentError, match="archive is locked by qvm-wyng send on %s" % socket.gethostname()):
        _writer(wyng)
    os.kill(_agent_pid(a), signal.SIGSTOP)
    try:
        time.sleep(TTL + 0.3)
        b = _writer(wyng)
    finally:
        os.kill(_agent_pid(a), signal.SIGCONT)
    b.add_volume("from-b")
    b.commit()
    a.add_volume("from-a")
    with pytest.raises(AgentError, match="the archive lock (ran out while this writer was stalled, and "
                                         "qvm-wyng send on %s .* took it|was taken over by)" % socket.gethostname()):
        a.commit()
    a.close()
    b.close()
    assert _volumes(wyng) == ["from-b"]
    assert not any(p.name.startswith("lock") for p in wyng.archive.iterdir())


def test_a_forced_takeover_stops_the_first_writer_with_a_clear_error(wyng, tmp_path):
    """qvm-wyng as a user runs it: a send stopped just before its commit
    (dom0 stopped, say a debugger or a suspend), another send takes the
    lock with --force and commits; the first resumes and exits 1 with one
    line naming who took the lock, its session nowhere."""
    image = make(tmp_path / "img", 4 * 64 * KiB, [(0, 4 * 64 * KiB, "random")])
    wyng.init()
    first = subprocess.Popen([sys.executable, "-m", "qubeswyng.cli"] + wyng.args(
        ["send", "--import-other-from=first:|:%s" % image]),
        env=dict(os.environ, QVM_WYNG_TEST_PAUSE="dom0:before-root"), stderr=subprocess.PIPE, text=True)
    try:
        _wait_stopped(first.pid)
        done = wyng.send("second", image, "--force")
        assert "warning: --force took over the archive lock held by qvm-wyng send" in done.stderr
    finally:
        os.kill(first.pid, signal.SIGCONT)
    err = first.communicate(timeout=60)[1]
    assert first.returncode == 1
    # the second send is done, so its lock is gone: the agent cannot name it any more
    assert err == "qvm-wyng: error: agent: the archive lock was taken over by another writer: " \
                  "this writer stopped and commits nothing more\n", err
    assert _volumes(wyng) == ["second"]
    wyng.run("arch-check", "--clean", expect=None)  # the first send's manifest, now unused
    wyng.run("arch-check")


def _wait_stopped(pid, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        with open("/proc/%d/stat" % pid) as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        time.sleep(0.02)
    raise AssertionError("process %d never stopped" % pid)


def _plant(wyng, kind):
    """A lock left by another writer: expired on another host, or held
    by a dead process on this host."""
    host, pid, expires = {"expired": ("otherhost", 4242, time.time() - 1),
                          "dead": (socket.gethostname(), _dead_pid(), time.time() + 600)}[kind]
    (wyng.archive / "lock").write_text(json.dumps({
        "owner": "qvm-wyng send on %s (pid %d)" % (host, pid), "host": host, "pid": pid,
        "expires": expires, "token": os.urandom(8).hex()}))


def _dead_pid():
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("kind", ["expired", "dead"])
def test_a_stale_lock_raced_by_several_processes_has_one_winner(wyng, kind):
    """Several agents (separate processes) take over one stale lock at the
    same moment, without a sleep to sort it out: exactly one wins each
    round, the others are refused, and the stored lock is the winner's."""
    from qubeswyng import cli, wire
    from qubeswyng.archive import Archive
    wyng.init()
    racers = 4
    for _round in range(2):
        _plant(wyng, kind)
        writers = [Archive(cli.parse(wyng.args(["send"]))).open() for _ in range(racers)]
        for n, w in enumerate(writers):
            w.link.send(wire.LOCK, struct.pack(">IB", TTL, 0), b"racer %d" % n)
        won, refused = [], []
        for n, w in enumerate(writers):
            try:
                w.link.reply(301)
                won.append(n)
            except wire.AgentError as e:
                refused.append(str(e))
        assert len(won) == 1, (won, refused)
        assert all("archive is locked by racer %d" % won[0] in e or "taken by another writer" in e
                   for e in refused), refused
        assert json.loads((wyng.archive / "lock").read_text())["owner"].startswith("racer %d on " % won[0])
        for w in writers:
            w.close()
        leftover = sorted(p.name for p in wyng.archive.iterdir() if p.name.startswith("lock"))
        assert leftover == [], leftover


class _Paused:
    """The real local store, with one verb held at a gate: the interleaving
    of two writers made deterministic."""

    def __init__(self, store, verb, match):
        self.store, self.verb, self.match = store, verb, match
        self.reached, self.go = threading.Event(), threading.Event()

    def __getattr__(self, name):
        real = getattr(self.store, name)
        if name != self.verb:
            return real

        def gated(obj, *args):
            if self.match in obj and not self.reached.is_set():
                self.reached.set()
                assert self.go.wait(30)
            return real(obj, *args)
        return gated


def _agent_lease(store):
    from wyngagent.lease import Lease
    return Lease(store)


def test_a_slow_taker_cannot_take_a_lock_another_taker_already_replaced(wyng):
    """X and W both found the same stale lock; X is slow: W claims it,
    replaces it and removes its claim before X claims.  X must notice and
    fail: taking over is never decided by an older read."""
    from wyngagent.lease import LeaseError
    from wyngagent.storage.local import LocalStore
    wyng.init()
    _plant(wyng, "expired")
    store = LocalStore(str(wyng.archive))
    x = _agent_lease(_Paused(store, "create_exclusive", ".taken"))
    failure = []

    def slow():
        try:
            x.take("slow", TTL, False)
        except LeaseError as e:
            failure.append(str(e))
    thread = threading.Thread(target=slow)
    thread.start()
    assert x.store.reached.wait(30)  # X read the stale lock and is about to claim it
    w = _agent_lease(store)
    assert w.take("quick", TTL, False)[0] == 4  # stale
    x.store.go.set()
    thread.join(30)
    assert failure and "archive is locked by quick on" in failure[0], failure
    assert x.body is None
    w.confirm()
    w.release()
    assert not any(p.name.startswith("lock") for p in wyng.archive.iterdir())


def test_a_holder_that_stalled_goes_on_only_if_nobody_took_its_lock(wyng):
    """A writer stalled past its lease (a suspended VM) and nobody wanted
    the lock: it takes it over from itself and goes on.  If somebody did
    take it, it stops, and its late renewal leaves the new lock alone."""
    from wyngagent.lease import LeaseError
    from wyngagent.storage.local import LocalStore
    wyng.init()
    store = LocalStore(str(wyng.archive))
    a = _agent_lease(store)
    a.take("a", 2, False)
    a.stop.set()  # no renewals: as if stalled
    a.thread.join()
    a.valid_until = 0
    a.confirm()  # nobody took it: goes on, with a new lock instance
    assert json.loads((wyng.archive / "lock").read_text())["owner"].startswith("a on ")
    time.sleep(2.2)  # stalled again, and this time
    b = _agent_lease(store)
    assert b.take("b", 2, False)[0] == 4
    with pytest.raises(LeaseError, match="and b on .* took it"):
        a.renew()
    with pytest.raises(LeaseError):
        a.valid()
    assert json.loads((wyng.archive / "lock").read_text())["owner"].startswith("b on ")
    a.release()
    b.confirm()
    b.release()
    assert not any(p.name.startswith("lock") for p in wyng.archive.iterdir())


def test_a_collector_that_lost_the_lock_deletes_nothing(wyng, tmp_path):
    """GC confirms the lease before it deletes: a collector whose lock was
    taken over (--force) stops with an error, and the chunk no session
    uses is still there (the new holder may have counted on it)."""
    from qubeswyng.wire import AgentError
    image = make(tmp_path / "img", 2 * 64 * KiB, [(0, 2 * 64 * KiB, "random")])
    wyng.init()
    wyng.send("vol", image)
    unused = wyng.archive / "chunks" / "00" / ("00" * 32)
    unused.parent.mkdir(exist_ok=True)
    unused.write_bytes(os.urandom(1000))
    a = _writer(wyng)
    b = _writer(wyng, "send", "--force")
    with pytest.raises(AgentError, match="the archive lock was taken over by qvm-wyng send on"):
        a.collect()
    a.close()
    assert unused.exists()
    b.collect()
    b.close()
    assert not unused.exists()
