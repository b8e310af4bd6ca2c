"""Crash safety: send, prune, delete and arch-init killed (SIGKILL) at
labelled points and at random moments, dom0 or the agent.  After every
kill, arch-check must find no damaged session and every session in the
archive must restore byte for byte; no session that had completed before
may be missing, and a command that exited 0 must be wholly visible (its
session there, the sessions it pruned gone).

One archive lives through all the runs, so each run starts from whatever
the previous kills left behind (garbage markers, leftovers, stale locks).
It lives on a tmpfs: a kill leaves the page cache intact, so durability
is not what these tests check (tests/test_power_loss.py does), and the
host's disk stays out of their timing.
"""
import contextlib
import io
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
# agent:before-rename-X: inside the write of an object under X, its
# temporary file complete, before the rename that makes it appear
LABELS = {
    "send": ["agent:before-rename-chunks", "agent:in-upload", "agent:before-rename-manifests",
             "dom0:after-manifest", "dom0:before-root", "agent:before-root", "agent:before-rename-archive",
             "agent:after-root", "dom0:after-root"],
    "prune": ["agent:before-rename-garbage", "dom0:prune-marked", "agent:in-upload", "dom0:after-manifest",
              "dom0:before-root", "agent:before-root", "agent:before-rename-archive", "agent:after-root",
              "dom0:after-root", "agent:scan-half", "agent:before-garbage-removed", "agent:after-garbage-removed"],
    "delete": ["agent:before-rename-garbage", "dom0:delete-before-commit", "dom0:before-root",
               "agent:before-rename-archive", "dom0:after-root", "agent:after-root", "agent:scan-half",
               "agent:before-garbage-removed", "agent:after-garbage-removed"],
    "arch-init": ["agent:before-rename-header", "dom0:init-header", "dom0:before-root", "agent:before-root",
                  "agent:before-rename-archive", "agent:after-root", "dom0:after-root"],
}


def _on_tmpfs(wyng, tmpfs):
    mnt = tmpfs("64m")
    wyng.archive, wyng.meta = mnt / "archive", mnt / "meta"
    wyng.dest = "file:%s" % wyng.archive


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
    """Run a command that a label or a timer may kill; returns (whether
    something was killed, its exit status).  Waits until every process of
    the run is gone."""
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
    return killed, proc.returncode


def _arch_check(wyng):
    """qvm-wyng arch-check, in this process (no interpreter start)."""
    from qubeswyng import cli
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(wyng.args(["arch-check"]))
    return code, out.getvalue(), err.getvalue()


def _check(wyng, model):
    """arch-check finds no damaged session; every session restores to what
    was sent; completed sessions are all there, and nothing that a
    completed command removed.  Returns the new model."""
    code, out, err = _arch_check(wyng)
    assert code in (0, 1), err
    assert not err.strip() or "finishing an interrupted" in err, err
    for line in out.splitlines():
        assert line.startswith(("checked ", "archive: ", "arch-check: ")), out
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


