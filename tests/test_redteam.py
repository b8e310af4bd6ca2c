"""Regression tests for what a hostile-storage review found (issue 16):
each fails without its fix.  Storage is the archive folder, changed by the
test; agents are the real one over pipes, or a small hostile script."""
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from conftest import AGENT, PASS, REPO, Wyng, need_root
from images import KiB, make
from qubes_helpers import Dom0, release, system  # noqa: F401 (fixtures)

CHUNK = 64 * KiB  # --chunk-factor=1
HOST = socket.gethostname().encode()


def _image(path, seed, chunks=4):
    return make(path, chunks * CHUNK, [(0, chunks * CHUNK, "random")], seed=seed)


def _one_line_error(done, *words):
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qvm-wyng: error: "), done.stderr
    assert "Traceback" not in done.stderr
    for w in words:
        assert w in lines[0], lines[0]


# -- 1. a volume named twice is one volume -----------------------------------

@pytest.mark.parametrize("names", [("vol", "vol"), ("work", "qubes/work/private")])
def test_prune_of_a_volume_named_twice_removes_one_session(wyng, tmp_path, names):
    name = "vol" if names[0] == "vol" else "qubes/work/private"
    wyng.init("--chunk-factor=1")
    images = [_image(tmp_path / ("img%d" % n), n) for n in range(3)]
    for n, image in enumerate(images):
        wyng.at(1767225600 + n * 60, "send", "--import-other-from=%s:|:%s" % (name, image))
    first, second, third = wyng.sessions(name)
    wyng.run("prune", *names, "--session=%s" % second)
    assert wyng.sessions(name) == [first, third]
    wyng.receive(name, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == images[2].read_bytes()
    wyng.run("verify", name, "--session=%s" % first)


# -- 2. storage that swaps one archive for another ----------------------------

def _two_archives(tmp_path, second_passphrase):
    """Archives a (passphrase PASS) and b, sharing dom0's metadata, each
    with a volume 'x' of its own data; both keys are in the auth cache."""
    a = Wyng(tmp_path)
    b = Wyng(tmp_path)
    b.archive = tmp_path / "archive-b"
    b.dest = "file:%s" % b.archive
    b.passphrase = second_passphrase
    for n, w in enumerate((a, b)):
        w.init("--chunk-factor=1")
        w.send("x", _image(tmp_path / ("img%d" % n), 10 + n))
    return a, b


def _swap(a, b):
    """The storage puts a copy of archive a where b was."""
    shutil.rmtree(b.archive)
    shutil.copytree(a.archive, b.archive)


def test_archive_swapped_for_another_with_the_same_passphrase_is_refused(tmp_path):
    a, b = _two_archives(tmp_path, PASS)
    _swap(a, b)
    out = tmp_path / "out"
    _one_line_error(b.receive("x", out, expect=None), "another archive", "--force-other-archive")
    assert not out.exists()
    _one_line_error(b.run("send", "--import-other-from=y:|:%s" % (tmp_path / "img1"), expect=None),
                    "another archive")
    # the user says so: then it is that archive, and it is remembered
    b.receive("x", out, "--force-other-archive")
    assert out.read_bytes() == (tmp_path / "img0").read_bytes()
    b.run("list")


def test_cached_key_opens_no_archive_but_the_one_its_destination_holds(tmp_path):
    a, b = _two_archives(tmp_path, "another passphrase")
    a.run("--authmin=5", "list")  # a's key is cached
    _swap(a, b)
    _one_line_error(b.run("--authmin=5", "list", expect=None), "another archive")
    # accepting the other archive asks for its passphrase: b's is wrong
    _one_line_error(b.run("--authmin=5", "list", "--force-other-archive", expect=None), "wrong passphrase")
    # a destination never seen before gets no cached key either
    c = Wyng(tmp_path)
    c.dest = "file:%s" % (tmp_path / "archive-b")
    c.meta = tmp_path / "other-meta"
    c.passphrase = "another passphrase"
    _one_line_error(c.run("--authmin=5", "list", expect=None), "wrong passphrase")
    c.passphrase = PASS
    assert "x" in c.run("--authmin=5", "list").stdout


# -- 3. links in the archive lead nowhere -------------------------------------

def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_manifests_folder_linked_elsewhere_loses_nothing_there(wyng, tmp_path):
    wyng.init("--chunk-factor=1")
    wyng.send("vol", _image(tmp_path / "img", 1))
    victim = tmp_path / "victim"
    victim.mkdir()
    for n in range(3):  # named like manifests no session uses: garbage, if they were the archive's
        (victim / os.urandom(16).hex()).write_bytes(b"precious %d" % n)
    (victim / "notes.txt").write_bytes(b"precious too")
    before = _files(victim)
    shutil.move(wyng.archive / "manifests", tmp_path / "moved")
    (wyng.archive / "manifests").symlink_to(victim)
    (wyng.archive / "garbage").write_bytes(b"")
    done = wyng.send("vol", _image(tmp_path / "img2", 2), expect=None)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    wyng.run("arch-check", "--clean", expect=None)
    assert _files(victim) == before
    # with the folder back, the archive is as it was
    (wyng.archive / "manifests").unlink()
    shutil.move(tmp_path / "moved", wyng.archive / "manifests")
    wyng.run("verify", "vol")


def test_chunk_folder_linked_into_another_archive_loses_nothing_there(tmp_path):
    a, b = _two_archives(tmp_path, PASS)
    before = _files(a.archive)
    theirs = sorted((a.archive / "chunks").iterdir())[0]  # chunks b's sessions do not use
    mine = b.archive / "chunks" / theirs.name
    if mine.exists():
        shutil.move(mine, tmp_path / "moved")
    mine.symlink_to(theirs)
    (b.archive / "garbage").write_bytes(b"")
    assert "Traceback" not in b.run("arch-check", "--clean", expect=None).stderr
    assert "Traceback" not in b.send("x", tmp_path / "img0", expect=None).stderr
    assert _files(a.archive) == before
    a.run("verify", "x")


def test_collection_removes_nothing_while_a_manifest_cannot_be_read(wyng, tmp_path):
    wyng.init("--chunk-factor=1")
    wyng.send("a", _image(tmp_path / "a", 1))
    wyng.send("b", _image(tmp_path / "b", 2))
    manifests = sorted((wyng.archive / "manifests").iterdir())
    chunk = next(p for p in (wyng.archive / "chunks").rglob("*") if p.is_file())
    planted = [wyng.archive / "manifests" / os.urandom(16).hex(), wyng.archive / "manifests" / "x.tmp-0badf00d",
               chunk.parent / (chunk.name[:2] + "f" * 62)]
    for p in planted:
        p.write_bytes(b"no session uses this")
    manifests[0].write_bytes(manifests[0].read_bytes()[:-40])  # damaged
    (wyng.archive / "garbage").write_bytes(b"")
    done = wyng.run("arch-check", "--clean", expect=1)
    assert "cannot read its manifest" in done.stdout
    assert all(p.exists() for p in planted) and (wyng.archive / "garbage").exists()


# -- 4. lost chunks are stored again -------------------------------------------

def _chunk_objects(wyng):
    return sorted(p for p in (wyng.archive / "chunks").rglob("*") if p.is_file())


def test_truncated_chunk_is_not_taken_for_a_stored_one(wyng, tmp_path):
    wyng.init("--chunk-factor=1")
    image = _image(tmp_path / "img", 1)
    wyng.send("vol", image)
    cut, grown, dropped = _chunk_objects(wyng)[:3]
    cut.write_bytes(cut.read_bytes()[:30])  # shorter than any sealed chunk
    grown.write_bytes(grown.read_bytes() + bytes(100))  # longer than this chunk can be
    dropped.unlink()
    wyng.send("copy", image)  # the same chunks, in another volume; no check ran in between
    wyng.run("verify", "vol")


@pytest.mark.parametrize("check", [("verify", "vol"), ("arch-check",)])
def test_chunks_a_check_found_damaged_are_stored_again_by_the_next_send(wyng, tmp_path, check):
    wyng.init("--chunk-factor=1")
    image = _image(tmp_path / "img", 1, chunks=8)
    wyng.send("vol", image)
    objects = _chunk_objects(wyng)
    flipped = bytearray(objects[3].read_bytes())
    flipped[-20] ^= 1  # same size: only reading it shows the damage
    objects[3].write_bytes(flipped)
    objects[5].unlink()
    assert wyng.run(*check, expect=1).returncode == 1
    wyng.send("vol", image)  # unchanged: nothing to send but what was lost
    wyng.run("verify", "vol")
    wyng.run("arch-check")


def test_incremental_send_reads_and_stores_again_a_lost_chunk_it_holds(wyng, btrfs_session, tmp_path):
    from test_cow_send import CS, Local
    wyng.init()
    local = Local(wyng, btrfs_session / tmp_path.name).make(8 * CS)
    local.send()
    data = local.path.read_bytes()[5 * CS:6 * CS]
    (wyng.archive / "chunks").joinpath(*_object_of(wyng, data)).unlink()
    wyng.run("verify", local.name, expect=1)
    assert (wyng.archive / "damaged").read_bytes() == bytes.fromhex(_object_of(wyng, data)[1])
    local.write((0, 100))
    out = local.send()
    assert out["incremental"] and out["chunks_read"] == 2 and out["chunks_repaired"] == 1, out
    wyng.run("verify", local.name)
    shutil.rmtree(local.pool)


def test_damaged_list_naming_the_zero_id_makes_no_hole_a_chunk(wyng, btrfs_session, tmp_path):
    """Storage that lists the all-zero id as damaged: the volume's holes are
    not read or stored as chunks, the send ends as usual."""
    from test_cow_send import CS, Local
    wyng.init()
    local = Local(wyng, btrfs_session / tmp_path.name).make(8 * CS, data=((0, 2 * CS), (6 * CS, CS)))
    local.send()
    (wyng.archive / "damaged").write_bytes(bytes(32))
    local.write((0, 100))
    out = local.send()
    assert out["incremental"] and out["chunks_read"] == 1 and not out.get("chunks_repaired"), out
    local.check(tmp_path)
    shutil.rmtree(local.pool)


def _object_of(wyng, data):
    cid = wyng.keys().chunk_id(data).hex()
    return cid[:2], cid


# -- 5. a failed receive into a block device says what it left ----------------

def test_failed_receive_into_a_device_keeps_what_it_did_not_reach_and_says_so(wyng, tmp_path):
    need_root()
    wyng.init("--chunk-factor=1")
    image = _image(tmp_path / "img", 1, chunks=8)
    wyng.send("vol", image)
    new = image.read_bytes()
    (wyng.archive / "chunks").joinpath(*_object_of(wyng, new[2 * CHUNK:3 * CHUNK])).write_bytes(b"damaged")
    backing = _image(tmp_path / "disk", 2, chunks=8)
    old = backing.read_bytes()
    device = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True, text=True,
                            check=True).stdout.strip()
    try:
        done = wyng.receive("vol", device, "--force", expect=None)  # it holds data
        with open(device, "rb") as f:
            now = f.read()
    finally:
        subprocess.run(["losetup", "-d", device])
    _one_line_error(done, "chunk 2", "%s is partly overwritten" % device)
    assert now[2 * CHUNK:3 * CHUNK] == old[2 * CHUNK:3 * CHUNK]  # never verified, never touched


