"""Crash safety: send, prune and delete killed (SIGKILL) at labelled points
and at random moments, dom0 or the agent.  After every kill, arch-check
must find no damaged session and every session in the archive must restore
byte for byte; no session that had completed before may be missing.

One archive lives through all the runs, so each run starts from whatever
the previous kills left behind (garbage markers, leftovers, stale locks).
"""
import os
import random
import signal
import subprocess
import sys
import time
import uuid

from images import KiB

CHUNK = 64 * KiB
CHUNKS = 8
RUNS_KILLED = 105
LABELS = {
    "send": ["dom0:after-manifest", "dom0:before-root", "dom0:after-root", "agent:before-root",
             "agent:after-root"],
    "prune": ["dom0:prune-marked", "dom0:after-manifest", "dom0:before-root", "dom0:after-root",
              "agent:before-root", "agent:after-root", "agent:scan-half"],
    "delete": ["dom0:delete-before-commit", "dom0:before-root", "dom0:after-root", "agent:after-root",
               "agent:scan-half"],
}


def _marked(marker):
    """Pids of the processes whose environment carries ``marker``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open("/proc/%s/environ" % pid, "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


def _agent_of(pid):
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def _run_killed(wyng, args, when, rng, label):
    """Run a command that a label or a timer kills; returns True if
    something was killed.  Waits until every process of the run is gone."""
    marker = "QVM_WYNG_CRASH_RUN=" + uuid.uuid4().hex
    env = dict(os.environ, QVM_WYNG_TEST_NOW=str(when), QVM_WYNG_CRASH_RUN=marker)
    if label:
        env["QVM_WYNG_TEST_CRASH"] = label
    proc = subprocess.Popen([sys.executable, "-m", "qubeswyng.cli"] + wyng.args(args), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    killed = False
    if not label:
        time.sleep(rng.uniform(0.05, 0.35))
        victims = _agent_of(proc.pid) if rng.random() < 0.5 else [proc.pid]
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
                killed = True
            except ProcessLookupError:
                pass
    _out, err = proc.communicate(timeout=60)
    if label:
        killed = proc.returncode == -signal.SIGKILL or b"killed by SIGKILL" in err
    assert b"Traceback" not in err, err.decode()
    deadline = time.time() + 60
    while _marked(marker) and time.time() < deadline:
        time.sleep(0.02)
    return killed


def _check(wyng, model):
    """arch-check finds no damaged session; every session restores to what
    was sent; completed sessions are all there.  Returns the new model."""
    done = wyng.run("arch-check", expect=None)
    assert done.returncode in (0, 1), done.stderr
    assert not done.stderr.strip() or "finishing an interrupted" in done.stderr, done.stderr
    for line in done.stdout.splitlines():
        assert line.startswith(("checked ", "archive: ", "arch-check: ")), done.stdout
    restored = wyng.restore_all()
    now = {}
    for vol, sessions in restored.items():
        for name, digest in sessions.items():
            assert (vol, name) in model["certain"] or (vol, name) in model["maybe"], (vol, name)
            expected = model["certain"].get((vol, name)) or model["maybe"][(vol, name)]
            assert digest == expected, "%s %s restores other bytes" % (vol, name)
            now[(vol, name)] = digest
    missing = set(model["certain"]) - set(now)
    assert not missing, "completed sessions lost: %s" % sorted(missing)
    return {"certain": now, "maybe": {}}


def test_kills_during_send_prune_and_delete_lose_nothing(wyng, tmp_path):
    rng = random.Random(1234)
    wyng.init("--chunk-factor=1")
    images = {v: tmp_path / v for v in ("a", "b")}
    for path in images.values():
        path.write_bytes(rng.randbytes(CHUNKS * CHUNK))
    model = {"certain": {}, "maybe": {}}
    when, runs, kills = 1767225600, 0, {"send": 0, "prune": 0, "delete": 0}
    while sum(kills.values()) < RUNS_KILLED:
        runs += 1
        assert runs < 3 * RUNS_KILLED, "too few runs were killed: %s" % kills
        when += 3600
        name = time.strftime("%Y%m%d-%H%M%S", time.gmtime(when))
        per_volume = {}
        for vol, _n in model["certain"]:
            per_volume.setdefault(vol, []).append(_n)
        crowded = sorted(v for v, s in per_volume.items() if len(s) >= 3)
        op = rng.choice(["prune", "prune", "delete"]) if crowded and rng.random() < 0.6 else "send"
        label = rng.choice(LABELS[op]) if rng.random() < 0.6 else None
        if op == "send":
            vols = rng.sample(sorted(images), rng.choice([1, 2]))
            for vol in vols:
                with open(images[vol], "r+b") as f:
                    f.seek(rng.randrange(CHUNKS) * CHUNK)
                    f.write(rng.randbytes(rng.choice([100, CHUNK, 3 * CHUNK])))
                model["maybe"][(vol, name)] = _digest(images[vol])
            args = ["send", "--send-unchanged"] + ["--import-other-from=%s:|:%s" % (v, images[v]) for v in vols]
        elif op == "prune":
            vol = rng.choice(crowded)
            names = sorted(n for v, n in model["certain"] if v == vol)
            target = sorted(rng.sample(names[:-1], rng.choice([1, 2])))  # one, or a range
            for n in names:
                if target[0] <= n <= target[-1]:
                    model["maybe"][(vol, n)] = model["certain"].pop((vol, n))
            args = ["prune", vol, "--session=" + ",".join(target)]
        else:
            vol = rng.choice(crowded)
            for key in [k for k in model["certain"] if k[0] == vol]:
                model["maybe"][key] = model["certain"].pop(key)
            args = ["delete", "-u", vol]
        if _run_killed(wyng, args, when, rng, label):
            kills[op] += 1
        model = _check(wyng, model)
    # the archive is whole in the end: one more writer cleans up, nothing is left over
    wyng.run("arch-check", "--clean", expect=None)
    assert wyng.run("arch-check").returncode == 0
    assert all(kills.values()), kills
    print("%d runs, %d killed: %s" % (runs, sum(kills.values()), kills))


def _digest(path):
    import hashlib
    return hashlib.sha256(path.read_bytes()).hexdigest()
