"""The only module that uses qubesadmin (its surface: ../shared/qubes-api.md).

Commands get qubes, their volumes and settings through these functions and
hand the VM objects back to them untouched, so that ``app`` may be
``qubesadmin.Qubes()`` or a test double of it.  Errors that qubesadmin
raises become one-line ``Fail``s here, or, while settings are applied,
omissions.  The client of Qubes R4.2 and of R4.3 are told apart by what
their objects offer (``hasattr``), never by a version (doc/qubes.md).
"""
import collections
import contextlib
import itertools
import os
import subprocess
import threading
import time

from .clock import now
from .errors import Fail
from .progress import notice
from .settings import DEVICE, NET_IDS, NEVER_COPY, SETTINGS, VERSION, VM_REFS, check, encode, qube_name, volume
from .sources.image import FullRead
from .sources.snapshots import send_source

RESTORING = "backup-restore-in-progress"  # qvm-backup-restore's tag for a half-restored qube: qubesd will not start it
RESTORED = "restored-from-backup-at-"     # and its tag for a restored one, with the date
# what Firewall.save_rules reads of each rule: its API text, ``Rule.rule``
Rule = collections.namedtuple("Rule", "rule")


def connect(app=None):
    if app is not None:
        return app
    try:
        import qubesadmin
    except ImportError:
        raise Fail("qubesadmin is not installed: qube backups and qubes:// destinations work in dom0") from None
    return qubesadmin.Qubes()


def _call(what, func, *args, **kwargs):
    try:
        return func(*args, **kwargs)
    except Exception as e:  # qubesadmin.exc.*, whatever qubesd refused
        raise Fail("%s: %s" % (what, e or type(e).__name__)) from e


def get(app, name):
    if qube_name(name) not in app.domains:
        raise Fail("no qube named %s" % name)
    return app.domains[name]


def state(app, name):
    """None if there is no qube ``name``, else (its class, whether it is halted)."""
    vm = app.domains[name] if name in app.domains else None
    return None if vm is None else (vm.klass, vm.is_halted())