# -- 6. the agent's text never reaches dom0's terminal raw ---------------------

NOISY = REPO / "tests" / "noisy_agent.py"


def _noisy(wyng, noise, *args):
    return wyng.run(*args, expect=None, env={"QVM_WYNG_AGENT": str(NOISY), "REAL_AGENT": str(AGENT),
                                             "NOISE": noise})


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """One archive with one volume, for checks that change nothing."""
    tmp_path = tmp_path_factory.mktemp("small")
    wyng = Wyng(tmp_path)
    wyng.init("--chunk-factor=1")
    wyng.send("vol", _image(tmp_path / "img", 1))
    return wyng


def test_agent_stderr_is_not_passed_to_the_terminal(small):
    done = _noisy(small, "escape", "list")
    assert done.returncode == 0 and "vol" in done.stdout
    assert done.stderr == ""


def test_failing_agent_ends_in_one_sanitized_line_with_its_last_words(small):
    done = _noisy(small, "fail", "list")
    _one_line_error(done, "agent exit status 3", "first line | Error: the last ?[1mline?")
    assert "\x1b" not in done.stderr and "\x07" not in done.stderr


def test_chatty_backup_qube_agent_neither_blocks_nor_reaches_the_terminal(tmp_path, system):
    dom0 = Dom0(tmp_path, system)
    system.services["wyng.Agent"] = [str(NOISY)]
    system.service_env.update(REAL_AGENT=str(AGENT), NOISE="flood")
    dom0.init()
    done = dom0.run("backup", "work")
    assert "chatter" not in done.err + done.out
    system.service_env["NOISE"] = "fail"
    done = dom0.run("list", expect=1)
    assert "agent exit status 3" in done.err and "the last ?[1mline?" in done.err and "\x1b" not in done.err


