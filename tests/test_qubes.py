"""Qubes by name: backup and restore through a backup qube, settings included,
against the qubesadmin double (tests/qubes_double.py); the agent is the real
qubes-rpc/wyng.Agent, run by the double's run_service in sys-backup."""
import json
import shutil

import pytest

from conftest import AGENT, REPO
from images import digest
from qubes_double import MiB, FilePool, LvmPool, QubesDouble, QubesVMError, Rule, scribble
from qubes_helpers import Dom0, change, dom0, release, state, states, system, timestamps  # noqa: F401 (fixtures)
from qubeswyng import cli, settings

LIAR = REPO / "tests" / "lying_agent.py"
ALL_BACKED_UP = ["debian-12", "default-dvm", "disp-web", "fedora-40", "legacy", "sys-firewall", "sys-net",
                 "sys-usb", "vault", "work"]
ONE_RELEASE = pytest.mark.parametrize("release", ["4.3"])  # what does not depend on the release


def _random_change(vm, volume, seed):
    change(vm, volume, seed)


# -- the whole story -----------------------------------------------------------------

def test_back_up_all_change_back_up_delete_restore_everything_comes_back(dom0, system):
    assert system.service_calls == [("sys-backup", "wyng.Agent")]  # arch-init, through run_service
    assert system.domains["sys-backup"].is_running()                 # autostart
    system.domains["sys-firewall"].start()
    first = dom0.run("backup", "--all")
    assert "sys-firewall is running: its volumes are backed up as of its last start" in first.err
    assert sorted(timestamps(system)) == ALL_BACKED_UP  # not dom0, not sys-backup (include_in_backups off)
    before = states(system)

    work, vault, legacy = (system.domains[n] for n in ("work", "vault", "legacy"))
    _random_change(work, "private", 11)
    _random_change(legacy, "root", 12)
    work.memory = 1200
    work.features["service.cups"] = "1"
    work.tags.add("second")
    work.firewall.save_rules([Rule("action=accept dsthost=10.0.0.0/8"), Rule("action=drop")])
    if hasattr(vault, "set_notes"):  # R4.3
        vault.set_notes("offline, really")
    vault.label = "purple"
    work.volumes["private"].resize(2 * MiB)
    second = dom0.run("backup", "--all", "--tag=weekly")
    after = states(system)
    assert after["work"] != before["work"]

    # every volume of a backed-up qube has a session per backup, changed or not
    for volume in ("qubes/fedora-40/root", "qubes/work/private", "qubes/work/settings", "qubes/disp-web/settings"):
        assert len(dom0.sessions(volume)) == 2
    assert "qubes/disp-web/private" not in dom0.run("list").out  # a disposable's private is not saved
    assert "0 of" in second.out  # unchanged volumes cost an empty manifest

    gone = ["debian-12", "default-dvm", "disp-web", "legacy", "sys-usb", "vault", "work"]
    for name in ("disp-web", "sys-usb", "default-dvm", "vault", "work", "legacy", "debian-12"):
        del system.domains[name]
    system.changes.clear()
    done = dom0.run("restore", *gone)
    assert [line.split(":")[0] for line in done.out.splitlines()] == [
        "debian-12", "legacy", "work", "default-dvm", "vault", "disp-web", "sys-usb",  # templates first
        "restore"]
    assert done.out.splitlines()[-1] == "restore: 7 of 7 qubes restored, 0 with omissions, 0 failed"
    assert states(system, gone) == {n: after[n] for n in gone}
    assert not [vm.name for vm in system.domains if "backup-restore-in-progress" in vm.tags]
    assert {vm.name for vm in system.domains if any(t.startswith("restored-from-backup-at-20") for t in vm.tags)} \
        == set(gone)
    # the menus, once every setting is in, as qubesd's appmenus extension does (dom0 is their GUI qube)
    assert sorted(c for c in system.service_calls if "AppMenus" in c[1]) == sorted(
        ("dom0", "qubes.UpdateAppMenusFor+" + n) for n in gone)
    assert "legacy: its applications appear in the menus after: qvm-sync-appmenus legacy" in done.err
    # nothing that must not be copied was: the restored qubes have their own identity
    assert all(vm.property_is_default(p) for vm in system.domains if vm.klass != "AdminVM"
               for p in ("qid", "uuid", "ip"))

    # an older backup, beside the qube it came from
    dom0.run("restore", "work", "--session=%s" % dom0.sessions("qubes/work/settings")[0], "--rename-to=work-old")
    old = state(system.domains["work-old"])
    assert old == before["work"]
    assert state(system.domains["work"]) == after["work"]

    listed = dom0.run("list", "--qubes").out
    assert listed.splitlines()[-1].startswith("work ") and "2 backups" in listed and "private" in listed
    rows = json.loads(dom0.run("list", "--qubes", "--json").out)["qubes"]
    assert [r["qube"] for r in rows] == ALL_BACKED_UP
    assert dom0.run("verify", "work", "qubes/vault/private").out.count("verified") == 3