def run_agent(app, name):
    """The wyng.Agent service in backup qube ``name`` (started if needed) as
    a Popen with stdin, stdout and stderr pipes.  dom0's calls need no policy."""
    vm = get(connect(app), name)
    if vm.klass == "AdminVM":
        raise Fail("dom0 is not a backup qube: use --dest=file:/path for an archive in dom0")
    return _call("cannot start wyng.Agent in %s" % name, vm.run_service, "wyng.Agent",
                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def select(app, names, all_, exclude):
    """qvm-backup's choice: the named qubes, or with --all every qube whose
    include_in_backups is true; never dom0; less --exclude."""
    if bool(names) == bool(all_):
        raise Fail("name the qubes or give --all (not both)")
    for name in exclude:
        get(app, name)
    vms = [vm for vm in app.domains if vm.klass != "AdminVM" and vm.include_in_backups] if all_ \
        else [get(app, name) for name in names]
    vms = sorted({vm.name: vm for vm in vms if vm.name not in exclude}.items())
    if any(vm.klass == "AdminVM" for _n, vm in vms):
        raise Fail("dom0 is not a qube qvm-wyng backs up")
    if not vms:
        raise Fail("no qubes to back up")
    return [vm for _n, vm in vms]


def volume_source(app, vm, name, opts):
    """How dom0 reads the committed data of ``vm``'s volume ``name``: the
    copy-on-write source of its pool (sources/snapshots.py), which reads
    only what changed since the last backup to this archive."""
    vol = vm.volumes[name]
    config = app.pools[vol.pool].config
    driver = config.get("driver")
    if driver == "lvm_thin":
        return send_source(opts, "%s/%s" % (config["volume_group"], config["thin_pool"]),
                           "vm-%s-%s" % (vm.name, name))
    if driver == "file-reflink":
        return send_source(opts, config["dir_path"], vol.vid + ".img")
    raise Fail("%s: volume %s is in pool %s, whose driver %s qvm-wyng cannot read" % (
        vm.name, name, vol.pool, driver))


class RecordSource(FullRead):
    """A settings record as a source: its bytes in chunks."""

    def __init__(self, data):
        self.data, self.size = memoryview(data), len(data)

    def chunks(self, chunk_size, _wanted=None):
        for index, start in enumerate(range(0, self.size, chunk_size)):
            yield index, self.data[start:start + chunk_size]


def sources(app, vm, opts):
    """(archive volume name, source) for everything a backup of ``vm`` sends,
    opened one by one (sources.open_all): its save_on_stop volumes (what
    qvm-backup saves), then its settings."""
    wanted = sorted(n for n, v in vm.volumes.items() if v.save_on_stop)
    if wanted and vm.is_running():
        notice(opts, "%s is running: its volumes are backed up as of its last start" % vm.name)
    for name in wanted:
        yield volume(vm.name, name), volume_source(app, vm, name, opts)
    yield volume(vm.name, SETTINGS), RecordSource(encode(read_settings(vm, wanted)))


def read_settings(vm, volumes):
    props = {}
    for prop in vm.property_list():
        try:
            if prop in NEVER_COPY or vm.property_is_default(prop):
                continue
            value = getattr(vm, prop)
        except AttributeError:
            continue  # no value and no default
        props[prop] = value if value is None or type(value) in (bool, int, str) else str(value)
    return check({
        "version": VERSION, "name": vm.name, "class": vm.klass, "label": str(vm.label),
        "template": str(vm.template) if vm.klass in ("AppVM", "DispVM") else None, "properties": props,
        "features": dict(vm.features.items()), "tags": sorted(t for t in vm.tags if not t.startswith("created-by-")),
        "firewall": [rule.rule for rule in vm.firewall.rules], "volumes": volumes, "devices": read_devices(vm),
        "notes": vm.get_notes() if hasattr(vm, "get_notes") else "",  # R4.3 only
    }, vm.name)


def read_devices(vm):
    """The qube's device assignments in the record's form: R4.3's with their
    mode; R4.2's persistent attachments, which R4.3 calls required (pci)
    and auto-attach (the others)."""
    found = []
    for cls in DEVICE["class"]:
        devices = vm.devices[cls]
        if hasattr(devices, "get_assigned_devices"):
            items = [(a, a.port_id, a.device_id, a.mode.value) for a in devices.get_assigned_devices()]
        else:
            items = [(a, a.ident, "*", "required" if cls == "pci" else "auto-attach")
                     for a in devices.assignments(persistent=True)]
        found += [{"class": cls, "backend": str(a.backend_domain), "port": port, "device": dev, "mode": mode,
                   "options": {str(k): str(v) for k, v in a.options.items()}}
                  for a, port, dev, mode in items if mode in DEVICE["mode"]]
    return found


def stamp(vms, when):
    """Qubes Manager's "Last backup" column."""
    for vm in vms:
        _call("%s: backup_timestamp" % vm.name, setattr, vm, "backup_timestamp", when)


# -- restoring ------------------------------------------------------------------

def create(app, rec, name, pool):
    """A new qube ``name`` with the record's class, label (red if this
    Qubes has no such label, as qvm-backup-restore does) and template,
    tagged as being restored until ``finish``."""
    extra = {"template": rec["template"]} if rec["template"] else {}
    label = rec["label"] if rec["label"] in app.labels else "red"
    vm = _call("cannot create %s" % name, app.add_new_vm, rec["class"], name, label, pool=pool, **extra)
    app.domains.clear_cache()  # later references to it look it up by name
    begin(vm)
    return vm


def begin(vm):
    _call("%s: tag %s" % (vm.name, RESTORING), vm.tags.add, RESTORING)


def finish(vm):
    """Tags of a restored qube, as after qvm-backup-restore."""
    vm.tags.add(RESTORED + time.strftime("%Y-%m-%d", time.localtime(now())))
    vm.tags.discard(RESTORING)


def _try(omit, what, func, *args):
    """One setting: what qubesd refuses is added to ``omit``, not raised."""
    try:
        func(*args)
    except Exception as e:  # qubesadmin.exc.*, or ProtocolError (an AssertionError) for a malformed value
        omit.append("%s (%s)" % (what, e or type(e).__name__))


def apply_settings(app, vm, rec, refs, rename, omit):
    """The record's settings onto ``vm``: with ``refs`` false everything but
    the properties naming other qubes and the devices, with ``refs`` true
    only those (all qubes of the restore exist by then).  Features, tags
    and properties the qube has and the record does not are left as they
    are.  Whatever cannot be applied is skipped and described in ``omit``."""
    def put(key, value):
        _try(omit, "property %s" % key, setattr, vm, key, value)
    known = set(vm.property_list())
    if not refs and rec["label"] not in app.labels:
        omit.append("label %s (this Qubes has no such label; the qube's is %s)" % (rec["label"], vm.label))
    for key in ("label", "template") if not refs else ():
        if rec[key] is not None and str(getattr(vm, key)) != rec[key] and (key != "label" or rec[key] in app.labels):
            put(key, rec[key])  # an existing qube restored over
    for key, value in sorted(rec["properties"].items()):
        if (key in VM_REFS) != refs:
            continue
        value = rename.get(value, value) if refs and value is not None else value
        why = "this Qubes has no such property" if key not in known else \
            "there is no qube %s" % value if refs and value is not None and value not in app.domains else \
            _taken(app, vm, key, value)
        if why:
            omit.append("property %s (%s)" % (key, why))
        else:
            put(key, value)
    if refs:
        have = {(d["class"], d["backend"], d["port"]) for d in read_devices(vm)}
        for dev in rec["devices"]:
            dev = dict(dev, backend=rename.get(dev["backend"], dev["backend"]))
            if (dev["class"], dev["backend"], dev["port"]) not in have:
                _try(omit, "device %s %s:%s" % (dev["class"], dev["backend"], dev["port"]), assign, app, vm, dev)
        return
    for key, value in rec["features"].items():
        _try(omit, "feature %s" % key, vm.features.__setitem__, key, value)
    for tag in rec["tags"]:
        _try(omit, "tag %s" % tag, vm.tags.add, tag)
    _try(omit, "firewall", vm.firewall.save_rules, [Rule(r) for r in rec["firewall"]])
    if hasattr(vm, "set_notes"):
        _try(omit, "notes", vm.set_notes, rec["notes"])
    elif rec["notes"]:
        omit.append("notes (Qubes R4.2 has no qube notes)")


def _taken(app, vm, key, value):
    """Why an address (ip, ip6) is not restored: another qube has it (two
    qubes with one address behind one netvm break each other's traffic)."""
    return next(("qube %s has %s" % (other.name, value) for other in (app.domains if key in NET_IDS else ())
                 if other.name != vm.name and str(getattr(other, key, None)) == str(value)), None)


def assign(app, vm, dev):
    """Re-create a device assignment in this release's form: R4.3 assigns
    with the mode (pci always required, as R4.3 demands); R4.2 attaches
    persistently (it has no modes)."""
    from qubesadmin.devices import DeviceAssignment
    backend = app.domains[dev["backend"]]
    if hasattr(DeviceAssignment, "new"):
        vm.devices[dev["class"]].assign(DeviceAssignment.new(
            backend, dev["port"], dev["class"], None if dev["device"] == "*" else dev["device"],
            options=dev["options"], mode="required" if dev["class"] == "pci" else dev["mode"]))
    else:
        vm.devices[dev["class"]].attach(DeviceAssignment(backend, dev["port"], dev["options"], persistent=True))


def refresh_menus(vms, opts):
    """What qubesd's appmenus extension does when a qube changes, once more
    now that every setting is in: the qube's GUI qube runs
    qubes.UpdateAppMenusFor+NAME (qvm-appmenus --update).  For a GUI qube
    that is not running the extension has queued its updates itself."""
    for vm in vms:
        try:
            gui = vm.guivm  # None: no GUI, no menu
            if gui is None or not gui.is_running():
                continue
            proc = gui.run_service("qubes.UpdateAppMenusFor+" + vm.name, autostart=False,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            err = proc.communicate(timeout=300)[1]
            if proc.returncode:
                raise Fail(err.decode("ascii", "replace").strip()[-200:] or "exit %d" % proc.returncode)
        except Exception as e:
            notice(opts, "%s: its menu entries were not refreshed: %s" % (vm.name, e))


def import_volume(vm, name, size, produce):
    """Replace ``vm``'s volume ``name`` with ``size`` bytes through
    Volume.import_data_with_size, which reads a pipe.  A thread runs
    ``produce(write)``, which calls ``write(offset, data)`` with verified
    data in increasing offset order; gaps are zeros.  If ``produce`` fails
    the stream ends short, and qubesd aborts the import ("not enough data"):
    the volume keeps its old contents."""
    target = vm.volumes[name] if name in vm.volumes else None
    if target is None or not target.save_on_stop:
        raise Fail("%s has no volume %s that keeps data to restore into" % (vm.name, name))
    rfd, wfd = os.pipe()
    failed, zero = [], bytes(1 << 20)

    def feed():
        try:
            with open(wfd, "wb") as out:
                pos = [0]

                def write(offset, data):
                    while pos[0] < offset:
                        pos[0] += out.write(zero[:min(len(zero), offset - pos[0])])
                    pos[0] += out.write(data)
                produce(write)
                write(size, b"")
        except BaseException as e:
            failed.append(e)
    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    error = None
    with open(rfd, "rb") as stream:
        try:
            target.import_data_with_size(stream, size)
        except Exception as e:
            error = e
    thread.join()
    if failed and not isinstance(failed[0], BrokenPipeError):
        raise failed[0]
    if error or failed:
        raise Fail("%s: volume %s was not restored: %s" % (vm.name, name, error or "the import stopped reading"))


# -- browsing: a disposable qube that presents a session (commands/browse.py) ------

def browse_template(app, qube, given):
    """--dispvm, else the default_dispvm of ``qube`` if it is on this system,
    else the system's (doc/browse.md)."""
    chosen = given or (qube in app.domains and app.domains[qube].default_dispvm) or app.default_dispvm
    if not chosen:
        raise Fail("no default disposable template: give --dispvm=TEMPLATE")
    return get(app, str(chosen))


def start_browser(app, template):
    """A new disposable qube from ``template``, without network, running
    wyng.Browse as root: (qube, Popen with stdin and stdout pipes).  Made as
    qvm-backup-restore makes its disposable (a named DispVM with
    auto_cleanup), so that killing it removes it."""
    name = next("disp-wyng-%d" % n for n in itertools.count(1) if "disp-wyng-%d" % n not in app.domains)
    vm = _call("cannot create a disposable qube from %s" % template.name, app.add_new_vm, "DispVM", name,
               str(template.label), template=template.name)
    try:
        for key, value in (("auto_cleanup", True), ("netvm", None)):
            _call("%s: cannot set %s" % (name, key), setattr, vm, key, value)
        return vm, _call("cannot start wyng.Browse in %s" % name, vm.run_service, "wyng.Browse", user="root",
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    except BaseException:
        end_browser(app, vm)
        raise


def end_browser(app, vm):
    """Kill the disposable (auto_cleanup removes it); one that is not running
    (never started, or closed already) is removed, if it is still there."""
    try:
        vm.kill()
    except Exception:
        with contextlib.suppress(Exception):
            del app.domains[vm.name]
