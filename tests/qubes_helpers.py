"""What the Qubes tests share (tests/test_qubes*.py): qvm-wyng in dom0 run
in-process against the double, the state a backup promises to bring back,
and fixtures that give each test a small Qubes system on Btrfs, once as
Qubes R4.2 and once as R4.3."""
import io
import json
import random
import shutil
import subprocess
from contextlib import redirect_stderr, redirect_stdout

import pytest

from conftest import PASS
from images import digest
from qubes_double import QubesDouble, assignments, build_system, scribble
from qubeswyng import cli

RELEASES = ["4.2", "4.3"]


class Result:
    def __init__(self, code, out, err):
        self.code, self.out, self.err = code, out, err


class Dom0:
    """qvm-wyng in dom0, in-process, with the double as its qubesadmin; the
    archive lives in sys-backup's filesystem (a directory of the double)."""

    def __init__(self, tmp_path, app, *init_args, meta=None):
        self.app, self.meta, self.init_args = app, meta or tmp_path / "meta", init_args
        self.archive = app.domains["sys-backup"].fs / "home" / "user" / "qubes.wyng"
        self.dest = "qubes://sys-backup%s" % self.archive

    def argv(self, *args, defaults=True):
        if not defaults:  # the options come from a wyng.ini
            return list(args)
        argv = ["--meta-dir=%s" % self.meta, "--passcmd=echo '%s'" % PASS, "--authmin=1"]
        if not any(a.startswith("--dest") for a in args):
            argv.append("--dest=" + self.dest)
        return argv + list(args)

    def run(self, *args, expect=0, app=True, defaults=True):
        """qvm-wyng ARGS with --meta-dir, --passcmd and --dest (unless not
        ``defaults``), given the double as ``app`` (unless not ``app``: then
        qubesadmin.Qubes() is the double too, as a service would run it)."""
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = cli.main(self.argv(*args, defaults=defaults), **({"app": self.app} if app else {}))
        done = Result(code, out.getvalue(), err.getvalue())
        if expect is not None:
            assert code == expect, "exit %d\nstdout: %s\nstderr: %s" % (code, done.out, done.err)
        return done

    def init(self):
        self.app.domains["sys-backup"].fs.joinpath("home", "user").mkdir(parents=True, exist_ok=True)
        return self.run("arch-init", *self.init_args)

    def sessions(self, volume):
        out = self.run("list", volume, "--json").out
        return [s["session"] for s in json.loads(out)["volumes"][0]["sessions"]]


def state(vm):
    """Everything a backup promises to bring back, comparable."""
    props = {p: str(getattr(vm, p)) for p in vm.property_list()
             if p not in ("label", "template", "backup_timestamp") and not vm.property_is_default(p)}
    return {"class": vm.klass, "label": str(vm.label), "template": str(getattr(vm, "template", None)),
            "properties": props, "features": dict(vm.features),
            "tags": sorted(t for t in vm.tags if not t.startswith("restored-from-backup-")),
            "firewall": [r.rule for r in vm.firewall.rules], "devices": assignments(vm),
            "notes": vm.get_notes() if hasattr(vm, "get_notes") else None,
            "volumes": {n: (v.size, digest(v.path)) for n, v in vm.volumes.items() if v.save_on_stop}}


def states(app, names=None):
    return {vm.name: state(vm) for vm in app.domains if vm.klass != "AdminVM" and (names is None or vm.name in names)}


def timestamps(app):
    return {vm.name: vm.backup_timestamp for vm in app.domains if not vm.property_is_default("backup_timestamp")}


def change(vm, volume, seed, live=False):
    """Random data written into a volume: by the running qube (``live``),
    or as left by its last run."""
    vol = vm.volumes[volume]
    scribble(vol, random.Random(seed), count=1, path=vol.live if live else None)


def loop_device(mount):
    """/dev/loopN under a mounted filesystem."""
    return subprocess.run(["findmnt", "-n", "-o", "SOURCE", str(mount)], capture_output=True, text=True,
                          check=True).stdout.strip()


def sectors_read(device):
    """512-byte sectors read from a block device since boot (its stat file)."""
    with open("/sys/block/%s/stat" % device.rsplit("/", 1)[-1]) as f:
        return int(f.read().split()[2])


@pytest.fixture(params=RELEASES)
def release(request):
    return request.param


@pytest.fixture
def system(tmp_path, btrfs_session, release):
    """The double of ``release``, its default file-reflink pool on Btrfs as
    in a Qubes install, so backups take real reflink snapshots."""
    pool = btrfs_session / tmp_path.name
    yield build_system(QubesDouble(tmp_path / "dom0", pool_dir=pool, release=release))
    QubesDouble.uninstall()
    shutil.rmtree(pool, ignore_errors=True)


@pytest.fixture
def dom0(tmp_path, system):
    d = Dom0(tmp_path, system)
    d.init()
    return d