def test_backup_of_named_qubes_with_exclude_and_the_list(dom0, system):
    dom0.run("backup", "work", "vault", "legacy", "--exclude=legacy")
    assert sorted(timestamps(system)) == ["vault", "work"]
    names = [v["name"] for v in json.loads(dom0.run("list", "--json").out)["volumes"]]
    assert names == ["qubes/vault/private", "qubes/vault/settings", "qubes/work/private", "qubes/work/settings"]
    dom0.run("backup", "--all", "--exclude=work", "--exclude=fedora-40")
    assert len(dom0.sessions("qubes/work/settings")) == 1
    for args, words in ((["backup"], "name the qubes or give --all"), (["backup", "work", "--all"], "not both"),
                        (["backup", "nosuchqube"], "no qube named nosuchqube"), (["backup", "dom0"], "dom0"),
                        (["backup", "--all", "--exclude=nosuch"], "no qube named nosuch")):
        assert words in dom0.run(*args, expect=1).err


def test_restore_over_an_existing_qube_needs_force_and_a_halted_qube(dom0, system):
    dom0.run("backup", "work")
    saved = state(system.domains["work"])
    work = system.domains["work"]
    _random_change(work, "private", 3)
    work.memory = 2000
    changed = state(work)
    system.changes.clear()
    assert "qube work exists: --force restores over it" in dom0.run("restore", "work", expect=1).err
    work.start()
    assert "qube work is running" in dom0.run("restore", "work", "--force", expect=1).err
    assert system.changes == [] and state(work) == changed
    work.shutdown()
    dom0.run("restore", "work", "--force", "--data-only")
    assert state(work)["volumes"] == saved["volumes"] and state(work)["properties"]["memory"] == "2000"
    dom0.run("restore", "work", "--force", "--settings-only")
    assert state(work) == saved
    assert "exclude each other" in dom0.run("restore", "work", "--settings-only", "--data-only", expect=1).err


def test_restore_from_an_archive_the_storage_swapped_for_another_is_refused(dom0, system, tmp_path):
    work = system.domains["work"]
    work.firewall.save_rules([Rule("action=drop")])
    dom0.run("backup", "work")  # the older archive: everything dropped
    other = Dom0(tmp_path, system)
    other.archive = dom0.archive.parent / "other.wyng"
    other.dest = "qubes://sys-backup%s" % other.archive
    other.init()
    work.firewall.save_rules([Rule("action=accept dsthost=10.0.0.0/8"), Rule("action=drop")])
    other.run("backup", "work")
    saved = state(work)
    shutil.rmtree(other.archive)
    shutil.copytree(dom0.archive, other.archive)  # same passphrase, other archive
    system.changes.clear()
    assert "another archive than the one seen there before" in other.run("restore", "work", "--force",
                                                                          expect=1).err
    assert system.changes == [] and state(work) == saved


