"""qvm-wyng browse: a session's filesystems in a new disposable qube, against
the qubesadmin double.  The double's disposable runs the real
qubes-rpc/wyng.Browse over pipes; here it mounts under the test's folder
(WYNG_BROWSE_ROOT) and, instead of a file manager, runs a hook that lists
the files it sees (WYNG_BROWSE_OPEN).  A hostile browse service is refused."""
import contextlib
import json
import os
import shutil
import sys
import threading
import time
import tracemalloc

import pytest

import ext4
from conftest import REPO, need, need_root, which
from qubes_double import MiB, QubesDouble
from test_qubes import Dom0

HOSTILE = REPO / "tests" / "hostile_browse.py"
HOOK = """#!{python}
import hashlib, json, os, sys, time
folder = sys.argv[1]
seen = {{}}
for root, dirs, files in os.walk(folder):
    dirs[:] = [d for d in dirs if d != "lost+found"]
    for name in files:
        path = os.path.join(root, name)
        with open(path, "rb") as f:
            seen[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
with open(os.environ["HOOK_OUT"], "w") as f:
    json.dump({{"folder": folder, "files": seen}}, f)
while os.path.exists(os.environ["HOOK_OUT"] + ".hold"):
    time.sleep(0.05)  # a user who keeps the file manager open
"""


@contextlib.contextmanager
def made_system(tmp_path, btrfs_session):
    """dom0 with a template, two disposable templates, the qube ``work``,
    the backup qube, and the archive; nothing may be left mounted after."""
    need_root()
    need(which("mkfs.ext4") and which("sfdisk") and which("partx"), "mkfs.ext4, sfdisk, partx (e2fsprogs, fdisk)")
    pool = btrfs_session / tmp_path.name
    app = QubesDouble(tmp_path / "dom0", pool_dir=pool)
    app.add_new_vm("TemplateVM", "fedora-40", "black")
    for name in ("default-dvm", "other-dvm"):
        app.add_new_vm("AppVM", name, "red", template="fedora-40").template_for_dispvms = True
    app.default_dispvm = "default-dvm"
    app.add_new_vm("AppVM", "work", "blue", template="fedora-40")
    app.add_new_vm("AppVM", "sys-backup", "yellow", template="fedora-40")
    hook = tmp_path / "hook"
    hook.write_text(HOOK.format(python=sys.executable))
    hook.chmod(0o755)
    app.hook_out = tmp_path / "hook.json"
    app.service_env.update(WYNG_BROWSE_ROOT=str(tmp_path / "disposable-run"), WYNG_BROWSE_OPEN=str(hook),
                           HOOK_OUT=str(app.hook_out))
    dom0 = Dom0(tmp_path, app)
    dom0.init()
    yield dom0
    leftover = ext4.leftovers(tmp_path) + ext4.leftovers(pool)
    for path in leftover:  # clean up for the next test, then fail
        os.system("umount -l %s 2>/dev/null; losetup -d %s 2>/dev/null" % (path, path))
    shutil.rmtree(pool, ignore_errors=True)
    assert not leftover, "left mounted or attached: %s" % leftover


@pytest.fixture
def system(tmp_path, btrfs_session):
    with made_system(tmp_path, btrfs_session) as dom0:
        yield dom0


def private(app, qube):
    return app.domains[qube].volumes["private"]


def browse(dom0, *args, expect=0):
    """qvm-wyng browse; returns (result, what the hook saw, the disposables made)."""
    app, made = dom0.app, []
    real = app.add_new_vm
    app.add_new_vm = lambda *a, **k: made.append(real(*a, **k)) or made[-1]
    try:
        app.hook_out.unlink(missing_ok=True)
        done = dom0.run("browse", *args, expect=expect)
    finally:
        app.add_new_vm = real
    seen = json.loads(app.hook_out.read_text()) if app.hook_out.exists() else None
    return done, seen, made


