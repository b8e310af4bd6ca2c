"""Qubes' volumes as the pools really treat them, and the snapshots dom0
keeps of them: a running qube backed up as of its last start, a second
backup reading only what changed (counted by the loop device under the
Btrfs, not by qvm-wyng), snapshots that never outlive their volume or
meet another volume's, and dom0's own files in the same backup."""
import json
import os
from pathlib import Path

import pytest

from images import digest
from qubes_double import MiB
from qubes_helpers import Dom0, change, dom0, loop_device, release, sectors_read, system  # noqa: F401 (fixtures)
from qubeswyng.progress import size

pytestmark = pytest.mark.parametrize("release", ["4.3"])  # the pools, not the client


def pool_dir(system):
    return Path(system.pools["varlibqubes"].config["dir_path"])


def ours(folder):
    return sorted(p.name for p in folder.iterdir() if ".qwyng-" in p.name)


def held(folder):
    """What our snapshots in ``folder`` occupy, as qvm-wyng prints it."""
    return size(sum(os.lstat(folder / name).st_blocks * 512 for name in ours(folder)))


def stats(done, volume):
    return next(v for v in json.loads(done.out)["volumes"] if v["volume"] == volume)


def test_a_running_qube_is_backed_up_as_of_its_last_start_and_the_next_backup_reads_only_what_changed(
        dom0, system, btrfs_session, tmp_path):
    work = system.domains["work"]
    vol = work.volumes["private"]
    vol.resize(32 * MiB)
    with open(vol.path, "r+b") as f:
        f.write(os.urandom(32 * MiB))  # all of it data: a full read costs 32 MiB
    loop = loop_device(btrfs_session)
    work.start()
    change(work, "private", 1, live=True)  # the running qube writes to private-dirty.img
    committed = digest(vol.path)
    before = sectors_read(loop)
    first = dom0.run("backup", "work", "--json")
    full = (sectors_read(loop) - before) * 512
    assert "work is running: its volumes are backed up as of its last start" in first.err
    dom0.run("receive", "qubes/work/private", "--save-to=%s" % (tmp_path / "out"))
    assert digest(tmp_path / "out") == committed

    work.shutdown()  # private-dirty.img becomes private.img; the old one is kept as revision 1
    assert list(vol.revisions) == ["1"] and digest(vol.path) != committed
    before = sectors_read(loop)
    second = stats(dom0.run("backup", "work", "--json"), "qubes/work/private")
    read = (sectors_read(loop) - before) * 512
    assert full >= 32 * MiB
    assert second["incremental"] and 1 <= second["chunks_read"] <= 3
    assert read <= 2 * MiB, "read %d bytes from the pool's disk for a change of at most 300000" % read
    print("read from the pool's loop device: first backup %d bytes, second %d" % (full, read))
    dom0.run("receive", "qubes/work/private", "--save-to=%s" % (tmp_path / "out2"))
    assert digest(tmp_path / "out2") == digest(vol.path)


def test_delete_removes_the_volumes_snapshots_and_records(dom0, system):
    dom0.run("backup", "work", "vault")
    folder = pool_dir(system) / "appvms" / "work"
    assert len(ours(folder)) == 1
    states = list(dom0.meta.glob("*/snapshots/*.json"))
    assert len(states) == 2
    freed = held(folder)
    done = dom0.run("delete", "qubes/work/private", "-u")
    assert done.out.endswith("; local snapshots: %s freed\n" % freed) and freed != "0 B"
    assert ours(folder) == [] and len(ours(pool_dir(system) / "appvms" / "vault")) == 1
    assert [p for p in states if p.exists()] != states and len(list(dom0.meta.glob("*/snapshots/*"))) == 2


def test_a_volume_under_two_names_and_a_name_sent_again_keep_their_snapshots_apart(dom0, system, tmp_path):
    pool, work = pool_dir(system), system.domains["work"]
    send = ["send", "--local=%s" % pool, "appvms/work/private.img", "--json"]
    dom0.run("backup", "work")
    dom0.run(*send)  # the same file under a name of its own, in the same archive
    assert len(ours(pool / "appvms" / "work")) == 2
    change(work, "private", 3)
    for args, name in ((["backup", "work", "--json"], "qubes/work/private"), (send, "appvms/work/private.img")):
        st = stats(dom0.run(*args), name)
        assert st["incremental"] and 1 <= st["chunks_read"] <= 3, st
    # another dom0 deletes the volume: this dom0's record of it is stale, and the name comes back with a new id
    Dom0(tmp_path, system, meta=tmp_path / "other").run("delete", "qubes/work/private", "-u")
    dom0.run("backup", "work")
    assert "appvms/work/private.img: 0 chunks changed" in dom0.run("monitor", "--local=%s" % pool, "--all").out
    change(work, "private", 4)
    st = stats(dom0.run("backup", "work", "--json"), "qubes/work/private")
    assert st["incremental"] and 1 <= st["chunks_read"] <= 3, st
    done = dom0.run("delete", "--clean")
    assert done.out.startswith("removed 3 snapshots (") and ours(pool / "appvms" / "work") == []


def test_monitor_frees_the_snapshots_of_a_removed_qube(dom0, system):
    dom0.run("backup", "work", "vault")
    folder = pool_dir(system) / "appvms" / "work"
    del system.domains["work"]  # qvm-remove: the images go, the folder stays while our snapshot is in it
    assert len(ours(folder)) == 1 and len(list(folder.iterdir())) == 1
    freed = held(folder)
    out = dom0.run("monitor", "--local=%s" % pool_dir(system), "--all").out.splitlines()
    assert "appvms/vault/private.img: 0 chunks changed since the last send" in out
    assert "appvms/work/private.img: the volume is gone: removed its snapshots, %s freed" % freed in out
    assert ours(folder) == [] and not list(dom0.meta.glob("*/snapshots/*work*"))
    assert "appvms/work/private.img" not in dom0.run("monitor", "--local=%s" % pool_dir(system), "--all").out


def test_backup_stores_import_other_from_in_the_same_session(dom0, system, tmp_path):
    boot = tmp_path / "boot.img"
    boot.write_bytes(os.urandom(3 * MiB + 5))
    dom0.run("backup", "work", "--import-other-from=dom0/boot:|:%s" % boot)
    assert dom0.sessions("dom0/boot") == dom0.sessions("qubes/work/settings")
    dom0.run("receive", "dom0/boot", "--save-to=%s" % (tmp_path / "out"))
    assert digest(tmp_path / "out") == digest(boot)
    for spec, words in (("qubes/work/root:|:%s" % boot, "not under qubes/"), ("x:|:/nonexistent", "No such file"),
                        ("dom0 boot", "VOLUME:|:PATH")):
        done = dom0.run("backup", "work", "--import-other-from=" + spec, expect=1)
        assert words in done.err and "Traceback" not in done.err
    done = dom0.run("backup", "work", "--import-other-from=a:|:%s" % boot, "--import-other-from=a:|:%s" % boot,
                    expect=1)
    assert "each volume once" in done.err
    assert len(dom0.sessions("qubes/work/settings")) == 1