def test_settings_only_creates_the_qube_without_its_data(dom0, system):
    dom0.run("backup", "vault")
    saved = state(system.domains["vault"])
    del system.domains["vault"]
    assert "--data-only: there is no qube vault" in dom0.run("restore", "vault", "--data-only", expect=1).err
    dom0.run("restore", "vault", "--settings-only")
    restored = state(system.domains["vault"])
    assert restored["volumes"]["private"] != saved["volumes"]["private"]
    assert {k: v for k, v in restored.items() if k != "volumes"} == {k: v for k, v in saved.items() if k != "volumes"}


@ONE_RELEASE
def test_missing_template_is_an_error_naming_it_before_anything_is_created(dom0, system):
    dom0.run("backup", "vault", "default-dvm", "disp-web")
    for name in ("disp-web", "sys-usb", "default-dvm", "vault", "debian-12"):
        del system.domains[name]
    system.changes.clear()
    done = dom0.run("restore", "vault", "default-dvm", expect=1)
    assert done.err.strip() == ("qvm-wyng: error: qube vault needs its template debian-12, which is neither "
                                "on this system nor restored (restore it too, or first)")
    assert system.changes == [] and "vault" not in system.domains
    # a disposable's template (an app qube) restored with it is fine; its template must exist
    done = dom0.run("restore", "disp-web", expect=1)
    assert "needs its template default-dvm" in done.err


@ONE_RELEASE
def test_restore_choices_and_their_errors(dom0, system):
    dom0.run("backup", "work", "vault")
    for args, words in ((["restore"], "name the qubes or give --all"),
                        (["restore", "legacy"], "no backup of qube legacy"),
                        (["restore", "--all", "--rename-to=x"], "--rename-to restores one qube"),
                        (["restore", "work", "--rename-to=bad name"], "not a valid qube name"),
                        (["restore", "work", "--session=^nosuchtag", "--rename-to=w2"], "no session tagged"),
                        (["restore", "work", "--rename-to=vault"], "qube vault exists")):
        assert words in dom0.run(*args, expect=1).err, args
    del system.domains["vault"]
    dom0.run("restore", "--all", "--exclude=work")
    assert "vault" in system.domains


@ONE_RELEASE
def test_rename_to_maps_references_to_the_renamed_qube(dom0, system):
    fw = system.domains["sys-firewall"]
    fw.default_dispvm = "sys-firewall"  # odd, but a reference to itself must follow the rename
    dom0.run("backup", "sys-firewall")
    dom0.run("restore", "sys-firewall", "--rename-to=sys-firewall2")
    new = system.domains["sys-firewall2"]
    assert str(new.default_dispvm) == "sys-firewall2" and str(new.netvm) == "sys-net"


def test_reference_to_a_missing_qube_is_an_omission(dom0, system):
    dom0.run("backup", "work")
    for name in ("work", "disp-web", "sys-usb", "default-dvm"):
        del system.domains[name]
    done = dom0.run("restore", "work", expect=2)
    assert "work: created from session" in done.err and "; omitted: property default_dispvm (there is no qube " \
        "default-dvm); device usb sys-usb:2-1 (" in done.err
    assert done.err.strip().endswith("restore: 0 of 1 qubes restored, 1 with omissions, 0 failed")
    work = system.domains["work"]
    assert work.property_is_default("default_dispvm") and "backup-restore-in-progress" not in work.tags


# -- Qubes Manager's "Last backup" ----------------------------------------------------------

@ONE_RELEASE
def test_backup_timestamp_is_set_only_after_the_commit(tmp_path, dom0, system):
    system.services["wyng.Agent"] = [str(LIAR)]
    system.service_env.update(REAL_AGENT=str(AGENT), LIE="truncate:9")
    done = dom0.run("backup", "--all", expect=1)
    assert done.err.startswith("qvm-wyng: error: ") and "Traceback" not in done.err
    assert timestamps(system) == {}
    system.services["wyng.Agent"] = [str(AGENT)]
    dom0.run("backup", "work")
    assert list(timestamps(system)) == ["work"] and isinstance(system.domains["work"].backup_timestamp, int)


