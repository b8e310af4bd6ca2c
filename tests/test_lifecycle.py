"""Archive lifecycle commands as a user runs them: delete, rename, add,
arch-check, arch-deduplicate, the writer lock, and a full destination."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from images import KiB, MiB, chunk_files, make, overwrite, same

CHUNK = 256 * KiB


def _two_volumes(wyng, tmp_path):
    """Volumes a and b sharing four chunks, two sessions of a."""
    common = [(0, 4 * CHUNK, "random")]
    a = make(tmp_path / "a", 8 * CHUNK, common + [(5 * CHUNK, CHUNK, "random")], seed=1)
    b = make(tmp_path / "b", 8 * CHUNK, common + [(6 * CHUNK, CHUNK, b"B")], seed=1)
    wyng.init()
    wyng.send("a", a)
    wyng.send("b", b)
    overwrite(a, 7 * CHUNK, b"second")
    wyng.send("a", a)
    return a, b


# -- delete, rename, add ---------------------------------------------------------

def test_delete_needs_confirmation_without_a_terminal(wyng, tmp_path):
    _two_volumes(wyng, tmp_path)
    done = wyng.run("delete", "a", expect=1)
    assert done.stderr.strip() == "qvm-wyng: error: delete needs confirmation: use --unattended"
    assert len(wyng.sessions("a")) == 2


def test_delete_removes_a_volume_and_only_its_own_chunks(wyng, tmp_path):
    _a, b = _two_volumes(wyng, tmp_path)
    assert len(chunk_files(wyng.archive)) == 7  # 4 shared, a's 5th and 7th, b's 6th
    done = wyng.run("delete", "-u", "a")
    assert "reclaimed" in done.stdout
    listing = json.loads(wyng.run("list", "--json").stdout)
    assert [v["name"] for v in listing["volumes"]] == ["b"]
    assert len(chunk_files(wyng.archive)) == 5  # b's own and the shared ones
    wyng.receive("b", tmp_path / "out")
    assert same(b, tmp_path / "out")
    assert wyng.run("arch-check").returncode == 0
    assert "not in the archive" in wyng.run("delete", "-u", "a", expect=1).stderr


def test_rename_keeps_the_data_under_the_new_name(wyng, tmp_path):
    a, _b = _two_volumes(wyng, tmp_path)
    before = wyng.sessions("a")
    wyng.run("rename", "a", "work/private.img")
    assert wyng.sessions("work/private.img") == before
    wyng.receive("work/private.img", tmp_path / "out")
    assert same(a, tmp_path / "out")
    assert "not in the archive" in wyng.run("list", "a", expect=1).stderr
    assert "already in the archive" in wyng.run("rename", "b", "work/private.img", expect=1).stderr
    assert "not a valid volume name" in wyng.run("rename", "b", "../x", expect=1).stderr


def test_add_makes_an_empty_volume_that_send_fills(wyng, tmp_path):
    wyng.init()
    wyng.run("add", "new-vol")
    assert "no sessions" in wyng.run("list").stdout
    image = make(tmp_path / "img", 2 * CHUNK, [(0, 2 * CHUNK, "random")])
    wyng.send("new-vol", image)
    assert len(wyng.sessions("new-vol")) == 1
    assert "already in the archive" in wyng.run("add", "new-vol", expect=1).stderr


@pytest.mark.parametrize("command,label,done", [
    ("prune", "dom0:prune-marked", False), ("prune", "dom0:after-manifest", False),
    ("prune", "agent:before-root", False), ("prune", "dom0:after-root", True),
    ("prune", "agent:scan-half", True), ("delete", "dom0:delete-before-commit", False),
    ("delete", "agent:after-root", True), ("delete", "agent:scan-half", True)])
def test_interrupted_prune_or_delete_is_settled_by_the_next_command(wyng, tmp_path, command, label, done):
    """Killed before the new root: the next writer rolls it back; after:
    it finishes it.  Either way no garbage is left and nothing is lost."""
    _a, b = _two_volumes(wyng, tmp_path)
    first, second = wyng.sessions("a")
    args = ["prune", "a", "--session=" + first] if command == "prune" else ["delete", "-u", "a"]
    killed = wyng.run(*args, expect=None, env={"QVM_WYNG_TEST_CRASH": label})
    assert killed.returncode != 0 and (wyng.archive / "garbage").exists()
    after = wyng.send("b", b, "--send-unchanged")
    assert "finishing an interrupted prune or delete" in after.stderr
    assert not (wyng.archive / "garbage").exists()
    names = [v["name"] for v in json.loads(wyng.run("list", "--json").stdout)["volumes"]]
    if command == "delete":
        assert names == (["b"] if done else ["a", "b"])
    else:
        assert wyng.sessions("a") == ([second] if done else [first, second])
    assert wyng.run("arch-check").returncode == 0  # nothing unused is left
    assert len(wyng.restore_all()["b"]) == 2


# -- arch-check and arch-deduplicate ---------------------------------------------

def test_arch_check_reports_by_volume_and_session(wyng, tmp_path):
    _two_volumes(wyng, tmp_path)
    assert "no problems found" in wyng.run("arch-check").stdout
    keys = wyng.keys()
    # b's own chunk goes missing; a junk object and a leftover appear
    victim = wyng.archive / "chunks" / _hex(keys, tmp_path / "b", 6)[:2] / _hex(keys, tmp_path / "b", 6)
    victim.unlink()
    (wyng.archive / "chunks" / "00").mkdir(exist_ok=True)
    (wyng.archive / "chunks" / "00" / ("00" * 32)).write_bytes(b"QWO\x01junk")
    (wyng.archive / "manifests" / "aa.tmp-12345678").write_bytes(b"")
    done = wyng.run("arch-check", expect=1)
    b_session = wyng.sessions("b")[0]
    assert "b %s: 1 chunks missing" % b_session in done.stdout
    assert "1 unused chunks" in done.stdout and "1 leftover temporary files" in done.stdout
    assert "a " not in done.stdout.replace("arch-check", "")  # a is whole
    # --session=newest checks only the newest sessions; a volume name only that volume
    assert wyng.run("arch-check", "a", "--session=newest").returncode == 0
    assert wyng.run("arch-check", "b", expect=1).returncode == 1
    # --clean removes the leftover; while a chunk a session lists is missing, the lists may be
    # wrong (a damaged id), so no chunk is removed: the junk chunk waits, the problem stays
    done = wyng.run("arch-check", "--clean", expect=1)
    assert "removed 1 objects" in done.stdout and "unused" not in done.stdout
    assert "1 problem found" in done.stdout
    assert (wyng.archive / "chunks" / "00" / ("00" * 32)).exists()


def test_arch_check_finds_damaged_chunks_and_manifests(wyng, tmp_path):
    _two_volumes(wyng, tmp_path)
    keys = wyng.keys()
    name = _hex(keys, tmp_path / "a", 5)
    path = wyng.archive / "chunks" / name[:2] / name
    data = bytearray(path.read_bytes())
    data[-5] ^= 1
    path.write_bytes(bytes(data))
    manifests = sorted((wyng.archive / "manifests").iterdir(), key=os.path.getmtime)
    b_manifest = manifests[1]  # sent second: b's
    b_manifest.write_bytes(manifests[0].read_bytes())
    done = wyng.run("arch-check", expect=1)
    a1, a2 = wyng.sessions("a")
    assert "a %s: 1 chunks damaged" % a1 in done.stdout
    assert "a %s" % a2 not in done.stdout  # a's chunk 5 comes from the first session
    assert "b %s: " % wyng.sessions("b")[0] in done.stdout and "authentication" in done.stdout


def _hex(keys, image, index):
    with open(image, "rb") as f:
        f.seek(index * CHUNK)
        return keys.chunk_id(f.read(CHUNK)).hex()


def test_arch_deduplicate_reports_logical_and_stored_bytes(wyng, tmp_path):
    _two_volumes(wyng, tmp_path)
    report = json.loads(wyng.run("arch-deduplicate", "--json").stdout)
    vols = {v["volume"]: v for v in report["volumes"]}
    assert vols["a"]["logical_bytes"] == 2 * 8 * CHUNK and vols["b"]["logical_bytes"] == 8 * CHUNK
    assert vols["a"]["chunks"] == 6 and vols["b"]["chunks"] == 5
    assert report["archive"]["chunks"] == 7  # the four shared chunks are stored once
    stored = sum(p.stat().st_size for p in (wyng.archive / "chunks").rglob("*") if p.is_file())
    assert report["archive"]["stored_bytes"] == stored
    assert report["archive"]["logical_bytes"] == 3 * 8 * CHUNK
    assert "(archive)" in wyng.run("arch-deduplicate").stdout


# -- the writer lock ----------------------------------------------------------------

def _wait_for(path, timeout=20):
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline, "%s never appeared" % path
        time.sleep(0.02)


def test_second_writer_is_refused_while_the_first_works(wyng, tmp_path):
    image = make(tmp_path / "img", 2 * CHUNK, [(0, 2 * CHUNK, "random")])
    wyng.init()
    wyng.send("vol", image)
    first = subprocess.Popen([sys.executable, "-m", "qubeswyng.cli"] + wyng.args(
        ["send", "--send-unchanged", "--import-other-from=vol:|:%s" % image]),
        env=dict(os.environ, QVM_WYNG_TEST_PAUSE="dom0:before-root"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for(wyng.archive / "lock")
        for command in (["send", "--import-other-from=vol:|:%s" % image], ["prune", "vol", "--session=x"],
                        ["delete", "-u", "vol"], ["arch-check"]):
            done = wyng.run(*command, expect=1)
            assert "archive is locked by qvm-wyng send on %s" % socket.gethostname() in done.stderr, done.stderr
        wyng.run("list")  # readers need no lock
    finally:
        first.kill()
        first.communicate()
    # dom0 died: its agent saw the pipe close and released the lock
    deadline = time.time() + 20
    while (wyng.archive / "lock").exists() and time.time() < deadline:
        time.sleep(0.05)
    wyng.send("vol", image, "--send-unchanged")
    assert len(wyng.sessions("vol")) == 2


def test_lock_of_a_killed_agent_is_taken_over(wyng, tmp_path):
    image = make(tmp_path / "img", 2 * CHUNK, [(0, 2 * CHUNK, "random")])
    wyng.init()
    first = subprocess.Popen([sys.executable, "-m", "qubeswyng.cli"] + wyng.args(
        ["send", "--import-other-from=vol:|:%s" % image]),
        env=dict(os.environ, QVM_WYNG_TEST_PAUSE="agent:before-root"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for(wyng.archive / "lock")
    holder = json.loads((wyng.archive / "lock").read_text())
    deadline = time.time() + 20
    while holder["pid"] and time.time() < deadline:
        try:
            with open("/proc/%d/wchan" % holder["pid"]) as f:
                if f.read() in ("hrtimer_nanosleep", "do_nanosleep"):
                    break
        except OSError:
            pass
        time.sleep(0.05)
    os.kill(holder["pid"], signal.SIGKILL)  # the agent, in the middle of committing
    assert first.wait(30) == 1
    assert (wyng.archive / "lock").exists()
    wyng.send("vol", image)  # dead holder on this host: taken over at once
    assert len(wyng.sessions("vol")) == 1
    wyng.run("verify", "vol")


def _foreign_lock(wyng, expires):
    (wyng.archive / "lock").write_text(json.dumps({
        "owner": "qvm-wyng send on otherhost (pid 4242)", "host": "otherhost", "pid": 4242,
        "expires": expires, "token": "0123456789abcdef"}))


def test_lock_from_another_host_holds_until_it_expires_or_force(wyng, tmp_path):
    image = make(tmp_path / "img", 2 * CHUNK, [(0, 2 * CHUNK, "random")])
    wyng.init()
    _foreign_lock(wyng, time.time() + 600)
    done = wyng.send("vol", image, expect=1)
    assert "archive is locked by qvm-wyng send on otherhost (pid 4242) until" in done.stderr
    done = wyng.send("vol", image, "--force")
    assert "warning: --force took over the archive lock held by qvm-wyng send on otherhost" in done.stderr
    _foreign_lock(wyng, time.time() - 1)
    overwrite(image, 0, b"x")
    done = wyng.send("vol", image)
    assert "warning" not in done.stderr
    assert len(wyng.sessions("vol")) == 2


# -- a full destination ---------------------------------------------------------------

def _fill(folder, leave):
    """A file that leaves about ``leave`` bytes free on folder's filesystem."""
    st = os.statvfs(folder)
    filler = folder / "filler"
    with open(filler, "wb") as f:
        f.write(b"\xff" * max(0, st.f_bavail * st.f_frsize - leave))
    return filler