def test_each_session_opens_in_a_new_disposable_without_network_and_nothing_stays(system):
    app = system.app
    vol = private(app, "work")
    vol.resize(64 * MiB)
    ext4.mkfs(vol.path)
    with ext4.writable(vol.path) as fs:
        ext4.write(fs, {"notes.txt": b"first\n", "docs/report.bin": os.urandom(3 * MiB)})
        first = ext4.tree(fs)
    system.run("backup", "work")
    with ext4.writable(vol.path) as fs:
        ext4.write(fs, {"notes.txt": b"second\n" * 1000, "new.bin": os.urandom(MiB), "docs/report.bin": None})
        second = ext4.tree(fs)
    system.run("backup", "work")
    sessions = system.sessions("qubes/work/private")

    for session, expected in zip(sessions, (first, second)):
        done, seen, made = browse(system, "work", "--session=" + session)
        assert seen["files"] == expected
        assert seen["folder"].endswith("/qubes-work-private")
        vm = made[0]
        assert (vm.name, vm.klass, str(vm.template)) == ("disp-wyng-1", "DispVM", "default-dvm")
        assert (vm.netvm, vm.auto_cleanup) == (None, True)
        assert [(s, u) for s, u, _p in vm._procs] == [("wyng.Browse", "root")]
        assert "disp-wyng-1" not in app.domains, "killed, and removed by auto_cleanup"
        assert "mounted read-only: " in done.err and "(ext4)" in done.err
        assert "qubes/work/private: session %s browsed (" % session in done.out
    # its own default_dispvm wins over the system's; --dispvm over both
    app.domains["work"].default_dispvm = "other-dvm"
    assert str(browse(system, "work:private")[2][0].template) == "other-dvm"
    assert str(browse(system, "work", "--dispvm=default-dvm")[2][0].template) == "default-dvm"


def test_a_template_root_with_partitions(system):
    app = system.app
    root = app.domains["fedora-40"].volumes["root"]
    ext4.partitioned(root.path, 96 * MiB)
    with ext4.writable(root.path, partition=3) as fs:
        ext4.write(fs, {"etc/os-release": b"NAME=Fedora\n", "usr/bin/tool": os.urandom(200000)})
        expected = {"p3/" + k: v for k, v in ext4.tree(fs).items()}
    with ext4.writable(root.path, partition=2) as fs:
        ext4.write(fs, {"efi.txt": b"boot\n"})
        expected.update({"p2/" + k: v for k, v in ext4.tree(fs).items()})
    system.run("backup", "fedora-40")
    done, seen, _made = browse(system, "fedora-40:root")
    assert seen["files"] == expected
    assert "/p2 (ext4)" in done.err and "/p3 (ext4)" in done.err


def test_closing_the_disposable_ends_the_browse_cleanly(system):
    app = system.app
    vol = private(app, "work")
    vol.resize(32 * MiB)
    ext4.mkfs(vol.path)
    system.run("backup", "work")
    hold = app.hook_out.with_name(app.hook_out.name + ".hold")
    hold.touch()

    def close_it():
        while not app.hook_out.exists():
            time.sleep(0.05)
        app.domains["disp-wyng-1"].kill()  # the user closes the qube
    closer = threading.Thread(target=close_it)
    closer.start()
    done, seen, _made = browse(system, "work")
    closer.join()
    assert seen["files"] == {} and "browsed" in done.out
    assert "disp-wyng-1" not in app.domains


def test_choosing_a_disposable_template(system):
    app = system.app
    system.run("backup", "work")  # a zero volume: no filesystem in it
    done = system.run("browse", "work", expect=1)
    assert done.err.strip().splitlines()[-1] == \
        "qvm-wyng: error: browse service in disp-wyng-1: the volume holds no filesystem that Linux here can mount"
    assert "disp-wyng-1" not in app.domains
    assert system.run("browse", "work", "--dispvm=fedora-40", expect=1).err.startswith(
        "qvm-wyng: error: cannot create a disposable qube from fedora-40: ")
    app.default_dispvm = None
    del app.domains["work"]  # browsing a qube that is gone: the system's default, and there is none
    assert system.run("browse", "work", expect=1).err == \
        "qvm-wyng: error: no default disposable template: give --dispvm=TEMPLATE\n"
    assert system.run("browse", "nosuch", expect=1).err == \
        "qvm-wyng: error: volume 'qubes/nosuch/private' is not in the archive\n"
    del app.services["wyng.Browse"]  # a template without the VM package
    assert system.run("browse", "work", "--dispvm=default-dvm", expect=1).err.splitlines()[-1] == (
        "qvm-wyng: error: the browse service ended (browse service exit status 1): is qubes-wyng-vm installed "
        "in the template default-dvm is based on?")
    assert [vm.name for vm in app.domains if vm.klass == "DispVM"] == []