@ONE_RELEASE
def test_full_destination_sets_no_backup_timestamp(tmp_path, tmpfs, system):
    small = tmpfs("1M")
    fs = system.domains["sys-backup"].fs
    fs.parent.mkdir(parents=True, exist_ok=True)
    fs.symlink_to(small)
    dom0 = Dom0(tmp_path, system)
    dom0.init()
    done = dom0.run("backup", "--all", expect=1)
    assert "No space left on device" in done.err, done.err
    assert timestamps(system) == {}


# -- hostile archives: the settings record -------------------------------------------------

def _send_as(dom0, tmp_path, volume, data):
    path = tmp_path / "record"
    path.write_bytes(data)
    dom0.run("send", "--import-other-from=%s:|:%s" % (volume, path), "--send-unchanged")


def _refused(dom0, system, words, *args):
    """restore fails with one line holding one of ``words``, and changes nothing."""
    system.changes.clear()
    done = dom0.run("restore", *(args or ("work", "--rename-to=work2")), expect=1)
    assert any(w in done.err for w in ([words] if isinstance(words, str) else words)), done.err
    assert len(done.err.strip().splitlines()) == 1 and "Traceback" not in done.err
    assert system.changes == []  # nothing created, nothing applied


@ONE_RELEASE
def test_oversized_record_is_refused_before_it_is_fetched(dom0, system, tmp_path):
    dom0.run("backup", "work")
    _send_as(dom0, tmp_path, "qubes/work/settings", b"{" + b" " * settings.MAX_SIZE + b"}")
    _refused(dom0, system, "more than 1048576")


@ONE_RELEASE
@pytest.mark.parametrize("data,words", [
    (b"\xff\xfe not json", "not UTF-8 JSON"),
    (b"[1, 2]", "unknown or missing fields"),
    (b"", "not UTF-8 JSON"),
])
def test_malformed_record_is_refused(dom0, system, tmp_path, data, words):
    dom0.run("backup", "work")
    _send_as(dom0, tmp_path, "qubes/work/settings", data)
    _refused(dom0, system, words)


@ONE_RELEASE
def test_record_of_another_qube_is_refused(dom0, system, tmp_path):
    dom0.run("backup", "work", "vault")
    dom0.run("receive", "qubes/vault/settings", "--save-to=%s" % (tmp_path / "vault.json"))
    record = json.loads((tmp_path / "vault.json").read_bytes())
    assert record["name"] == "vault" and record["version"] == 2
    _send_as(dom0, tmp_path, "qubes/work/settings", (tmp_path / "vault.json").read_bytes())
    _refused(dom0, system, "it is the record of another qube")


def _objects(archive, kind):
    return {p.relative_to(archive) for p in (archive / kind).rglob("*") if p.is_file()}


@pytest.fixture
def plain(tmp_path, system):
    """An archive stored without encryption, so that the test can swap
    objects and the agent hands dom0 other plaintext than it asked for."""
    d = Dom0(tmp_path, system, "--encrypt=off", "--compression=off")
    d.init()
    return d


@ONE_RELEASE
def test_replayed_older_record_chunk_is_refused(plain, system):
    plain.run("backup", "work")
    old = _objects(plain.archive, "chunks")
    system.domains["work"].memory = 4000
    plain.run("backup", "work")
    (new,) = _objects(plain.archive, "chunks") - old
    for stale in sorted(old):  # every older chunk in the new record's place
        shutil.copyfile(plain.archive / stale, plain.archive / new)
        _refused(plain, system, ("fails authentication", "where at most"))  # the id, or the length