def test_full_destination_during_send(wyng, tmp_path, tmpfs):
    mnt = tmpfs("8m")
    wyng.archive = mnt / "archive"
    wyng.dest = "file:%s" % wyng.archive
    small = make(tmp_path / "small", MiB, [(0, MiB, "random")], seed=1)
    big = make(tmp_path / "big", 4 * MiB, [(0, 4 * MiB, "random")], seed=2)
    wyng.init()
    wyng.send("small", small)
    filler = _fill(mnt, 2 * MiB)
    done = wyng.send("big", big, expect=1)
    assert done.stderr.strip().splitlines() == ["qvm-wyng: error: agent: storage error: No space left on device"]
    assert "big" not in wyng.run("list").stdout
    wyng.run("verify", "small")
    filler.unlink()
    wyng.send("big", big)
    wyng.receive("big", tmp_path / "out")
    assert same(big, tmp_path / "out")
    assert wyng.run("arch-check").returncode == 0


def test_full_destination_during_prune(wyng, tmp_path, tmpfs):
    mnt = tmpfs("16m")
    wyng.archive = mnt / "archive"
    wyng.dest = "file:%s" % wyng.archive
    # every session changes 1024 chunks that compress to little:
    # large manifests, small data
    image = tmp_path / "img"
    wyng.init("--chunk-factor=1")
    for n in range(3):
        image.write_bytes(b"".join(b"%06d-%d" % (i, n) * (8 * KiB) for i in range(1024)))
        wyng.send("vol", image)
    sessions = wyng.sessions("vol")
    filler = _fill(mnt, 24 * KiB)
    done = wyng.run("prune", "vol", "--session=" + sessions[1], expect=1)
    assert done.stderr.strip().splitlines() == ["qvm-wyng: error: agent: storage error: No space left on device"]
    assert wyng.sessions("vol") == sessions
    wyng.run("verify", "vol", "--session=" + sessions[0])
    filler.unlink()
    wyng.run("prune", "vol", "--session=" + sessions[1])
    assert wyng.sessions("vol") == [sessions[0], sessions[2]]
    assert wyng.run("arch-check").returncode == 0
    wyng.run("verify", "vol")
    shutil.rmtree(wyng.archive)