# -- a hostile browse service ---------------------------------------------------------

def backed_up(system, size):
    """``work``'s private volume, ``size`` bytes of random data, backed up."""
    vol = private(system.app, "work")
    vol.resize(size)
    with open(vol.path, "r+b") as f:
        f.write(os.urandom(size))
    system.run("backup", "work")
    return system


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, btrfs_session):
    """One system for all the hostile services: each only reads."""
    with made_system(tmp_path_factory.mktemp("hostile"), btrfs_session) as dom0:
        yield backed_up(dom0, 8 * MiB)


def run_hostile(dom0, mode):
    dom0.app.services["wyng.Browse"] = [sys.executable, str(HOSTILE), mode]
    return dom0.run("browse", "work", expect=None)


@pytest.mark.parametrize("mode,error", [
    ("beyond-end", "the browse service asked for 4096 bytes at offset 8388608: refused (the volume has 8388608 "
                   "bytes; at most 1048576 a read)"),
    ("overflow", "the browse service asked for 4096 bytes at offset 18446744073709551615: refused"),
    ("huge", "the browse service asked for 67108864 bytes at offset 0: refused"),
    ("empty", "the browse service asked for 0 bytes at offset 0: refused"),
    ("short", "the browse service sent a malformed read request"),
    ("giant-frame", "browse service in disp-wyng-1 sent 4294967295 bytes where at most 1000 are allowed"),
    ("unknown-op", "browse service in disp-wyng-1 sent an unexpected frame (op 9)"),
    ("garbage", "browse service in disp-wyng-1 sent "),
    ("chatter", "the browse service sent more than 64 messages"),
    ("truncated", "the browse service in disp-wyng-1 closed the connection"),
    ("exit", "the browse service ended (browse service exit status 3)"),
])
def test_a_hostile_browse_service_is_refused_cleanly(hostile, mode, error):
    done = run_hostile(hostile, mode)
    assert done.code == 1
    lines = done.err.strip().splitlines()
    assert lines[-1].startswith("qvm-wyng: error: " + error), done.err
    assert all(line.isprintable() for line in lines)
    assert "disp-wyng-1" not in hostile.app.domains


def test_its_messages_reach_the_terminal_without_escapes(hostile):
    done = run_hostile(hostile, "escapes")
    assert done.code == 0 and "\x1b" not in done.err and "disp-wyng-1: ?[2J?]0;owned?" in done.err


def test_a_flood_of_tiny_reads_is_slowed_down(hostile):
    """6,000 one-byte reads as fast as it can: all answered, at no more
    than RATE (5,000) a second."""
    start = time.monotonic()
    done = run_hostile(hostile, "flood")
    assert done.code == 0 and "answered 6000" in done.err
    assert time.monotonic() - start > 1.0


def test_dom0_memory_stays_bounded_whatever_it_is_asked(system):
    """Reads all over a volume larger than dom0's chunk cache, one MiB
    each, then a pile of requests whose answers it never reads (the pipe
    fills, dom0 waits): dom0 holds at most its cache (32 MiB) and one
    answer, however long it goes on (34.6 MiB measured, here).  Closing
    the qube ends the wait."""
    hostile = backed_up(system, 48 * MiB)
    app = hostile.app
    hoarded = app.hook_out.with_name(app.hook_out.name + ".hoarded")

    def close_it():
        while not hoarded.exists():
            time.sleep(0.05)
        time.sleep(0.5)
        app.domains["disp-wyng-1"].kill()
    closer = threading.Thread(target=close_it)
    closer.start()
    tracemalloc.start()
    try:
        done = run_hostile(hostile, "hoard")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        closer.join()
    assert done.code == 0, done.err
    assert peak < 38 * MiB, peak  # the cache, an answer, the two links' 1 MiB read buffers, small change