@ONE_RELEASE
def test_record_chunk_of_another_qube_is_refused(plain, system):
    plain.run("backup", "vault")
    vault_chunks = _objects(plain.archive, "chunks")
    plain.run("backup", "work")
    (work_record,) = [c for c in _objects(plain.archive, "chunks") - vault_chunks
                      if b'"name":"work"' in (plain.archive / c).read_bytes()]
    for chunk in vault_chunks:
        if b'"name":"vault"' in (plain.archive / chunk).read_bytes():
            shutil.copyfile(plain.archive / chunk, plain.archive / work_record)
    _refused(plain, system, "fails authentication")


@ONE_RELEASE
def test_replayed_older_manifest_and_root_are_refused(plain, system):
    plain.run("backup", "work")
    old_root = (plain.archive / "archive").read_bytes()
    old = _objects(plain.archive, "manifests")
    system.domains["work"].memory = 4000
    plain.run("backup", "work")
    new = sorted(_objects(plain.archive, "manifests") - old)
    saved = {m: (plain.archive / m).read_bytes() for m in new}
    for target in new:
        for stale in old:
            shutil.copyfile(plain.archive / stale, plain.archive / target)
            _refused(plain, system, ("manifest of", "where at most"))
        (plain.archive / target).write_bytes(saved[target])
    (plain.archive / "archive").write_bytes(old_root)
    _refused(plain, system, "rolled back")


@ONE_RELEASE
@pytest.mark.parametrize("lie", ["truncate:8", "shrink:8", "garbage:6", "replay:11", "oversize:11"])
def test_lying_agent_during_restore_changes_nothing(dom0, system, lie):
    dom0.run("backup", "work", "vault")
    system.services["wyng.Agent"] = [str(LIAR)]
    system.service_env.update(REAL_AGENT=str(AGENT), LIE=lie)
    del system.domains["work"]
    del system.domains["vault"]
    system.changes.clear()
    done = dom0.run("restore", "work", "vault", "--settings-only", expect=1)
    assert done.err.startswith("qvm-wyng: error: ") and "Traceback" not in done.err
    assert system.changes == []


@ONE_RELEASE
def test_chunk_that_fails_during_import_leaves_the_volume_as_it_was(plain, system):
    work = system.domains["work"]
    plain.run("backup", "work")
    saved = digest(work.volumes["private"].path)
    chunks = _objects(plain.archive, "chunks")
    _random_change(work, "private", 5)
    plain.run("backup", "work")
    changed_data = digest(work.volumes["private"].path)
    (new,) = [c for c in _objects(plain.archive, "chunks") - chunks if b'"name":"work"' not in
              (plain.archive / c).read_bytes()][:1]
    (plain.archive / new).write_bytes((plain.archive / sorted(chunks)[0]).read_bytes())
    _random_change(work, "private", 6)
    local = digest(work.volumes["private"].path)
    system.changes.clear()
    done = plain.run("restore", "work", "--force", "--data-only", expect=2)
    assert "work: FAILED: " in done.err and "fails authentication" in done.err
    assert "it keeps the tag backup-restore-in-progress, so it cannot start: restore it again with --force" in done.err
    assert done.err.strip().endswith("restore: 0 of 1 qubes restored, 0 with omissions, 1 failed")
    assert digest(work.volumes["private"].path) == local
    assert local not in (saved, changed_data)
    assert [c[1] for c in system.changes] == ["tag", "import"]  # started, and aborted by the short stream
    with pytest.raises(QubesVMError, match="Restore of this domain in progress"):
        work.start()
    # an older session is whole: restoring it ends the half-made state
    plain.run("restore", "work", "--force", "--data-only", "--session=%s" % plain.sessions("qubes/work/settings")[0])
    assert digest(work.volumes["private"].path) == saved and "backup-restore-in-progress" not in work.tags
    work.start()


# -- names, sources, transports --------------------------------------------------------