@pytest.mark.parametrize("lock", [b"[1,2]", b'{"expires": NaN, "owner": "x"}', b'"lock"', b"[" * 5000,
                                  b'{"expires": 1e300, "owner": "' + b"x" * (1 << 22) + b'"}'])
def test_planted_lock_that_is_no_lock_is_taken_over_not_a_crash(wyng, tmp_path, lock):
    wyng.init("--chunk-factor=1")
    (wyng.archive / "lock").write_bytes(lock)
    wyng.send("vol", _image(tmp_path / "img", 1))
    assert not (wyng.archive / "lock").exists()


def test_planted_live_lock_with_absurd_fields_is_a_clean_refusal(wyng, tmp_path):
    wyng.init("--chunk-factor=1")
    for expires in (b"1e300", b"%d" % (time.time() + 100)):
        (wyng.archive / "lock").write_bytes(b'{"expires": %s, "pid": %d, "host": "%s", "owner": "\\u001b[2J"}' % (
            expires, 10 ** 20, HOST))
        _one_line_error(wyng.send("vol", _image(tmp_path / "img", 1), expect=None), "archive is locked by ?[2J")


# -- 7. one line, never a traceback ----------------------------------------------

def test_agent_killed_by_a_real_time_signal(small):
    _one_line_error(_noisy(small, "rtsig", "list"), "agent killed by signal 36")


