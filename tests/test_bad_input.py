"""Every bad input: one clear line on stderr, a non-zero exit, nothing lost."""
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import AUTH_DIR
from images import KiB, MiB, make, same, tree_digests


def _one_line_error(done, *words):
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qvm-wyng: error: "), done.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture
def archived(wyng, tmp_path):
    image = make(tmp_path / "img", 2 * MiB, [(0, 2 * MiB, "random")])
    wyng.init()
    wyng.send("vol", image)
    return image


def test_missing_source(wyng, archived, tmp_path):
    before = tree_digests(wyng.archive)
    _one_line_error(wyng.send("vol", tmp_path / "nope", expect=None), "No such file")
    assert tree_digests(wyng.archive) == before


def test_source_that_cannot_be_seeked(wyng, archived, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    _one_line_error(wyng.send("vol", fifo, expect=None), "cannot be seeked")
    _one_line_error(wyng.send("vol", tmp_path, expect=None), "cannot be seeked")


def test_missing_archive(wyng, tmp_path):
    done = wyng.run("list", "--dest=file:%s" % (tmp_path / "nothing-here"), expect=None)
    _one_line_error(done, "no archive at")


def test_folder_that_is_not_an_archive(wyng, tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "header").write_bytes(os.urandom(178))
    _one_line_error(wyng.run("list", "--dest=file:%s" % (tmp_path / "other"), expect=None),
                    "not a qubes-wyng archive")


@pytest.mark.parametrize("damage", [b"", b"garbage", b'{"seq": 1}', b'{"seq": 1, "mac": "zz"}', b"[1]"])
def test_damaged_root_seen_is_refused_not_taken_for_none(wyng, archived, damage):
    seen = next(wyng.meta.glob("*/root-seen"))
    seen.write_bytes(damage)
    _one_line_error(wyng.run("list", expect=None), "root-seen is damaged")


def test_arch_init_over_an_existing_archive(wyng, archived):
    before = tree_digests(wyng.archive)
    _one_line_error(wyng.init(expect=None), "exists and is not empty")
    assert tree_digests(wyng.archive) == before


@pytest.mark.parametrize("args,words", [
    (["send", "--import-other-from=novolume"], ["VOLUME:|:PATH"]),
    (["send", "--import-other-from=../x:|:/etc/hostname"], ["not a valid volume name"]),
    (["receive", "vol"], ["--save-to"]),
    (["receive", "vol", "other", "--save-to=/tmp/x"], ["name one volume"]),
    (["receive", "nosuch", "--save-to=/tmp/x"], ["not in the archive"]),
    (["verify", "vol", "--session=2020"], ["not YYYYMMDD-HHMMSS"]),
    (["verify", "vol", "--session=20200101-000000"], ["no session 20200101-000000"]),
    (["verify", "vol", "--session=^nosuchtag"], ["no session tagged"]),
    (["list", "--authmin=99"], ["--authmin"]),
    (["frobnicate"], ["invalid choice"]),
    (["list", "--dest=ftp://x/y"], ["unknown destination type"]),
    (["list", "--dest=ssh://user@host"], ["ssh://[user@]host[:port]/path"]),
    (["list", "--dest=file:relative"], ["file:/absolute/path"]),
    (["arch-init", "--dest=file:/tmp/qwyng-never", "--compression=lzma"], ["unknown type"]),
    (["arch-init", "--dest=file:/tmp/qwyng-never", "--compression=zstd:99"], ["level"]),
    (["arch-init", "--dest=file:/tmp/qwyng-never", "--chunk-factor=9"], ["--chunk-factor"]),
    (["arch-init", "--dest=file:/tmp/qwyng-never", "--encrypt=rot13"], ["--encrypt"]),
])
def test_bad_arguments(wyng, archived, args, words):
    _one_line_error(wyng.run(*args, expect=None), *words)
    assert not os.path.exists("/tmp/qwyng-never")


def test_failing_passcmd(wyng, archived):
    done = wyng.run("--authmin=0", "list", "--passcmd=exit 3", expect=None)
    _one_line_error(done, "--passcmd exited with status 3")


def test_the_cached_key_serves_authmin_minutes_after_its_last_use_then_is_removed(wyng, archived):
    at = int(time.time())
    other = Path(AUTH_DIR) / os.urandom(16).hex()   # an archive not opened again
    other.write_bytes(struct.pack(">d32s", at - 1, os.urandom(32)))
    wyng.run("--authmin=1", "list", env={"QVM_WYNG_TEST_NOW": str(at)})
    assert not other.exists()
    cache = Path(AUTH_DIR) / next(wyng.meta.glob("*/root-seen")).parent.name
    assert cache.exists() and cache.stat().st_mode & 0o777 == 0o600
    wyng.run("list", "--passcmd=exit 3", env={"QVM_WYNG_TEST_NOW": str(at + 50)})  # and now until at + 110
    done = wyng.run("list", "--passcmd=exit 3", expect=None, env={"QVM_WYNG_TEST_NOW": str(at + 111)})
    _one_line_error(done, "--passcmd exited with status 3")
    assert not cache.exists()


def test_passphrase_from_stdin(wyng, archived):
    args = [a for a in wyng.args(["--authmin=0", "list"]) if not a.startswith("--passcmd")]
    done = subprocess.run([sys.executable, "-m", "qubeswyng.cli"] + args, input=wyng.passphrase + "\n",
                          capture_output=True, text=True)
    assert done.returncode == 0 and "vol" in done.stdout


def test_options_before_and_after_the_command(wyng, archived, tmp_path):
    done = subprocess.run([sys.executable, "-m", "qubeswyng.cli", "--dest=%s" % wyng.dest, "-u",
                           "--meta-dir=%s" % wyng.meta, "receive", "vol", "--save-to=%s" % (tmp_path / "o"),
                           "--passcmd=echo '%s'" % wyng.passphrase, "--authmin=0"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert same(archived, tmp_path / "o")


def test_full_destination_during_send(wyng, tmpfs, tmp_path):
    wyng.archive = tmpfs("24M") / "archive"
    wyng.dest = "file:%s" % wyng.archive
    small = make(tmp_path / "small", 4 * MiB, [(0, 4 * MiB, "random")], seed=1)
    big = make(tmp_path / "big", 40 * MiB, [(0, 40 * MiB, "random")], seed=2)
    wyng.init("--compression=off")
    wyng.send("small", small)
    before = wyng.sessions("small")
    _one_line_error(wyng.send("big", big, expect=None), "No space left on device")
    assert wyng.sessions("small") == before
    wyng.receive("small", tmp_path / "out")
    assert same(small, tmp_path / "out")
    assert subprocess.run([sys.executable, "-m", "qubeswyng.cli"] + wyng.args(["list", "big"]),
                          capture_output=True).returncode != 0
    # a smaller volume still fits: the archive keeps working
    wyng.send("tiny", make(tmp_path / "tiny", 64 * KiB, [(0, 64 * KiB, "random")], seed=3))


def test_full_target_during_receive(wyng, archived, tmpfs):
    target = tmpfs("1M") / "restored"
    _one_line_error(wyng.receive("vol", target, expect=None), "No space left on device")
    assert not target.exists() and not list(target.parent.iterdir())


def _agent_of(proc):
    """The agent process qvm-wyng started (its child)."""
    for _ in range(200):
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        if children:
            return int(children[0])
        time.sleep(0.05)
    raise AssertionError("no agent started")


def test_agent_killed_in_the_middle_of_a_send(wyng, tmp_path):
    image = make(tmp_path / "img", 8 * MiB, [(0, 8 * MiB, "random")], seed=5)
    wyng.init()
    wyng.send("vol", image)
    first = (tmp_path / "first")
    wyng.receive("vol", first)
    big = make(tmp_path / "big", 64 * MiB, [(0, 64 * MiB, "random")], seed=6)
    # the agent stops after storing every chunk, just before the new root
    proc = subprocess.Popen([sys.executable, "-m", "qubeswyng.cli"] + wyng.args(
        ["send", "--import-other-from=vol:|:%s" % big]), stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, QVM_WYNG_TEST_PAUSE="agent:before-root"))
    agent = _agent_of(proc)
    chunks = wyng.archive / "chunks"
    while sum(1 for p in chunks.rglob("*") if p.is_file()) < 8 * 4 + 64 * 4:
        assert proc.poll() is None
        time.sleep(0.02)
    os.kill(agent, signal.SIGKILL)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 1 and "agent killed by SIGKILL" in err, err
    assert len(wyng.sessions("vol")) == 1
    wyng.run("verify", "vol")
    wyng.receive("vol", tmp_path / "again")
    assert same(first, tmp_path / "again")
    # the next send succeeds at once (the dead agent's lock is stale) and
    # reuses every chunk the killed one stored
    done = wyng.send("vol", big, "--json")
    assert json.loads(done.stdout)["volumes"][0]["chunks_deduplicated"] == 64 * 4
    wyng.receive("vol", tmp_path / "big-out")
    assert same(big, tmp_path / "big-out")


def test_auth_cache_remembers_and_forgets(wyng, archived):
    wyng.run("--authmin=5", "list")
    wyng.passphrase = "wrong, but not asked"
    wyng.run("--authmin=5", "list")  # the cached key answers
    wyng.run("--authmin=-1", "list", expect=3)  # forgets, then asks: wrong
    _one_line_error(wyng.run("--authmin=5", "list", expect=None), "wrong passphrase")


def test_version(wyng):
    done = wyng.run("version", expect=0)
    assert done.stdout.startswith("qvm-wyng ")