DEVICE = {"class": "usb", "backend": "sys-usb", "port": "2-1", "device": "0x046d:0xc52b::u03", "mode": "auto-attach",
          "options": {"read-only": "yes"}}


def test_records_of_version_1_still_restore():
    """Records written before device assignments were saved: no devices."""
    v1 = {"version": 1, "name": "work", "class": "AppVM", "label": "blue", "template": "fedora-40",
          "properties": {"memory": 800}, "features": {}, "tags": [], "firewall": [], "notes": "", "volumes": []}
    assert settings.parse(settings.encode(v1), "work") == dict(v1, devices=[])


@pytest.mark.parametrize("record_change,words", [
    (lambda r: r.update(version=3), "format version"),
    (lambda r: r.update(version=True), "format version"),
    (lambda r: r.update(version=1), "unknown or missing fields"),  # version 1 had no devices
    (lambda r: r["devices"].append(dict(DEVICE, mode="manual")), "a device"),
    (lambda r: r["devices"].append(dict(DEVICE, backend="-x")), "a device"),
    (lambda r: r["devices"].append(dict(DEVICE, port="2 1")), "a device"),
    (lambda r: r["devices"].append(dict(DEVICE, device="")), "a device"),
    (lambda r: r["devices"].append(dict(DEVICE, options={"a": "b\n"})), "a device"),
    (lambda r: r["devices"].append(dict(DEVICE, extra=1)), "a device"),
    (lambda r: r.update(extra=1), "unknown or missing fields"),
    (lambda r: r.pop("notes"), "unknown or missing fields"),
    (lambda r: r.update({"class": "AdminVM"}), "class or label"),
    (lambda r: r.update(label="red; rm"), "class or label"),
    (lambda r: r.update(template=None), "template"),
    (lambda r: r.update(template="-x"), "template"),
    (lambda r: r["properties"].update(qid=7), "property 'qid' may not be set"),
    (lambda r: r["properties"].update(uuid="x"), "may not be set"),
    (lambda r: r["properties"].update(visible_ip="10.0.0.1"), "may not be set"),
    (lambda r: r["properties"].update(backup_timestamp=1), "may not be set"),
    (lambda r: r["properties"].update({"Bad-Name": 1}), "may not be set"),
    (lambda r: r["properties"].update(memory=[1]), "value of property memory"),
    (lambda r: r["properties"].update(kernelopts="x" * 70000), "value of property kernelopts"),
    (lambda r: r["properties"].update(netvm="sys net"), "netvm is not a qube name"),
    (lambda r: r["features"].update({"a b": "1"}), "a feature"),
    (lambda r: r["features"].update(x=1), "a feature"),
    (lambda r: r.update(tags=["ok", "no spaces"]), "tags"),
    (lambda r: r.update(firewall=["action=accept\naction=drop"]), "a firewall rule"),
    (lambda r: r.update(firewall=[""]), "a firewall rule"),
    (lambda r: r.update(notes=None), "notes"),
    (lambda r: r.update(volumes=["private", "private"]), "volumes"),
    (lambda r: r.update(volumes=["settings"]), "volumes"),
    (lambda r: r.update(volumes=["../x"]), "volumes"),
    (lambda r: r.update(name="vault"), "another qube"),
])
def test_record_schema_refuses_anything_dom0_does_not_write(record_change, words):
    record = {"version": 2, "name": "work", "class": "AppVM", "label": "blue", "template": "fedora-40",
              "properties": {"memory": 800, "netvm": None, "autostart": True, "kernelopts": "nopat",
                             "mac": "00:16:3e:5e:6c:01", "ip": "10.137.0.99"},
              "features": {"service.crond": "1"}, "tags": ["project-x"], "firewall": ["action=drop"],
              "notes": "n", "volumes": ["private"], "devices": [DEVICE]}
    assert settings.parse(settings.encode(record), "work") == record
    record_change(record)
    with pytest.raises(settings.Fail, match=words.replace("(", r"\(")):
        settings.parse(settings.encode(record), "work")


