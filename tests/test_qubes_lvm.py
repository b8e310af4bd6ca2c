"""Qubes (R4.2's client) on a real LVM thin pool, in the qemu guest: back
up all qubes through the backup qube, change some, back up again; a
running qube (writing to its -snap volume) is backed up as of its last
start, and after its shutdown (the -snap renamed over the volume) the next
backup reads only what changed, counted on the pool's data device; remove
some qubes, monitor frees their snapshots, restore them; every volume
compared byte for byte and every setting."""
import json

import pytest

pytestmark = pytest.mark.slow

MiB = 1 << 20

SCRIPT = r"""
pvcreate -qy $DISK_pool
vgcreate -q qubes_dom0 $DISK_pool
lvcreate -q --type thin-pool -L 900M -n vm-pool qubes_dom0
"$PYTHON" - > "$WYNG_OUT/story.json" <<'PY'
import io, json, os, random, subprocess, sys
from contextlib import redirect_stderr, redirect_stdout
sys.path.insert(0, os.path.join(os.environ["REPO"], "tests"))
os.environ["QVM_WYNG_CONFIG"] = os.devnull
from images import digest
from qubes_double import LvmPool, QubesDouble, assignments, build_system, scribble
from qubeswyng import cli

app = QubesDouble("/tmp/dom0", release="4.2")
app.add_pool(LvmPool(app, "vm-pool", "qubes_dom0", "vm-pool"))
app.default_pool = "vm-pool"
build_system(app, pool="vm-pool", unit=4 << 20)
archive = app.domains["sys-backup"].fs / "home/user/qubes.wyng"
archive.parent.mkdir(parents=True)
log = []

def qvm(*args):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli.main(["--meta-dir=/tmp/meta", "--passcmd=echo pass", "--authmin=5",
                         "--dest=qubes://sys-backup%s" % archive] + list(args), app=app)
    log.append([list(args), code, out.getvalue()[-2000:], err.getvalue()[-2000:]])
    assert code == 0, log[-1]
    return out.getvalue(), err.getvalue()

def data_reads():  # bytes read so far from the thin pool's data device
    dev = os.stat("/dev/mapper/qubes_dom0-vm--pool_tdata").st_rdev
    with open("/sys/dev/block/%d:%d/stat" % (os.major(dev), os.minor(dev))) as f:
        return int(f.read().split()[2]) * 512

def private(out):
    return [v for v in json.loads(out)["volumes"] if v["volume"] == "qubes/work/private"][0]

def state(vm):
    props = {p: str(getattr(vm, p)) for p in vm.property_list()
             if p not in ("label", "template", "backup_timestamp") and not vm.property_is_default(p)}
    return [vm.klass, str(vm.label), str(getattr(vm, "template", None)), props, dict(vm.features),
            sorted(t for t in vm.tags if not t.startswith("restored-from-backup-")),
            [r.rule for r in vm.firewall.rules], getattr(vm, "_notes"), assignments(vm),
            {n: [v.size, digest(v.path)] for n, v in vm.volumes.items() if v.save_on_stop}]

result = {}
try:
    qvm("arch-init")
    with open(app.domains["work"].volumes["private"].path, "r+b") as f:  # all of it mapped: a full read shows
        result["work_size"] = f.seek(0, 2)
        f.seek(0)
        f.write(os.urandom(result["work_size"]))
    start = data_reads()
    qvm("backup", "--all")
    result["full_read"] = data_reads() - start
    scribble(app.domains["work"].volumes["private"], random.Random(7), count=1)
    scribble(app.domains["legacy"].volumes["root"], random.Random(8), count=1)
    app.domains["work"].memory = 1234
    qvm("backup", "--all")
    work = app.domains["work"]
    vol = work.volumes["private"]
    committed = digest(vol.path)
    work.start()
    scribble(vol, random.Random(9), count=1, path=vol.live)  # the running qube writes to vm-work-private-snap
    out, err = qvm("backup", "work", "--json")
    result["running"] = ["as of its last start" in err, private(out)["chunks_changed"]]
    qvm("receive", "qubes/work/private", "--save-to=/tmp/out")
    result["as_of_start"] = digest("/tmp/out") == committed
    work.shutdown()
    result["revisions"] = len(app.pools["vm-pool"].revisions(vol.vid))
    start = data_reads()
    out, _err = qvm("backup", "work", "--json")
    result["after_shutdown"] = [private(out)["incremental"], private(out)["chunks_read"], data_reads() - start,
                                digest(vol.path) != committed]
    before = {vm.name: state(vm) for vm in app.domains if vm.klass != "AdminVM"}
    result["paths"] = sorted(str(v.path) for vm in app.domains for v in vm.volumes.values() if v.save_on_stop)
    gone = ["work", "vault", "legacy"]
    for name in gone:
        del app.domains[name]
    result["deleted"] = [n for n in gone if os.path.exists("/dev/qubes_dom0/vm-%s-private" % n)]
    out, _err = qvm("monitor", "--local=qubes_dom0/vm-pool", "--all")
    result["monitor"] = sorted(line for line in out.splitlines() if "gone" in line)
    lvs = subprocess.run(["lvs", "--noheadings", "-o", "lv_name", "qubes_dom0"], capture_output=True, text=True)
    result["left"] = sorted(lv for lv in lvs.stdout.split() if "qwyng" in lv and lv.split("-")[1] in gone)
    qvm("restore", *gone)
    result["same"] = {n: state(app.domains[n]) == before[n] for n in gone}
    result["differ"] = {n: [[a, b] for a, b in zip(state(app.domains[n]), before[n]) if a != b] for n in gone}
    result["timestamps"] = sorted(vm.name for vm in app.domains if not vm.property_is_default("backup_timestamp"))
finally:
    result["log"] = log
    print(json.dumps(result))
PY
"""


def test_qubes_on_lvm_thin_back_up_and_restore(lvm_guest):
    result = lvm_guest.run(SCRIPT, disks=[("pool", 1024 * MiB)], timeout=400)
    story = json.loads(result.read("story.json") or "{}")
    assert result.returncode == 0, "%s\n%s" % (result, json.dumps(story.get("log"), indent=1)[-4000:])
    assert "/dev/qubes_dom0/vm-work-private" in story["paths"]
    assert "/dev/qubes_dom0/vm-fedora-40-root" in story["paths"]
    assert story["deleted"] == []
    assert story["same"] == {"work": True, "vault": True, "legacy": True}, story["differ"]
    # restored qubes are new qubes: their "Last backup" is empty until backed up
    assert story["timestamps"] == ["debian-12", "default-dvm", "disp-web", "fedora-40", "sys-firewall", "sys-net",
                                   "sys-usb"]
    assert story["running"] == [True, 0] and story["as_of_start"] and story["revisions"] == 1
    incremental, chunks, read, changed = story["after_shutdown"]
    assert incremental and changed and 1 <= chunks <= 3 and read <= 2 * MiB, story["after_shutdown"]
    assert story["full_read"] >= story["work_size"] >= 4 * MiB  # the first backup read it all: the count sees it
    assert [line.split(": ")[0] for line in story["monitor"]] == [
        "vm-legacy-private", "vm-legacy-root", "vm-vault-private", "vm-work-private"]
    assert all("the volume is gone: removed its snapshots" in line for line in story["monitor"])
    assert story["left"] == []
    print("guest: %.1f s; pool data read by the first backup %d bytes, after the shutdown %d" % (
        result.seconds, story["full_read"], read))
