"""What a Wyng user expects to work as in Wyng: send --all and --volex,
several volumes that carry on past a failing one (exit 2), verify --all,
dry runs, the exit status of an authentication failure (3), the archive's
details in list, and arch-passphrase (also killed at any point)."""
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from conftest import AUTH_DIR, PASS, Wyng
from images import KiB, MiB, make, overwrite, tree_digests
from qubeswyng.errors import Fail
from qubeswyng.formats import Header
from qubeswyng.progress import size

SYSFS_FILE = "/sys/kernel/uevent_seqnum"  # says 4096 bytes, reads a few: a source that fails mid-send


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A --local folder (ext4: no reflinks, so send reads each volume in
    full) with volumes a, b, c, d, all sent once to an archive."""
    tmp = tmp_path_factory.mktemp("parity")
    wyng, folder = Wyng(tmp), tmp / "pool"
    folder.mkdir()
    wyng.init("--chunk-factor=1")
    for n, name in enumerate("abcd"):
        make(folder / name, 256 * KiB, [(0, 256 * KiB, "random")], seed=n)
    wyng.run("send", "--local=%s" % folder, *"abcd")
    return wyng, folder


@pytest.fixture
def wyng(built, tmp_path):
    return built[0].copy(tmp_path)


@pytest.fixture
def pool(built, tmp_path):
    shutil.copytree(built[1], tmp_path / "pool")
    return tmp_path / "pool"


def _sessions(wyng):
    listing = json.loads(wyng.run("list", "--json").stdout)
    return {v["name"]: len(v["sessions"]) for v in listing["volumes"]}


def test_send_all_sends_the_archive_volumes_found_in_local_less_volex(wyng, pool):
    (pool / "d").unlink()  # in the archive, not in the pool: left alone
    for name in "abc":
        overwrite(pool / name, 0, b"changed " + name.encode())
    done = wyng.run("send", "--all", "--local=%s" % pool, "--volex=c")
    assert sorted(line.split(":")[0] for line in done.stdout.splitlines()) == ["a", "b"]
    assert _sessions(wyng) == {"a": 2, "b": 2, "c": 1, "d": 1}
    assert "no volume" in wyng.run("send", "--all", "--local=%s" % (pool / "x"), expect=1).stderr


def test_several_volumes_carry_on_past_a_failing_one_and_exit_2(wyng, pool, tmp_path):
    """One volume fails while it is read, one cannot be opened: the others
    are committed, the failed new volume is not in the archive."""
    for name in "ab":
        overwrite(pool / name, 0, b"changed " + name.encode())
    done = wyng.run("send", "--local=%s" % pool, "a", "missing", "b",
                    "--import-other-from=broken:|:%s" % SYSFS_FILE, expect=2)
    errors = [line for line in done.stderr.splitlines() if line.startswith("qvm-wyng")]
    assert errors[0].startswith("qvm-wyng: error: missing: ") and "No such file" in errors[0]
    assert errors[1].startswith("qvm-wyng: error: broken: ") and "short read" in errors[1]
    assert errors[2] == "qvm-wyng: 2 volumes failed: missing broken"
    assert _sessions(wyng) == {"a": 2, "b": 2, "c": 1, "d": 1}
    wyng.run("verify", "--all")
    # one volume alone fails as any command does: exit 1, one line
    done = wyng.run("send", "--import-other-from=broken:|:%s" % SYSFS_FILE, expect=1)
    assert done.stderr.count("\n") == 1 and "short read" in done.stderr


def test_verify_all_carries_on_past_a_damaged_volume(wyng, pool):
    keys = wyng.keys()
    victim = next(p for p in (wyng.archive / "chunks").rglob("*")
                  if p.name == keys.chunk_id((pool / "b").read_bytes()[:64 * KiB]).hex())
    sealed = victim.read_bytes()
    victim.write_bytes(sealed[:-1] + bytes([sealed[-1] ^ 1]))  # its last byte changed (setting it could leave it)
    done = wyng.run("verify", "--all", "--volex=d", expect=2)
    assert [line.split(":")[0] for line in done.stdout.splitlines()] == ["a", "c"]
    assert "qvm-wyng: error: b: " in done.stderr and "1 volumes failed: b" in done.stderr
    wyng.run("verify", "a", "c", "d")


def test_send_dry_run_says_what_it_would_send_and_changes_nothing(wyng, pool):
    overwrite(pool / "a", 100 * KiB, b"x" * 70 * KiB)  # chunks 1 and 2 of four
    make(pool / "e", MiB, [(0, 64 * KiB, "random")], seed=9)  # new: one data chunk, 15 zero chunks
    wyng.run("list")  # the copy's --dest is bound to its archive by any first read
    before = tree_digests(wyng.archive), tree_digests(wyng.meta)
    done = wyng.run("send", "--local=%s" % pool, "a", "e", "--dry-run")
    assert done.stdout.splitlines() == ["a: dry run, 2 of 4 chunks changed, 128.0 KiB to send",
                                        "e: dry run, 16 of 16 chunks changed, 64.0 KiB to send"]
    assert (tree_digests(wyng.archive), tree_digests(wyng.meta)) == before
    done = wyng.run("send", "--local=%s" % pool, "a", "e")
    assert [line.split(", ", 1)[1] for line in done.stdout.splitlines()] == [
        "2 of 4 chunks changed, 128.0 KiB sent", "16 of 16 chunks changed, 64.0 KiB sent"]


def test_wrong_passphrase_exits_3(wyng, pool):
    wyng.passphrase = "not it"
    done = wyng.run("--authmin=0", "verify", "a", expect=3)
    assert "wrong passphrase" in done.stderr


def test_list_shows_the_archive_details(wyng, pool):
    listing = json.loads(wyng.run("list", "--json").stdout)
    assert (listing["format"], listing["chunk_size"], listing["compression"], listing["encryption"]) == (
        1, 64 * KiB, "zstd:3", "xchacha20-poly1305")
    assert abs(listing["created"] - time.time()) < 600 and listing["stored_bytes"] is None
    stored = sum(p.stat().st_size for p in (wyng.archive / "chunks").rglob("*") if p.is_file())
    assert json.loads(wyng.run("list", "--json", "-v").stdout)["stored_bytes"] == stored
    line = wyng.run("list", "-v").stdout.splitlines()[1]
    assert line.startswith("format 1, chunks of 64.0 KiB, zstd:3 compression, xchacha20-poly1305 encryption, "
                           "created %s" % time.strftime("%Y-%m-%d"))
    assert line.endswith(", %s stored" % size(stored))


def _unlocks(wyng, passphrase):
    header = Header.parse((wyng.archive / "header").read_bytes())
    try:
        header.unlock(passphrase.encode())
    except Fail:
        return False
    return True


def test_arch_passphrase_rewraps_the_key_and_touches_no_data(wyng, pool):
    wyng.run("--authmin=5", "list")  # a cached key, which must go
    cache = Path(AUTH_DIR) / next(wyng.meta.glob("*/root-seen")).parent.name
    assert cache.exists()
    before = tree_digests(wyng.archive)
    wyng.passphrase = "wrong"
    assert "wrong passphrase" in wyng.run("arch-passphrase", input="new one\n", expect=3).stderr
    assert tree_digests(wyng.archive) == before
    wyng.passphrase = PASS
    done = wyng.run("arch-passphrase", input="the new passphrase\n")
    assert done.stdout.startswith("the passphrase of archive ") and not cache.exists()
    after = tree_digests(wyng.archive)
    assert {k for k in before if before[k] != after.get(k)} == {"header"} and set(after) == set(before)
    assert not _unlocks(wyng, PASS) and _unlocks(wyng, "the new passphrase")
    assert wyng.run("--authmin=0", "list", expect=3)
    wyng.passphrase = "the new passphrase"
    wyng.run("--authmin=0", "verify", "--all")


def test_arch_passphrase_killed_at_any_point_leaves_one_passphrase_working(wyng, pool):
    """dom0 or the agent SIGKILLed before or after the header is replaced:
    the old passphrase works or the new one does, never both or neither."""
    points = [("dom0:before-header", False), ("agent:before-header", False), ("agent:before-rename-header", False),
              ("agent:after-header", True), ("dom0:after-header", True)]
    for n, (label, lands) in enumerate(points):
        new = "new passphrase %d" % n
        done = wyng.run("arch-passphrase", input=new + "\n", expect=None, env={"QVM_WYNG_TEST_CRASH": label})
        assert done.returncode != 0, label
        works = [p for p in (wyng.passphrase, new) if _unlocks(wyng, p)]
        assert works == [new if lands else wyng.passphrase], label
        wyng.passphrase = works[0]
    wyng.run("--authmin=0", "verify", "--all")