@ONE_RELEASE
def test_pool_drivers_map_to_the_committed_data(tmp_path, system):
    from qubeswyng import qubes
    opts = cli.parse(["backup", "--quiet"])
    work = system.domains["work"]
    src = qubes.volume_source(system, work, "private", opts)
    assert src.volume.path == str(system.pools["varlibqubes"].config["dir_path"]) + "/appvms/work/private.img"
    assert src.volume.size == 1 * MiB + 4096
    src.close()
    system.add_pool(LvmPool(system, "vm-pool", "qubes_dom0", "vm-pool"))
    system.pools["vm-pool"].create = lambda vid, size: None
    thin = system.add_new_vm("AppVM", "thin", "red", template="fedora-40", pool="vm-pool")
    with pytest.raises(settings.Fail, match="lvs qubes_dom0: Cannot process volume group qubes_dom0"):
        qubes.volume_source(system, thin, "private", opts)
    system.pools["vm-pool"].config["driver"] = "zfs"
    with pytest.raises(settings.Fail, match="pool vm-pool, whose driver zfs qvm-wyng cannot read"):
        qubes.volume_source(system, thin, "private", opts)


@ONE_RELEASE
def test_qube_on_a_filesystem_without_reflinks_is_read_in_full(tmp_path, ext4_mount, system):
    system.add_pool(FilePool(system, "ext4", ext4_mount / "qubes"))
    vm = system.add_new_vm("StandaloneVM", "on-ext4", "green", pool="ext4")
    import random
    scribble(vm.volumes["private"], random.Random(4))
    dom0 = Dom0(tmp_path, system)
    dom0.init()
    done = dom0.run("backup", "on-ext4")
    assert "does not support reflinks; reading all of it" in done.err
    saved = state(vm)
    del system.domains["on-ext4"]
    dom0.run("restore", "on-ext4", "--pool=ext4")
    assert state(system.domains["on-ext4"]) == saved


@ONE_RELEASE
@pytest.mark.parametrize("kind", ["qubes-ssh", "qubes-s3"])
def test_the_backup_qube_stores_over_ssh_or_in_s3(tmp_path, system, request, kind):
    """The agent runs in sys-backup and reaches the storage from there."""
    dom0 = Dom0(tmp_path, system)
    if kind == "qubes-ssh":
        request.getfixturevalue("sshd")
        dom0.dest = "qubes-ssh://sys-backup:root@wyng-test%s/qubes.wyng" % tmp_path
    else:
        dom0.dest = "qubes-s3://sys-backup:%s/qubes" % request.getfixturevalue("s3_server").bucket()
    dom0.run("arch-init")
    dom0.run("backup", "vault")
    assert dom0.run("verify", "vault").out.count("verified") == 2
    assert {vm for vm, _service in system.service_calls} == {"sys-backup"}
    if kind == "qubes-ssh":
        assert (tmp_path / "qubes.wyng" / "archive").is_file()


@ONE_RELEASE
def test_malformed_qube_destinations(dom0):
    for bad in ("qubes-ssh://sys-net/srv", "qubes-ssh://sys-net:host/srv", "qubes-ssh://sys-net:me@host"):
        assert "qubes-ssh://VM:user@host[:port]/path" in dom0.run("list", "--dest=" + bad, expect=1).err
    assert "qubes-s3://VM:[profile@]bucket/prefix" in dom0.run("list", "--dest=qubes-s3://sys-net", expect=1).err
    assert "not a valid qube name" in dom0.run("list", "--dest=qubes://-x/srv", expect=1).err
    assert "no qube named nosuchvm" in dom0.run("list", "--dest=qubes://nosuchvm/srv", expect=1).err
    assert "dom0 is not a backup qube" in dom0.run("list", "--dest=qubes://dom0/srv", expect=1).err


