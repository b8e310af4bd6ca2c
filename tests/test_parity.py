"""What a Wyng user expects to work as in Wyng: send --all and --volex,
several volumes that carry on past a failing one (exit 2), verify --all,
dry runs, and the exit status of an authentication failure (3)."""
import json
import os

import pytest

from images import KiB, MiB, make, overwrite, tree_digests

SYSFS_FILE = "/sys/kernel/uevent_seqnum"  # says 4096 bytes, reads a few: a source that fails mid-send


@pytest.fixture
def pool(wyng, tmp_path):
    """A --local folder (ext4: no reflinks, so send reads each volume in
    full) with volumes a, b, c, d, all sent once."""
    folder = tmp_path / "pool"
    folder.mkdir()
    wyng.init("--chunk-factor=1")
    for n, name in enumerate("abcd"):
        make(folder / name, 256 * KiB, [(0, 256 * KiB, "random")], seed=n)
    wyng.run("send", "--local=%s" % folder, *"abcd")
    return folder


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
    victim.write_bytes(victim.read_bytes()[:-1] + b"\x00")
    done = wyng.run("verify", "--all", "--volex=d", expect=2)
    assert [line.split(":")[0] for line in done.stdout.splitlines()] == ["a", "c"]
    assert "qvm-wyng: error: b: " in done.stderr and "1 volumes failed: b" in done.stderr
    wyng.run("verify", "a", "c", "d")


def test_send_dry_run_says_what_it_would_send_and_changes_nothing(wyng, pool):
    overwrite(pool / "a", 100 * KiB, b"x" * 70 * KiB)  # chunks 1 and 2 of four
    make(pool / "e", MiB, [(0, 64 * KiB, "random")], seed=9)  # new: one data chunk, 15 zero chunks
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
