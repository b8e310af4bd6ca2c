"""Qubes on a real LVM thin pool (in the qemu guest): back up all qubes
through the backup qube, change some, back up again, remove some, restore
them; every volume compared byte for byte and every setting."""
import json

import pytest

pytestmark = pytest.mark.slow

MiB = 1 << 20

SCRIPT = r"""
pvcreate -qy $DISK_pool
vgcreate -q qubes_dom0 $DISK_pool
lvcreate -q --type thin-pool -L 900M -n vm-pool qubes_dom0
"$PYTHON" - > "$WYNG_OUT/story.json" <<'PY'
import io, json, os, random, sys
from contextlib import redirect_stderr, redirect_stdout
sys.path.insert(0, os.path.join(os.environ["REPO"], "tests"))
os.environ["QVM_WYNG_CONFIG"] = os.devnull
from images import digest
from qubes_double import LvmPool, QubesDouble, build_system, scribble
from qubeswyng import cli

app = QubesDouble("/tmp/dom0")
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

def state(vm):
    props = {p: str(getattr(vm, p)) for p in vm.property_list()
             if p not in ("label", "template", "backup_timestamp") and not vm.property_is_default(p)}
    return [vm.klass, str(vm.label), str(getattr(vm, "template", None)), props, dict(vm.features),
            sorted(vm.tags), [r.rule for r in vm.firewall.rules], vm.get_notes(),
            {n: [v.size, digest(v.path)] for n, v in vm.volumes.items() if v.save_on_stop}]

result = {}
try:
    qvm("arch-init")
    qvm("backup", "--all")
    scribble(app.domains["work"].volumes["private"], random.Random(7), count=1)
    scribble(app.domains["legacy"].volumes["root"], random.Random(8), count=1)
    app.domains["work"].memory = 1234
    qvm("backup", "--all")
    before = {vm.name: state(vm) for vm in app.domains if vm.klass != "AdminVM"}
    result["paths"] = sorted(str(v.path) for vm in app.domains for v in vm.volumes.values() if v.save_on_stop)
    gone = ["work", "vault", "legacy"]
    for name in gone:
        del app.domains[name]
    result["deleted"] = [n for n in gone if os.path.exists("/dev/qubes_dom0/vm-%s-private" % n)]
    qvm("restore", *gone)
    result["same"] = {n: state(app.domains[n]) == before[n] for n in gone}
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
    assert story["same"] == {"work": True, "vault": True, "legacy": True}
    # restored qubes are new qubes: their "Last backup" is empty until backed up
    assert story["timestamps"] == ["debian-12", "default-dvm", "disp-web", "fedora-40", "sys-firewall", "sys-net"]