@pytest.mark.parametrize("mode,removed", [("on", 3), ("min", 1)])
def test_send_autoprune_on_or_min_prunes_only_when_space_is_short(wyng, tmp_path, tmpfs, mode, removed):
    mnt = tmpfs("8m")
    wyng.archive = mnt / "archive"
    wyng.dest = "file:%s" % wyng.archive
    image = tmp_path / "img"
    wyng.init()
    day = 86400
    for n in range(3):
        image.write_bytes(os.urandom(MiB))
        wyng.at(1767225600 + n * day, "send", "--import-other-from=vol:|:%s" % image)
    image.write_bytes(os.urandom(MiB))
    args = ("send", "--import-other-from=vol:|:%s" % image, "--autoprune=" + mode, "--apdays=1:62:1:2")
    wyng.at(1767225600 + 10 * day, *args)  # space enough: nothing pruned
    assert len(wyng.sessions("vol")) == 4
    filler = _fill(mnt, MiB // 8)
    image.write_bytes(os.urandom(MiB // 4))
    done = wyng.at(1767225600 + 11 * day, *args)
    assert "autoprune: vol: removed %d session" % removed in done.stderr
    assert len(wyng.sessions("vol")) == 4 - removed + 1
    filler.unlink()
    assert wyng.run("arch-check").returncode == 0


def _on_a_terminal(wyng, args, answer):
    """Run qvm-wyng with a terminal as stdin, answer its question; returns
    (exit code, what it printed)."""
    import pty
    pid, fd = pty.fork()
    if pid == 0:
        os.execv(sys.executable, [sys.executable, "-m", "qubeswyng.cli"] + wyng.args(args))
    out = b""
    while b"[y/N]" not in out:
        out += os.read(fd, 1024)
    os.write(fd, answer + b"\n")
    while True:
        try:
            chunk = os.read(fd, 1024)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.close(fd)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), out.decode()


def test_delete_asks_on_a_terminal(wyng, tmp_path):
    _two_volumes(wyng, tmp_path)
    code, out = _on_a_terminal(wyng, ["delete", "a"], b"n")
    assert code == 1 and "not confirmed, nothing changed" in out
    assert len(wyng.sessions("a")) == 2
    code, out = _on_a_terminal(wyng, ["delete", "a"], b"y")
    assert code == 0 and "deleted a" in out
    assert "a" not in [v["name"] for v in json.loads(wyng.run("list", "--json").stdout)["volumes"]]


def test_an_archive_with_many_sessions(wyng, tmp_path):
    """1,100 sessions (made through dom0's own API: a CLI send each would
    take minutes) are checked, counted and pruned in one request each."""
    from qubeswyng import cli
    from qubeswyng.archive import Archive
    from qubeswyng.manifest import ChunkMap
    wyng.init("--chunk-factor=1")
    archive = Archive(cli.parse(wyng.args(["send"]))).open(write=True)
    try:
        vol = archive.add_volume("vol")
        for n in range(1100):
            data = b"session %d" % n
            cid = archive.keys.chunk_id(data)
            archive.put_chunk(cid, data)
            ses = {"name": time.strftime("%Y%m%d-%H%M%S", time.gmtime(1767225600 + 60 * n)),
                   "time": 1767225600 + 60 * n, "size": len(data), "tags": {}}
            archive.write_manifest(vol, ses, vol["sessions"][-1]["name"] if vol["sessions"] else "",
                                   ChunkMap(ids=bytearray(cid)), b"\1")
            vol["sessions"].append(ses)
        archive.commit()
    finally:
        archive.close()
    assert "no problems found" in wyng.run("arch-check").stdout
    report = json.loads(wyng.run("arch-deduplicate", "--json").stdout)
    assert report["archive"]["chunks"] == 1100 and report["volumes"][0]["sessions"] == 1100
    names = wyng.sessions("vol")
    wyng.run("prune", "vol", "--all-before", "--session=" + names[1000])
    assert wyng.sessions("vol") == names[1000:]
    assert len(chunk_files(wyng.archive)) == 100
    assert "no problems found" in wyng.run("arch-check").stdout
    out = tmp_path / "out"
    wyng.receive("vol", out, "--session=" + names[1050])
    assert out.read_bytes() == b"session 1050"
