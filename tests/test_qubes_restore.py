"""Restores that finish: what qubesd refuses is reported and skipped, each
qube ends restored, restored with omissions or failed; device assignments,
addresses and notes in each release's form; disaster recovery onto a
fresh Qubes, from R4.2 or R4.3 to either."""
import shutil

import pytest

from conftest import PASS
from images import digest
from qubes_double import QubesDouble, assignments, build_system
from qubes_helpers import Dom0, dom0, release, state, states, system  # noqa: F401 (fixtures)



def test_refused_settings_are_omitted_and_the_restore_finishes(dom0, system):
    work = system.domains["work"]
    work._props["kernelopts"] = "quiet " * 100  # as an older qubesd allowed it: R4.3's takes 512 characters
    dict.__setitem__(work.features, "motto", "über alles")  # qubesd takes printable ASCII only
    dom0.run("backup", "work", "legacy", "vault")
    saved = states(system, ["work", "legacy"])
    for name in ("work", "legacy"):
        del system.domains[name]
    del system.labels["purple"]  # legacy's
    system.changes.clear()
    done = dom0.run("restore", "work", "legacy", "vault", expect=None)
    assert done.code == 1 and "qube vault exists" in done.err and system.changes == []  # checks first
    done = dom0.run("restore", "work", "legacy", expect=2)
    lines = done.err.splitlines()
    assert [line for line in lines if line.startswith("legacy: created")][0].endswith(
        "; omitted: label purple (this Qubes has no such label; the qube's is red)")
    assert "; omitted: property kernelopts (Kernelopts value too long (512 chars max)); feature motto (" \
        in [line for line in lines if line.startswith("work: created")][0]
    assert lines[-1] == "restore: 0 of 2 qubes restored, 2 with omissions, 0 failed"
    for name in ("work", "legacy"):
        vm = system.domains[name]
        assert "backup-restore-in-progress" not in vm.tags  # usable: they only lack what is listed
        assert state(vm)["volumes"] == saved[name]["volumes"]
        vm.start()
        vm.shutdown()
    assert str(system.domains["legacy"].label) == "red" and system.domains["work"].property_is_default("kernelopts")


def test_a_qube_that_cannot_be_made_fails_alone(dom0, system):
    dom0.run("backup", "vault", "disp-web")
    del system.domains["vault"]
    del system.domains["disp-web"]
    system.domains["default-dvm"].template_for_dispvms = False  # qubesd refuses it as a disposable's template
    done = dom0.run("restore", "vault", "disp-web", expect=2)
    assert "disp-web: FAILED: cannot create disp-web: default-dvm cannot be the template of disp-web" in done.err
    assert "keeps the tag" not in done.err and "disp-web" not in system.domains  # nothing half-made is left
    assert done.out.startswith("vault: created from session")
    assert done.err.splitlines()[-1] == "restore: 1 of 2 qubes restored, 0 with omissions, 1 failed"


def test_addresses_are_restored_unless_another_qube_has_them(dom0, system):
    work = system.domains["work"]
    work.ip = "10.137.0.200"
    dom0.run("backup", "work", "sys-net")
    done = dom0.run("restore", "work", "--rename-to=work2", expect=2)
    assert "omitted: property ip (qube work has 10.137.0.200)" in done.err
    assert system.domains["work2"].property_is_default("ip")
    for name in ("work", "work2", "sys-net"):
        del system.domains[name]
    dom0.run("restore", "work", "sys-net")
    assert system.domains["work"].ip == "10.137.0.200"
    assert system.domains["sys-net"].mac == "00:16:3e:5e:6c:aa"  # qubes do not share links: a mac never conflicts


def test_menus_of_a_qube_whose_gui_qube_is_halted_are_left_to_qubesd(dom0, system):
    """qubesd's appmenus extension queues the updates for a halted GUI qube
    (its feature menu-update-pending-for) as the qube is made and set up."""
    system.add_new_vm("AppVM", "sys-gui", "black", template="fedora-40")
    system.domains["vault"].guivm = "sys-gui"
    dom0.run("backup", "vault", "work")
    del system.domains["vault"]
    done = dom0.run("restore", "vault")
    assert not [c for c in system.service_calls if "AppMenus" in c[1]] and "not refreshed" not in done.err
    system.services["qubes.UpdateAppMenusFor"] = ["sh", "-c", "echo no desktop >&2; exit 3"]
    done = dom0.run("restore", "work", "--rename-to=work2")  # dom0 is work's GUI qube
    assert "work2: its menu entries were not refreshed: no desktop" in done.err


# -- disaster recovery ----------------------------------------------------------------