def test_kills_during_send_prune_and_delete_lose_nothing(wyng, tmp_path, tmpfs):
    _on_tmpfs(wyng, tmpfs)
    rng = random.Random(1234)
    wyng.init("--chunk-factor=1")
    images = {v: tmp_path / v for v in ("a", "b")}
    for path in images.values():
        path.write_bytes(rng.randbytes(CHUNKS * CHUNK))
    model = {"certain": {}, "maybe": {}}
    when, runs, kills, exited = 1767225600, 0, {"send": 0, "prune": 0, "delete": 0}, 0
    labels = {op: [] for op in kills}
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
        label = None
        if rng.random() < 0.6:  # every label in turn, so that each is reached
            labels[op] = labels[op] or rng.sample(LABELS[op], len(LABELS[op]))
            label = labels[op].pop()
        if op == "send":
            vols = rng.sample(sorted(images), rng.choice([1, 2]))
            for vol in vols:
                with open(images[vol], "r+b") as f:
                    f.seek(rng.randrange(CHUNKS) * CHUNK)
                    f.write(rng.randbytes(rng.choice([100, CHUNK, 3 * CHUNK])))
                model["maybe"][(vol, name)] = _digest(images[vol])
            args = ["send", "--send-unchanged"] + ["--import-other-from=%s:|:%s" % (v, images[v]) for v in vols]
            done = {(v, name) for v in vols}
        else:
            vol = rng.choice(crowded)
            if op == "prune":
                names = sorted(n for v, n in model["certain"] if v == vol)
                target = sorted(rng.sample(names[:-1], rng.choice([1, 2])))  # one, or a range
                gone = [(vol, n) for n in names if target[0] <= n <= target[-1]]
                args = ["prune", vol, "--session=" + ",".join(target)]
            else:
                gone = [k for k in model["certain"] if k[0] == vol]
                args = ["delete", "-u", vol]
            for key in gone:
                model["maybe"][key] = model["certain"].pop(key)
        killed, code = _run_killed(wyng, args, when, rng, label)
        kills[op] += killed
        if code == 0:  # exited 0: the change is whole, whether or not a kill came after
            exited += 1
            if op == "send":
                model["certain"].update((key, model["maybe"].pop(key)) for key in done)
            else:
                for key in gone:
                    del model["maybe"][key]
        model = _check(wyng, model)
    # the archive is whole in the end: one more writer cleans up, nothing is left over
    wyng.run("arch-check", "--clean", expect=None)
    assert wyng.run("arch-check").returncode == 0
    litter = [p.name for p in wyng.archive.rglob("*") if ".tmp-" in p.name or p.name.startswith(("lock", "garbage"))]
    assert not litter, litter
    assert all(kills.values()) and exited, (kills, exited)
    print("%d runs, %d killed: %s, %d exited 0" % (runs, sum(kills.values()), kills, exited))


def test_arch_init_killed_at_any_point_can_be_run_again(wyng, tmp_path, tmpfs):
    """arch-init killed anywhere: exit 0 means an archive that opens;
    otherwise the archive opens, or says it is not there (or has no root),
    and arch-init on the same destination makes one."""
    _on_tmpfs(wyng, tmpfs)
    rng = random.Random(99)
    base = wyng.archive
    runs = [(label, None) for label in LABELS["arch-init"]] + [(None, 0)]
    for n, (label, _timer) in enumerate(runs):
        wyng.archive = base.with_name("init%d" % n)
        wyng.dest = "file:%s" % wyng.archive
        _killed, code = _run_killed(wyng, ["arch-init", "--chunk-factor=1"], 1767225600, rng, label)
        listed = wyng.run("list", expect=None)
        if code == 0:
            assert listed.returncode == 0, (label, listed.stderr)
        elif listed.returncode:
            assert listed.stderr.count("\n") == 1 and ("no archive at" in listed.stderr or
                                                      "arch-init was interrupted" in listed.stderr), listed.stderr
            wyng.init("--chunk-factor=1")
            wyng.run("list")


def _digest(path):
    import hashlib
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_killed_agents_scan_folder_goes_at_the_next_agent_start(wyng, tmp_path):
    """An agent killed in the middle of a collection leaves its bucket
    folder behind; the next agent removes it, and only folders whose owner
    is gone (a folder locked by a live process stays)."""
    import fcntl
    temp = tmp_path / "temp"
    temp.mkdir()
    env = {"TMPDIR": str(temp)}
    image = tmp_path / "img"
    image.write_bytes(random.Random(1).randbytes(4 * CHUNK))
    wyng.init("--chunk-factor=1")
    wyng.send("vol", image)
    proc = subprocess.Popen([sys.executable, "-m", "qubeswyng.cli"] + wyng.args(["arch-check"]),
                            env=dict(os.environ, QVM_WYNG_TEST_CRASH="agent:scan-half", **env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.communicate(timeout=60)[0] is not None and proc.returncode == 1
    killed = [p for p in temp.iterdir() if p.name.startswith("wyng-scan-")]
    assert len(killed) == 1 and (killed[0] / ".owner").exists()
    live = temp / "wyng-scan-live"
    live.mkdir()
    fresh = temp / "wyng-scan-fresh"  # being made right now: no lock file yet
    fresh.mkdir()
    with open(live / ".owner", "wb") as owner:
        fcntl.flock(owner, fcntl.LOCK_EX)
        wyng.run("list", env=env)
        assert sorted(p.name for p in temp.iterdir()) == ["wyng-scan-fresh", "wyng-scan-live"]
    wyng.run("list", env=env)
    assert sorted(p.name for p in temp.iterdir()) == ["wyng-scan-fresh"]