@pytest.mark.parametrize("args,words", [
    (["list", "--dest=file:/tmp/" + os.fsdecode(b"\xff\xfe")], ["not valid UTF-8"]),
    (["add", os.fsdecode(b"vol\xff")], ["not valid UTF-8"]),
    (["send", "--import-other-from=" + os.fsdecode(b"v\xff:|:/dev/null")], ["not valid UTF-8"]),
    (["send", "--import-other-from=w:|:/dev/null", "--tag=t," + os.fsdecode(b"\xff")], ["not valid UTF-8"]),
])
def test_arguments_that_are_not_utf8(small, args, words):
    _one_line_error(small.run(*args, expect=None), *words)


def test_delete_of_a_volume_named_twice(wyng, tmp_path):
    wyng.init("--chunk-factor=1")
    wyng.send("other", _image(tmp_path / "img", 1))
    wyng.send("vol", _image(tmp_path / "img2", 2))
    wyng.run("delete", "-u", "other", "other")
    assert "other" not in wyng.run("list").stdout
    wyng.run("verify", "vol")


def test_interrupted_agent_ends_without_a_traceback(tmp_path):
    agent = subprocess.Popen([str(AGENT)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    from wyngagent.wire import PROTOCOL_VERSION
    hello = struct.pack(">H", PROTOCOL_VERSION) + b"file:" + str(tmp_path).encode()
    agent.stdin.write(struct.pack(">BI", 1, len(hello)) + hello)
    agent.stdin.flush()
    assert agent.stdout.read(1) == b"\x80"  # OK: it serves, and waits for the next request
    agent.send_signal(signal.SIGINT)  # Ctrl-C reaches a local agent too
    _out, err = agent.communicate(timeout=30)
    assert agent.returncode == 130 and err == b"", err


# -- 8. bounds on what an agent can make dom0 do ----------------------------------

LIAR = REPO / "tests" / "lying_agent.py"


def _lie(wyng, lie, *args):
    env = dict(os.environ, QVM_WYNG_AGENT=str(LIAR), REAL_AGENT=str(AGENT), LIE=lie)
    return subprocess.run([sys.executable, "-m", "qubeswyng.cli"] + wyng.args(args), capture_output=True, text=True,
                          env=env, timeout=60)


def test_empty_data_frames_without_end_are_cut_off(small, tmp_path):
    # frames of a receive: 1 HELLO, 2 header, 3 OPEN, 4-5 root, 6-7 manifest
    for lie in ("empties:4", "empties:6"):
        started = time.monotonic()
        _one_line_error(_lie(small, lie, "receive", "vol", "--save-to=%s" % (tmp_path / "out")), "too many parts")
        assert time.monotonic() - started < 20


def test_absurd_agent_statistics_are_not_shown(wyng, tmp_path):
    wyng.init("--chunk-factor=1")
    wyng.send("vol", _image(tmp_path / "first", 1))
    # frames of a send: ... 7 GET_DAMAGED, 8 GET_STATS before the volume, 9 after it
    for lie in ("bigstats:8", "bigstats:9"):
        done = _lie(wyng, lie, "send", "--import-other-from=vol:|:%s" % _image(tmp_path / "img", 3), "--json")
        assert done.returncode == 0, done.stderr
        st = json.loads(done.stdout)["volumes"][0]
        assert 0 <= st["chunks_deduplicated"] <= st["chunks_sent"], st
        assert 0 <= st["bytes_stored"] <= st["chunks_sent"] * (CHUNK + 64), st


def test_absurd_scan_figures_are_not_shown(small):
    # frames of arch-deduplicate: 4-5 root, 6 the volume's figures, 7 the archive's
    for lie in ("bigscan:6", "bigscan:7"):
        done = _lie(small, lie, "arch-deduplicate", "--json")
        assert done.returncode == 0, done.stderr
        for figures in json.loads(done.stdout)["volumes"] + [json.loads(done.stdout)["archive"]]:
            assert figures["chunks"] <= 4 and figures["stored_bytes"] <= 4 * (CHUNK + 64), figures
            assert figures["listed_bytes"] <= 4 * CHUNK, figures


@pytest.mark.parametrize("lie,args,words", [
    ("errmute:6", ["verify", "vol"], "agent: the storage failed"),   # then silent at BYE
    ("errstall:6", ["verify", "vol"], "agent killed by SIGKILL"),  # half an error, then silent
    ("deafmute:8", ["send", "--import-other-from=new:|:IMAGE"], "agent killed by SIGKILL"),  # then EPIPE
])
def test_silent_agent_while_an_error_is_reported_is_not_waited_for(small, tmp_path, capsys, monkeypatch, lie, args,
                                                                   words):
    from qubeswyng import wire
    monkeypatch.setattr(wire, "ERR_WAIT", 1)
    args = [a.replace("IMAGE", str(_image(tmp_path / "img", 4, chunks=64))) for a in args]
    env = {"QVM_WYNG_AGENT": str(LIAR), "REAL_AGENT": str(AGENT), "LIE": lie}
    result = []
    worker = threading.Thread(target=lambda: result.append(small.main(*args, env=env)), daemon=True)
    worker.start()
    worker.join(30)
    assert result == [1]
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and words in err, err