@ONE_RELEASE
def test_backup_qube_without_the_service_fails_cleanly(dom0, system):
    del system.services["wyng.Agent"]
    done = dom0.run("list", expect=1)
    assert done.err.startswith("qvm-wyng: error: the agent closed the connection")


@ONE_RELEASE
def test_verify_resolves_qube_names_and_volume_names_win(dom0, system, tmp_path):
    dom0.run("backup", "vault")
    out = dom0.run("verify", "vault").out
    assert [line.split(":")[0] for line in out.splitlines()] == ["qubes/vault/private", "qubes/vault/settings"]
    path = tmp_path / "img"
    path.write_bytes(b"x" * 1000)
    dom0.run("send", "--import-other-from=vault:|:%s" % path)
    assert dom0.run("verify", "vault").out.startswith("vault: session")
    assert "not in the archive (as a volume or a qube)" in dom0.run("verify", "nosuch", expect=1).err


@ONE_RELEASE
def test_qube_on_a_btrfs_reflink_pool_round_trips(tmp_path, btrfs_mount, system):
    system.add_pool(FilePool(system, "btrfs", btrfs_mount / "qubes"))
    vm = system.add_new_vm("StandaloneVM", "on-btrfs", "green", pool="btrfs")
    import random
    rng = random.Random(9)
    for name in ("root", "private"):
        vm.volumes[name].resize(3 * MiB, allow_shrink=True)
        scribble(vm.volumes[name], rng)
    dom0 = Dom0(tmp_path, system)
    dom0.init()
    dom0.run("backup", "on-btrfs")
    saved = state(vm)
    assert str(vm.volumes["root"].path).startswith(str(btrfs_mount))
    del system.domains["on-btrfs"]
    assert not (btrfs_mount / "qubes" / "appvms" / "on-btrfs" / "root.img").exists()
    dom0.run("restore", "on-btrfs", "--pool=btrfs")
    assert state(system.domains["on-btrfs"]) == saved


@ONE_RELEASE
def test_volume_without_the_records_session_is_refused(dom0, system, tmp_path):
    dom0.run("backup", "work")
    dom0.run("receive", "qubes/work/settings", "--save-to=%s" % (tmp_path / "work.json"))
    _send_as(dom0, tmp_path, "qubes/work/settings", (tmp_path / "work.json").read_bytes())
    newest = dom0.sessions("qubes/work/settings")[-1]
    _refused(dom0, system, "work: volume private has no session %s in the archive" % newest)
    dom0.run("restore", "work", "--rename-to=work2", "--settings-only")  # the settings alone are whole



@ONE_RELEASE
def test_prune_and_delete_take_qube_names(dom0, system):
    """A qube name stands for all of its volumes in prune and delete too."""
    dom0.run("backup", "work")
    dom0.run("backup", "work", "--tag=second")
    volumes = ["qubes/work/private", "qubes/work/settings"]
    assert all(len(dom0.sessions(v)) == 2 for v in volumes)
    dom0.run("prune", "work", "--all-before", "--session=^second")
    assert all(len(dom0.sessions(v)) == 1 for v in volumes)
    dom0.run("delete", "work", "-u")
    names = [v["name"] for v in json.loads(dom0.run("list", "--json").out)["volumes"]]
    assert not [n for n in names if n.startswith("qubes/work/")]


def test_second_backup_reads_only_what_changed(dom0, system):
    """The qube's file-reflink pool is on Btrfs: the second backup compares
    snapshots and reads only the chunks the write touched."""
    dom0.run("backup", "work")
    vol = system.domains["work"].volumes["private"]
    with open(vol.path, "r+b") as f:
        f.seek(300 * 1024)
        f.write(b"x" * 5000)  # inside the second 256 KiB chunk
    done = json.loads(dom0.run("backup", "work", "--json").out)
    private = next(v for v in done["volumes"] if v["volume"] == "qubes/work/private")
    assert private["incremental"] and private["chunks_read"] == 1 and private["chunks_changed"] == 1