@pytest.mark.parametrize("old,new", [("4.2", "4.2"), ("4.3", "4.3"), ("4.2", "4.3"), ("4.3", "4.2")])
def test_disaster_recovery_onto_a_fresh_qubes(tmp_path, btrfs_session, old, new):
    """The story of doc/qubes.md, "Disaster recovery": everything backed up
    with the schedule's command; dom0 lost; a fresh Qubes (dom0, its
    templates, a backup qube); qvm-wyng installed and pointed at the
    archive; restore --all; every qube is back with its data, settings,
    devices and firewall."""
    pools = btrfs_session / tmp_path.name
    try:
        lost = build_system(QubesDouble(tmp_path / "lost", pool_dir=pools / "lost", release=old))
        boot = tmp_path / "boot.img"
        boot.write_bytes(b"vmlinuz and initramfs " * 5000)
        Dom0(tmp_path, lost, meta=tmp_path / "lost-meta").init()
        Dom0(tmp_path, lost, meta=tmp_path / "lost-meta").run(
            "backup", "--all", "--import-other-from=dom0/boot:|:%s" % boot)
        before = states(lost)
        archive = lost.domains["sys-backup"].fs / "home" / "user" / "qubes.wyng"

        fresh = QubesDouble(tmp_path / "fresh", pool_dir=pools / "fresh", release=new)
        for name, label in (("fedora-40", "black"), ("debian-12", "gray")):
            fresh.add_new_vm("TemplateVM", name, label)
        backup = fresh.add_new_vm("AppVM", "sys-backup", "yellow", template="fedora-40")
        shutil.copytree(archive, backup.fs / "archive")  # the backup disk, attached to the new backup qube
        templates = states(fresh, ["fedora-40", "debian-12"])
        ini = tmp_path / "wyng.ini"
        ini.write_text("[var-global-default]\ndest = qubes://sys-backup%s\npasscmd = echo '%s'\n"
                       "meta-dir = %s\n" % (backup.fs / "archive", PASS, tmp_path / "fresh-meta"))
        d = Dom0(tmp_path, fresh, meta=tmp_path / "fresh-meta")
        done = d.run("--config=%s" % ini, "restore", "--all", defaults=False,
                     expect=2 if (old, new) == ("4.3", "4.2") else 0)
        assert "left out, as this system has them (--force restores over them): debian-12, fedora-40" in done.err
        after = states(fresh)
        assert after.pop("sys-backup")["class"] == "AppVM"
        assert {n: after.pop(n) for n in ("fedora-40", "debian-12")} == templates  # the new install's
        for name in ("fedora-40", "debian-12", "sys-backup"):
            before.pop(name)
        if (old, new) == ("4.3", "4.2"):  # R4.2 has no notes
            assert done.err.count("; omitted: notes (Qubes R4.2 has no qube notes)") == 2
        if new == "4.2":
            for vm in before.values():
                vm["notes"] = None
                vm["devices"] = [d[:3] + ("persistent",) + d[4:] for d in vm["devices"]]  # R4.2 has no modes
        elif old == "4.2":  # an R4.2 attachment comes back as R4.3's auto-attach, PCI as required
            for vm in before.values():
                vm["notes"] = ""
                vm["devices"] = [d[:3] + ("required" if d[0] == "pci" else "auto-attach",) + d[4:]
                                 for d in vm["devices"]]
        assert after == before
        assert ("pci", "dom0", "00_14.3", "required" if new == "4.3" else "persistent",
                (("no-strict-reset", "True"),)) in assignments(fresh.domains["sys-net"])
        out = tmp_path / "boot.out"
        d.run("--config=%s" % ini, "receive", "dom0/boot", "--save-to=%s" % out, defaults=False)
        assert digest(out) == digest(boot)
    finally:
        QubesDouble.uninstall()
        shutil.rmtree(pools, ignore_errors=True)


def test_the_double_refuses_what_each_release_refuses(system, release):
    """The refusals the restore above meets, as the real client and qubesd make them."""
    from qubes_double import DeviceAssignment43, QubesLabelNotFoundError, QubesValueError, QubesVMError
    work = system.domains["work"]
    with pytest.raises(QubesValueError, match="512"):
        work.kernelopts = "x" * 513
    with pytest.raises(QubesValueError, match="MAC"):
        work.mac = "00:16:3e:5e:6c"
    with pytest.raises(QubesLabelNotFoundError):
        system.add_new_vm("AppVM", "new", "pink", template="fedora-40")
    with pytest.raises(AssertionError, match="illegal characters"):  # ProtocolError: not a QubesException
        work.features["motto"] = "über"
    assert hasattr(work, "get_notes") == (release == "4.3")
    if release == "4.3":
        with pytest.raises(QubesValueError, match="PCI devices cannot be assigned as not required"):
            work.devices["pci"].assign(DeviceAssignment43.new(system.domains["dom0"], "00_1f.0", "pci",
                                                              mode="auto-attach"))
        with pytest.raises(QubesValueError, match="Only pci and block devices can be assigned as required"):
            work.devices["usb"].assign(DeviceAssignment43.new(system.domains["sys-usb"], "3-1", "usb",
                                                              mode="required"))
    else:
        assert not hasattr(work.devices["pci"], "assign") and not hasattr(work.devices["pci"], "get_assigned_devices")
    work.tags.add("backup-restore-in-progress")
    with pytest.raises(QubesVMError, match="Restore of this domain in progress"):
        work.start()
