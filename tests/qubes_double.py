"""A double of ``qubesadmin.Qubes`` with exactly the surface listed in
../shared/qubes-api.md, for tests (qubesadmin exists only in dom0).  It
plays the client of Qubes R4.2 (qubesadmin 4.2.18) or R4.3 (4.3.34):

    app = QubesDouble(tmp_path, release="4.2")   # dom0, labels, a file-reflink pool
    fedora = app.add_new_vm("TemplateVM", "fedora-40", "black")
    work = app.add_new_vm("AppVM", "work", "blue", template="fedora-40")
    qubeswyng.cli.main([...], app=app)

Constructing one also makes ``import qubesadmin`` (``.devices``, ``.exc``)
give that release's modules, and ``qubesadmin.Qubes()`` this double, so
code that imports qubesadmin itself meets the same release (``uninstall()``
undoes it).  What differs between the releases, as in the real client:

- R4.2 has no ``get_notes``/``set_notes``; device assignments are
  ``vm.devices[cls].assignments(persistent=True)`` of
  ``DeviceAssignment(backend_domain, ident, options, persistent)``, made
  with ``attach``;
- R4.3 has notes; assignments are ``get_assigned_devices()`` with a
  ``virtual_device``, ``mode`` (AssignmentMode: required, auto-attach,
  ask-to-attach) and ``options``, made with ``assign(DeviceAssignment.new(
  backend, port_id, devclass, device_id, options=, mode=))``, which refuses
  a PCI device that is not ``required`` and ``required`` for other than
  pci and block.

Both refuse what qubesd refuses: read-only or unknown properties, invalid
values (kernelopts over 512 characters, a malformed mac or ip, a netvm
that provides no network, a template of the wrong class), an unknown label
(QubesLabelNotFoundError), a feature value that is not printable ASCII,
starting a qube tagged ``backup-restore-in-progress``, a volume import
while running or with the wrong amount of data, a device backend that does
not exist.  Properties have defaults like qubesd's (``property_is_default``
is true until a value is set; a named disposable's ``include_in_backups``
is ``not auto_cleanup``: true).

Volumes follow the pools' real lifecycle (qubes-core-admin's
qubes/storage/reflink.py and lvm.py):

- ``file-reflink``: the committed image is ``<dir_path>/<vid>.img``; a
  start copies it (reflink if the filesystem can) to ``<vid>-dirty.img``,
  where the running qube writes; the shutdown keeps the old image as the
  revision ``<vid>.img.<N>@<YYYY-MM-DDTHH:MM:SS>Z`` (``revisions_to_keep``
  of them) and renames the dirty image over it.  An import writes
  ``<vid>-import.img`` and commits it the same way.  Removing a qube removes
  its images and then its folder, if empty.
- ``lvm_thin`` (real thin volumes, in the qemu guest): a start makes the
  thin snapshot ``<vid>-snap`` where the qube writes; the shutdown renames
  the committed volume to the revision ``<vid>-<time>-back`` and the
  snapshot to ``<vid>``; imports go through ``<vid>-import``.

``vol.path`` is the committed data, ``vol.live`` what a running qube
writes.  ``run_service`` starts the command registered for the service
(``app.services``; the real qubes-rpc/wyng.Agent and wyng.Browse) with
stdin, stdout and stderr PIPEs unless given, like qubesadmin, cwd and HOME
in ``<root>/vms/<name>`` (the qube's filesystem).  Every change to a qube
is appended to ``app.changes``, every service call to ``app.service_calls``.

Disposables (``add_new_vm('DispVM', ...)`` from a template for dispvms, as
qvm-backup-restore makes them) have ``auto_cleanup``; ``kill`` of one that
is not running fails, and ends the processes its services run (SIGTERM, so
that a real wyng.Browse undoes its mounts on this host, where a real qube
would just vanish); with auto_cleanup the qube is removed.
"""
import enum
import errno
import ipaddress
import itertools
import os
import re
import subprocess
import sys
import time
import types
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
AGENT = REPO / "qubes-rpc" / "wyng.Agent"
BROWSE = REPO / "qubes-rpc" / "wyng.Browse"
LABELS = ("red", "orange", "yellow", "green", "gray", "blue", "purple", "black")
VM_PROPS = ("template", "netvm", "default_dispvm", "management_dispvm", "audiovm", "guivm")
READ_ONLY = ("qid", "uuid", "xid", "visible_ip", "start_time", "stubdom_xid")
DEVICE_CLASSES = ("block", "mic", "pci", "usb")
RESTORING = "backup-restore-in-progress"
MiB = 1 << 20


# -- qubesadmin.exc ------------------------------------------------------------------

class QubesException(Exception):
    """qubesadmin.exc.QubesException: what qubesd refused."""


class QubesValueError(QubesException, ValueError):
    pass


class QubesVMNotFoundError(QubesException, KeyError):
    def __str__(self):
        return QubesException.__str__(self)


class QubesLabelNotFoundError(QubesException, KeyError):
    def __str__(self):
        return QubesException.__str__(self)


class QubesVMError(QubesException):
    pass


class ProtocolError(AssertionError):
    """qubesd's answer to a malformed argument (not a QubesException)."""


DoubleError = QubesException


class Label:
    def __init__(self, name):
        self.name = name

    def __str__(self):
        return self.name

    def __eq__(self, other):
        return isinstance(other, Label) and other.name == self.name

    def __hash__(self):
        return hash(self.name)


class Rule:
    """Like qubesadmin.firewall.Rule: built from and kept as its API text."""

    def __init__(self, rule):
        words = dict(w.split("=", 1) for w in rule.split(" ") if "=" in w)
        if words.get("action") not in ("accept", "drop") or "\n" in rule:
            raise QubesValueError("invalid firewall rule %r" % rule)
        self.rule = rule

    def __eq__(self, other):
        return isinstance(other, Rule) and other.rule == self.rule

    def __repr__(self):
        return "Rule(%r)" % self.rule


class Firewall:
    def __init__(self, vm):
        self.vm, self._rules = vm, [Rule("action=accept")]

    @property
    def rules(self):
        return list(self._rules)

    def save_rules(self, rules=None):
        self._rules = [Rule(r.rule) for r in (self._rules if rules is None else rules)]
        self.vm.app.changes.append((self.vm.name, "firewall", [r.rule for r in self._rules]))


class Features(dict):
    def __init__(self, vm):
        super().__init__()
        self.vm = vm

    def __setitem__(self, key, value):
        value = "1" if value is True else "" if value is False else str(value)
        if not re.match(r"\A[a-zA-Z0-9_.-]+\Z", key):
            raise ProtocolError("feature name contains illegal characters")
        if not re.match(r"\A[\x20-\x7E]*\Z", value):
            raise ProtocolError("%s value contains illegal characters" % key)
        self.vm.app.changes.append((self.vm.name, "feature", key, value))
        super().__setitem__(key, value)

    def __delitem__(self, key):
        self.vm.app.changes.append((self.vm.name, "feature-del", key))
        super().__delitem__(key)


class Tags(set):
    def __init__(self, vm):
        super().__init__()
        self.vm = vm

    def add(self, tag):
        self.vm.app.changes.append((self.vm.name, "tag", tag))
        super().add(tag)

    def discard(self, tag):
        self.vm.app.changes.append((self.vm.name, "tag-del", tag))
        super().discard(tag)


# -- devices: R4.2 and R4.3 ------------------------------------------------------------

class DeviceAssignment42:
    """qubesadmin 4.2 devices.DeviceAssignment."""

    def __init__(self, backend_domain, ident, options=None, persistent=False, frontend_domain=None,
                 devclass=None):
        self.backend_domain, self.ident, self.devclass = backend_domain, ident, devclass
        self.options, self.persistent, self.frontend_domain = options or {}, persistent, frontend_domain


class AssignmentMode(enum.Enum):
    MANUAL = "manual"
    ASK = "ask-to-attach"
    AUTO = "auto-attach"
    REQUIRED = "required"


class VirtualDevice:
    def __init__(self, backend_domain, port_id, devclass, device_id=None):
        self.backend_domain, self.port_id, self.devclass = backend_domain, port_id, devclass
        self.device_id = device_id if device_id is not None else "*"


class DeviceAssignment43:
    """qubesadmin 4.3 device_protocol.DeviceAssignment (the part restore uses)."""

    def __init__(self, device, frontend_domain=None, options=None, mode="manual"):
        self.virtual_device, self.frontend_domain = device, frontend_domain
        self.options = options or {}
        self.mode = mode if isinstance(mode, AssignmentMode) else AssignmentMode(mode)

    @classmethod
    def new(cls, backend_domain, port_id, devclass, device_id=None, *, frontend_domain=None, options=None,
            mode="manual"):
        return cls(VirtualDevice(backend_domain, port_id, devclass, device_id), frontend_domain, options, mode)

    backend_domain = property(lambda self: self.virtual_device.backend_domain)
    port_id = property(lambda self: self.virtual_device.port_id)
    devclass = property(lambda self: self.virtual_device.devclass)
    device_id = property(lambda self: self.virtual_device.device_id)
    required = property(lambda self: self.mode == AssignmentMode.REQUIRED)
    attach_automatically = property(lambda self: self.mode in (
        AssignmentMode.AUTO, AssignmentMode.ASK, AssignmentMode.REQUIRED))


class DeviceCollection:
    """``vm.devices[cls]``; assignments are kept as (backend name, port,
    device id, mode, options) in ``vm._devices[cls]``."""

    def __init__(self, vm, cls):
        self._vm, self._class = vm, cls

    def _store(self, backend, port, device_id, mode, options):
        app = self._vm.app
        if str(backend) not in app.domains:
            raise QubesVMNotFoundError("no such domain: %s" % backend)
        found = self._vm._devices.setdefault(self._class, [])
        if any(d[:2] == (str(backend), port) for d in found):
            raise QubesException("device %s:%s is already assigned" % (backend, port))
        found.append((str(backend), port, device_id, mode, dict(options)))
        app.changes.append((self._vm.name, "device", self._class, str(backend), port, mode))


class DeviceCollection42(DeviceCollection):
    def assignments(self, persistent=None):
        for backend, port, _dev, _mode, options in self._vm._devices.get(self._class, []):
            if persistent is False:
                continue
            yield DeviceAssignment42(self._vm.app.domains[backend], port, dict(options), persistent=True,
                                     frontend_domain=self._vm, devclass=self._class)

    def attach(self, assignment):
        if assignment.devclass not in (None, self._class):
            raise AssertionError("device class mismatch")
        if not assignment.persistent:
            raise QubesVMError("the double keeps persistent assignments only")
        self._store(assignment.backend_domain, assignment.ident, "*", "persistent", assignment.options)


class DeviceCollection43(DeviceCollection):
    def get_assigned_devices(self, required_only=False):
        for backend, port, dev, mode, options in self._vm._devices.get(self._class, []):
            a = DeviceAssignment43.new(self._vm.app.domains[backend], port, self._class,
                                       None if dev == "*" else dev, frontend_domain=self._vm,
                                       options=dict(options), mode=mode)
            if not required_only or a.required:
                yield a

    def attach(self, assignment):
        if assignment.devclass == "pci":
            raise QubesValueError("PCI devices cannot be attached manually")
        raise QubesVMError("the double keeps assignments only")

    def assign(self, assignment):
        if assignment.devclass not in ("pci", "testclass", "block") and assignment.required:
            raise QubesValueError("Only pci and block devices can be assigned as required.")
        if assignment.devclass == "pci" and not assignment.required:
            raise QubesValueError("PCI devices cannot be assigned as not required.")
        if assignment.devclass != self._class:
            raise QubesValueError("Device class does not match to expected")
        if assignment.frontend_domain not in (None, self._vm):
            raise QubesValueError("Trying to assign device belonging to other domain")
        self._store(assignment.backend_domain, assignment.port_id, assignment.device_id,
                    assignment.mode.value, assignment.options)


class DeviceManager(dict):
    def __init__(self, vm):
        super().__init__()
        self._vm = vm

    def __missing__(self, key):
        self[key] = self._vm.app.release_classes["collection"](self._vm, key)
        return self[key]

    def __iter__(self):
        return iter(DEVICE_CLASSES)


# -- pools and volumes ----------------------------------------------------------

def _isodate(seconds):
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


def _copy(src, dst):
    """Qubes' _copy_file: a reflink copy where the filesystem can, else a sparse one."""
    subprocess.run(["cp", "--reflink=auto", "--sparse=always", str(src), str(dst)], check=True)


class FilePool:
    """driver file-reflink: ``<dir_path>/<vid>.img`` and its dirty, import
    and revision files; any filesystem will do (copies are reflinks where
    it can)."""

    def __init__(self, app, name, dir_path):
        self.app, self.name = app, name
        self.config = {"driver": "file-reflink", "dir_path": str(dir_path), "revisions_to_keep": "1"}
        Path(dir_path).mkdir(parents=True, exist_ok=True)

    driver = property(lambda self: self.config["driver"])
    volumes = property(lambda self: [v for vm in self.app.domains for v in vm.volumes.values() if v.pool == self.name])
    usage_details = property(lambda self: {"data_usage": sum(v.usage for v in self.volumes)})

    def vid(self, vm, volume):
        folder = "vm-templates" if vm.klass == "TemplateVM" else "appvms"
        return "%s/%s/%s" % (folder, vm.name, volume)

    def path(self, vid, kind=""):
        return Path(self.config["dir_path"]) / (vid + kind + ".img")

    def create(self, vid, size):
        path = self.path(vid)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.truncate(size)

    def revisions(self, vid):
        found = (p.name[len(self.path(vid).name) + 1:-1].split("@") for p in self.path(vid).parent.glob(
            self.path(vid).name + ".*@*Z"))
        return dict(sorted(found, key=lambda r: int(r[0])))

    def remove(self, vid):
        for kind in ("", "-dirty", "-import"):
            self.path(vid, kind).unlink(missing_ok=True)
        for rev, stamp in self.revisions(vid).items():
            Path("%s.%s@%sZ" % (self.path(vid), rev, stamp)).unlink()
        try:
            self.path(vid).parent.rmdir()
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTEMPTY):
                raise

    def live(self, vid):
        return self.path(vid, "-dirty")

    def size(self, vid):
        for kind in ("-dirty", ""):
            if self.path(vid, kind).exists():
                return self.path(vid, kind).stat().st_size
        raise QubesException("volume %s has no image" % vid)

    def resize(self, vid, size):
        for kind in ("-dirty", ""):
            if self.path(vid, kind).exists():
                with open(self.path(vid, kind), "r+b") as f:
                    f.truncate(size)
                return

    def start(self, vol):
        dirty = self.path(vol.vid, "-dirty")
        dirty.parent.mkdir(parents=True, exist_ok=True)
        if vol.save_on_stop and not dirty.exists():
            _copy(self.path(vol.vid), dirty)
        elif vol.snap_on_start:
            _copy(self.path(vol.source.vid), dirty)
        elif not vol.save_on_stop:
            with open(dirty, "wb") as f:
                f.truncate(vol._size)

    def stop(self, vol):
        dirty = self.path(vol.vid, "-dirty")
        if vol.save_on_stop and dirty.exists():
            self.commit(vol, dirty)
        else:
            dirty.unlink(missing_ok=True)

    def commit(self, vol, new):
        """The committed image becomes a revision, ``new`` the committed image."""
        clean, revisions = self.path(vol.vid), self.revisions(vol.vid)
        if vol.revisions_to_keep:
            number = int(list(revisions)[-1]) + 1 if revisions else 1
            _copy(clean, "%s.%d@%sZ" % (clean, number, _isodate(int(clean.stat().st_mtime))))
        for rev, stamp in list(self.revisions(vol.vid).items())[:-vol.revisions_to_keep or None]:
            Path("%s.%s@%sZ" % (clean, rev, stamp)).unlink()
        os.rename(new, clean)

    def replace(self, vol, stream, size):
        new = self.path(vol.vid, "-import")
        try:
            with open(new, "wb") as out:
                _feed(stream, out, size)
            self.commit(vol, new)
        finally:
            new.unlink(missing_ok=True)


def lvm(*argv):
    subprocess.run(argv, check=True, capture_output=True)


class LvmPool:
    """driver lvm_thin: thin volumes ``<vg>/vm-<name>-<volume>`` (needs lvm2)."""

    def __init__(self, app, name, vg, thin_pool):
        self.app, self.name = app, name
        self.config = {"driver": "lvm_thin", "volume_group": vg, "thin_pool": thin_pool, "revisions_to_keep": "1"}

    driver, volumes, usage_details = FilePool.driver, FilePool.volumes, FilePool.usage_details

    def vid(self, vm, volume):
        return "%s/vm-%s-%s" % (self.config["volume_group"], vm.name, volume)

    def path(self, vid, kind=""):
        return Path("/dev") / (vid + kind)

    def create(self, vid, size):
        lvm("lvcreate", "-q", "-V", "%db" % _round(size), "-T",
            "%s/%s" % (self.config["volume_group"], self.config["thin_pool"]), "-n", vid.split("/")[1])

    def _lvs(self, vid):
        out = subprocess.run(["lvs", "--noheadings", "-o", "lv_name", self.config["volume_group"]],
                             check=True, capture_output=True, text=True).stdout.split()
        name = vid.split("/")[1]
        return {lv for lv in out if lv == name or lv.startswith(name + "-")}

    def revisions(self, vid):
        name = vid.split("/")[1]
        return sorted(lv for lv in self._lvs(vid) if re.fullmatch(re.escape(name) + r"-\d+-back", lv))

    def remove(self, vid):
        for lv in sorted(self._lvs(vid)):
            lvm("lvremove", "-q", "-f", "%s/%s" % (self.config["volume_group"], lv))

    def live(self, vid):
        return self.path(vid, "-snap")

    def size(self, vid):
        for kind in ("-snap", ""):
            if self.path(vid, kind).exists():
                with open(self.path(vid, kind), "rb") as f:
                    return f.seek(0, 2)
        raise QubesException("volume %s is not active" % vid)

    def resize(self, vid, size):
        if _round(size) != self.size(vid):
            lvm("lvresize", "-q", "-f", "-L", "%db" % _round(size), vid)

    def start(self, vol):
        if vol.save_on_stop or vol.snap_on_start:
            source = vol.source.vid if vol.snap_on_start else vol.vid
            lvm("lvcreate", "-q", "-s", "-kn", "-ay", "-n", vol.vid.split("/")[1] + "-snap", source)

    def stop(self, vol):
        if vol.save_on_stop:
            self.commit(vol, vol.vid + "-snap")
        elif vol.snap_on_start:
            lvm("lvremove", "-q", "-f", vol.vid + "-snap")

    def commit(self, vol, new):
        name = vol.vid.split("/")[1]
        lvm("lvrename", "-q", vol.vid, "%s-%d-back" % (name, time.time_ns()))
        lvm("lvrename", "-q", new, name)
        for old in self.revisions(vol.vid)[:-vol.revisions_to_keep or None]:
            lvm("lvremove", "-q", "-f", "%s/%s" % (self.config["volume_group"], old))

    def replace(self, vol, stream, size):
        """Into a new thin volume, committed only when the data was whole."""
        new = vol.vid + "-import"
        self.create(new, size)
        try:
            with open(self.path(new), "r+b") as out:
                _feed(stream, out, size)
        except BaseException:
            lvm("lvremove", "-q", "-f", new)
            raise
        self.commit(vol, new)


def _round(size):
    return max(-(-size // (4 * MiB)) * 4 * MiB, 4 * MiB)


def _feed(stream, out, size):
    copied = 0
    while True:
        block = stream.read(1 << 20)
        if not block:
            break
        copied += len(block)
        if copied > size:
            raise QubesException("too much data (expected %d bytes)" % size)
        out.write(block)
    if copied != size:
        raise QubesException("not enough data (copied %d bytes, expected %d bytes)" % (copied, size))
    return copied


class Volume:
    def __init__(self, vm, name, pool, size, save_on_stop, snap_on_start, source=None):
        self.vm, self.name, self.pool = vm, name, pool.name
        self.vid = pool.vid(vm, name)
        self.save_on_stop, self.snap_on_start, self.source = save_on_stop, snap_on_start, source
        self.rw, self.revisions_to_keep = name != "root" or save_on_stop, 1
        self._pool, self._size = pool, size
        if save_on_stop:
            pool.create(self.vid, size)

    @property
    def path(self):
        """Double only: where the volume's committed data is."""
        return self._pool.path(self.vid)

    @property
    def live(self):
        """Double only: what the running qube writes."""
        if not self.vm.is_running():
            raise QubesVMError("%s is not running" % self.vm.name)
        return self._pool.live(self.vid)

    size = property(lambda self: self._pool.size(self.vid) if self.save_on_stop else self._size)
    usage = property(lambda self: os.stat(self.path).st_blocks * 512 if self.save_on_stop else 0)
    revisions = property(lambda self: self._pool.revisions(self.vid) if self.save_on_stop else {})

    def is_outdated(self):
        return False

    def resize(self, size, allow_shrink=False):
        if size < self.size and not allow_shrink:
            raise QubesValueError("shrinking is not allowed")
        self._pool.resize(self.vid, size)

    def import_data(self, stream):
        return self.import_data_with_size(stream, self.size)

    def import_data_with_size(self, stream, size):
        if not self.vm.is_halted():
            raise QubesVMError("%s is not halted" % self.vm.name)
        if not self.save_on_stop:
            raise QubesException("volume %s of %s is not persistent" % (self.name, self.vm.name))
        os.fstat(stream.fileno())  # qubesadmin hands the stream to a process: it must be a file
        self.vm.app.changes.append((self.vm.name, "import", self.name, size))
        self._pool.replace(self, stream, size)

    def clear_data(self):
        self.import_data_with_size(open(os.devnull, "rb"), 0)

    def revert(self, revision):
        raise QubesException("the double does not revert")


# -- qubes ----------------------------------------------------------------------

def _defaults(vm):
    """name -> default value of the properties a qube of this class has."""
    app, cls = vm.app, vm.klass
    found = {"label": None, "qid": vm._qid, "uuid": vm._uuid, "xid": -1, "start_time": "",
             "include_in_backups": True, "backup_timestamp": None, "debug": False}
    if cls == "AdminVM":
        return found
    found.update({"netvm": app.default_netvm if cls not in ("TemplateVM",) else None,
                  "default_dispvm": app.default_dispvm, "management_dispvm": None, "audiovm": "dom0",
                  "guivm": "dom0", "memory": 400, "maxmem": 4000, "vcpus": 2, "kernelopts": "",
                  "virt_mode": "pvh", "provides_network": False, "autostart": False, "qrexec_timeout": 60,
                  "default_user": "user", "ip": "10.137.0.%d" % vm._qid, "ip6": None,
                  "visible_ip": "10.137.0.%d" % vm._qid, "mac": "00:16:3e:5e:6c:00", "installed_by_rpm": False})
    if cls in ("AppVM", "DispVM"):
        found["template"] = None
    if cls == "AppVM":
        found["template_for_dispvms"] = False
    if cls == "DispVM":
        found["auto_cleanup"] = False
        found["include_in_backups"] = not vm._props.get("auto_cleanup", False)
    return found


class VM:
    _LOCAL = {"app", "name", "klass", "features", "tags", "firewall", "volumes", "devices", "fs", "_props",
              "_running", "_notes", "_qid", "_uuid", "_devices", "_procs"}

    def __init__(self, app, klass, name, qid):
        for key, value in (("app", app), ("name", name), ("klass", klass), ("_props", {}), ("_running", False),
                           ("_notes", ""), ("_qid", qid), ("_uuid", str(uuid.uuid4())), ("_devices", {}), ("_procs", []),
                           ("features", Features(self)), ("tags", Tags(self)), ("firewall", Firewall(self)),
                           ("devices", DeviceManager(self)), ("volumes", {}), ("fs", app.root / "vms" / name)):
            object.__setattr__(self, key, value)

    def __str__(self):
        return self.name

    def __repr__(self):
        return "<VM %s>" % self.name

    def __eq__(self, other):
        return self.name == (other.name if isinstance(other, VM) else other)

    def __hash__(self):
        return hash(self.name)

    def property_list(self):
        return sorted(_defaults(self))

    def property_is_default(self, name):
        if name not in _defaults(self):
            raise AttributeError(name)
        return name not in self._props

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        defaults = _defaults(self)
        if name not in defaults:
            raise AttributeError(name)
        value = self._props.get(name, defaults[name])
        if name == "label":
            return self.app.labels[value]
        if name in VM_PROPS:
            return None if value is None else self.app.domains[value]
        if name == "backup_timestamp" and value is None:
            raise AttributeError(name)  # qubesadmin: an int property without a value
        return value

    def __setattr__(self, name, value):
        if name in self._LOCAL:
            raise QubesException("%s cannot be set" % name)
        defaults = _defaults(self)
        if name not in defaults:
            raise QubesException("%s has no property %s" % (self.name, name))
        if name in READ_ONLY:
            raise QubesException("property %s is read-only" % name)
        self._props[name] = value = self._check(name, value, defaults[name])
        self.app.changes.append((self.name, "property", name, value))

    def _check(self, name, value, default):
        """The value as qubesd would store it from str(value), or refuse it."""
        if name == "label":
            if str(value) not in self.app.labels:
                raise QubesLabelNotFoundError("no such label %s" % value)
            return str(value)
        if name in VM_PROPS:
            value = None if value in (None, "") else str(value)
            target = self.app.domains[value] if value is not None else None
            if name == "netvm" and target is not None and not target.provides_network:
                raise QubesValueError("The %s qube does not provide network" % value)
            if name == "template":
                if not self.is_halted():
                    raise QubesVMError("cannot change the template of a running qube")
                if target.klass != ("TemplateVM" if self.klass == "AppVM" else "AppVM") or \
                        (self.klass == "DispVM" and not target.template_for_dispvms):
                    raise QubesValueError("%s cannot be the template of %s" % (value, self.name))
            return value
        if name == "kernelopts" and len(str(value or "")) > 512:
            raise QubesValueError("Kernelopts value too long (512 chars max)")
        if name == "mac" and not re.match(r"\A([0-9a-f][0-9a-f]:){5}[0-9a-f][0-9a-f]\Z", str(value).lower()):
            raise QubesValueError("Invalid MAC address value")
        if name in ("ip", "ip6"):
            return str((ipaddress.IPv4Address if name == "ip" else ipaddress.IPv6Address)(str(value)))
        if name == "backup_timestamp":
            return int(str(value))
        if isinstance(default, bool):
            if str(value) not in ("True", "False"):
                raise QubesValueError("%s takes True or False" % name)
            return str(value) == "True"
        if isinstance(default, int):
            return int(str(value))
        return None if value is None else str(value)

    def is_running(self):
        return self._running

    def is_halted(self):
        return not self._running

    def start(self):
        """admin.vm.Start: the volumes start as in the pool's driver."""
        if self._running:
            return
        if RESTORING in self.tags:
            raise QubesVMError("Restore of this domain in progress, cannot start")
        for vol in self.volumes.values():
            vol._pool.start(vol)
        object.__setattr__(self, "_running", True)

    def shutdown(self, force=False, wait=False):
        if not self._running:
            return
        object.__setattr__(self, "_running", False)
        for vol in self.volumes.values():
            vol._pool.stop(vol)

    kill = shutdown

    def run_service(self, service, user=None, *, filter_esc=False, localcmd=None, wait=True, autostart=True,
                    **popen_kwargs):
        if autostart:
            self.start()
        elif not self._running:
            raise QubesVMError("%s is not running" % self.name)
        self.app.service_calls.append((self.name, service))
        command = self.app.services.get(service.split("+")[0], ["false"])  # qrexec: no such service
        arg = service.partition("+")[2]
        self.fs.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, HOME=str(self.fs), **self.app.service_env)
        for stream in ("stdin", "stdout", "stderr"):
            popen_kwargs.setdefault(stream, subprocess.PIPE)
        return subprocess.Popen(command + ([arg] if arg else []), cwd=self.fs, env=env, **popen_kwargs)


class VM43(VM):
    """R4.3 adds qube notes (qubesadmin 4.3.17)."""

    def get_notes(self):
        return self._notes

    def set_notes(self, text):
        self.app.changes.append((self.name, "notes", text))
        object.__setattr__(self, "_notes", text)


class Disposable:
    """A DispVM (mixed into the release's VM class): its service processes
    end with it, and auto_cleanup removes it."""

    def run_service(self, service, user=None, **kwargs):
        proc = super().run_service(service, user=user, **kwargs)
        self._procs.append((service, user, proc))
        return proc

    def kill(self):
        if not self._running:
            raise QubesVMError("%s is not running" % self.name)  # QubesVMNotStartedError
        for _service, _user, proc in self._procs:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        super().shutdown()
        if self.auto_cleanup and self.name in self.app.domains:
            del self.app.domains[self.name]

    def shutdown(self, force=False, wait=False):
        self.kill()


class Domains:
    def __init__(self):
        self._vms = {}

    def __getitem__(self, name):
        if str(name) not in self._vms:
            raise QubesVMNotFoundError("No such domain: %r" % str(name))
        return self._vms[str(name)]

    def __contains__(self, name):
        return str(name) in self._vms

    def __iter__(self):
        return iter(list(self._vms.values()))

    def __len__(self):
        return len(self._vms)

    def clear_cache(self):
        pass

    def __delitem__(self, name):
        """qvm-remove: the qube and its volumes (not a template in use)."""
        users = [vm.name for vm in self._vms.values() if vm._props.get("template") == str(name)]
        if users:
            raise QubesException("%s is the template of %s" % (name, ", ".join(users)))
        vm = self._vms[str(name)]
        if vm.is_running():
            raise QubesVMError("%s is running" % name)
        del self._vms[str(name)]
        for vol in vm.volumes.values():
            vol._pool.remove(vol.vid)


RELEASES = {
    "4.2": {"vm": VM, "dispvm": type("DisposableVM", (Disposable, VM), {}), "collection": DeviceCollection42,
            "assignment": DeviceAssignment42},
    "4.3": {"vm": VM43, "dispvm": type("DisposableVM43", (Disposable, VM43), {}),
            "collection": DeviceCollection43, "assignment": DeviceAssignment43},
}


class QubesDouble:
    def __init__(self, root, pool_dir=None, release="4.3"):
        self.root, self.release = Path(root), release
        self.release_classes = RELEASES[release]
        self.changes, self.service_calls = [], []
        self.services = {"wyng.Agent": [str(AGENT)], "wyng.Browse": [str(BROWSE)], "qubes.UpdateAppMenusFor": ["true"]}
        self.service_env = {}
        self.labels = {name: Label(name) for name in LABELS}
        self.domains = Domains()
        self.pools = {}
        self.add_pool(FilePool(self, "varlibqubes", pool_dir or self.root / "pool"))
        self.default_pool = "varlibqubes"
        self.default_netvm = self.default_dispvm = None
        self._qids = itertools.count(1)
        dom0 = self.release_classes["vm"](self, "AdminVM", "dom0", 0)
        dom0._props["label"] = "black"
        object.__setattr__(dom0, "_running", True)
        self.domains._vms["dom0"] = dom0
        self.install()

    def install(self):
        """Make ``import qubesadmin`` give this release's modules, and
        ``qubesadmin.Qubes()`` this double."""
        exc = types.ModuleType("qubesadmin.exc")
        for cls in (QubesException, QubesValueError, QubesVMNotFoundError, QubesLabelNotFoundError,
                    QubesVMError, ProtocolError):
            setattr(exc, cls.__name__, cls)
        devices = types.ModuleType("qubesadmin.devices")
        devices.DeviceAssignment = self.release_classes["assignment"]
        top = types.ModuleType("qubesadmin")
        top.exc, top.devices, top.Qubes = exc, devices, lambda: self
        sys.modules.update({"qubesadmin": top, "qubesadmin.exc": exc, "qubesadmin.devices": devices})

    @staticmethod
    def uninstall():
        for name in ("qubesadmin", "qubesadmin.exc", "qubesadmin.devices"):
            sys.modules.pop(name, None)

    def add_pool(self, pool):
        """Double only (qvm-pool add)."""
        self.pools[pool.name] = pool
        return pool

    def get_label(self, name):
        if str(name) not in self.labels:
            raise QubesLabelNotFoundError("Label does not exist: %s" % name)
        return self.labels[str(name)]

    def add_new_vm(self, cls, name, label, template=None, pool=None, pools=None):
        if cls not in ("AppVM", "DispVM", "StandaloneVM", "TemplateVM"):
            raise QubesException("no such class %s" % cls)
        if name in self.domains or not name or len(name) > 31:
            raise QubesValueError("qube %s exists or is not a valid name" % name)
        if (template is None) != (cls in ("StandaloneVM", "TemplateVM")):
            raise QubesException("%s %s template" % (cls, "needs a" if template is None else "takes no"))
        vm = self.release_classes["dispvm" if cls == "DispVM" else "vm"](self, cls, name, next(self._qids))
        vm._props["label"] = str(self.get_label(label))
        set.add(vm.tags, "created-by-dom0")
        if template is not None:
            vm._check("template", template, None)
            vm._props["template"] = str(template)
        self.domains._vms[name] = vm
        target = self.pools[pool or self.default_pool]
        persistent_root = cls in ("StandaloneVM", "TemplateVM")
        tpl = self.domains[template] if template is not None else None
        for volume, size, saved, snap in (("root", 8 * MiB, persistent_root, not persistent_root),
                                          ("private", 2 * MiB, cls != "DispVM", cls == "DispVM"),
                                          ("volatile", 1 * MiB, False, False)):
            source = tpl.volumes[volume] if snap else None
            while source is not None and source.snap_on_start:  # a disposable's root: its template's template's
                source = source.source
            vm.volumes[volume] = Volume(vm, volume, target, size, saved, snap, source)
        self.changes.append((name, "created", cls))
        return vm


# -- a small Qubes system for tests --------------------------------------------------

def build_system(app, pool=None, seed=1, unit=MiB):
    """Two templates, sys-net with a PCI device and sys-usb (a named
    disposable) with another, sys-firewall, app qubes with settings of every
    kind (USB, block and microphone assignments among them), a standalone,
    a disposable template and a named disposable, and the backup qube
    sys-backup; random data in every saved volume (sizes are multiples of
    ``unit``, plus an odd 4 KiB on one)."""
    import random
    rng = random.Random(seed)

    def new(cls, name, label, template=None, **props):
        vm = app.add_new_vm(cls, name, label, template=template, pool=pool)
        for key, value in props.items():
            setattr(vm, key, value)
        return vm
    new("TemplateVM", "fedora-40", "black")
    new("TemplateVM", "debian-12", "gray").features["os"] = "Linux"
    net = new("AppVM", "sys-net", "red", "fedora-40", provides_network=True, netvm=None, memory=500,
              mac="00:16:3e:5e:6c:aa")
    new("AppVM", "sys-firewall", "green", "fedora-40", provides_network=True, netvm="sys-net")
    app.default_netvm = "sys-firewall"
    new("AppVM", "default-dvm", "red", "debian-12", template_for_dispvms=True)
    app.default_dispvm = "default-dvm"
    usb = new("DispVM", "sys-usb", "red", "default-dvm", netvm=None, virt_mode="hvm")
    assign(app, net, "pci", "dom0", "00_14.3", "required", {"no-strict-reset": "True"})
    assign(app, usb, "pci", "dom0", "00_0d.0", "required")
    work = new("AppVM", "work", "blue", "fedora-40", memory=800, maxmem=3000, kernelopts="nopat quiet",
               default_dispvm="default-dvm", autostart=True)
    work.features["service.crond"] = "1"
    work.features["menu-items"] = "firefox.desktop org.gnome.Nautilus.desktop"
    work.tags.add("project-x")
    work.firewall.save_rules([Rule("action=accept proto=tcp dsthost=example.com dstports=443-443"),
                              Rule("action=accept specialtarget=dns"), Rule("action=drop")])
    assign(app, work, "usb", "sys-usb", "2-1", "auto-attach")
    assign(app, work, "mic", "dom0", "mic", "auto-attach")
    vault = new("AppVM", "vault", "black", "debian-12", netvm=None, vcpus=1)
    assign(app, vault, "block", "sys-usb", "sda", "ask-to-attach", {"read-only": "yes"})
    if hasattr(work, "set_notes"):
        work.set_notes("work: keep the tax records here\nsecond line")
        vault.set_notes("offline")
    new("StandaloneVM", "legacy", "purple", virt_mode="hvm", kernelopts="")
    new("DispVM", "disp-web", "orange", "default-dvm")
    new("AppVM", "sys-backup", "yellow", "fedora-40", include_in_backups=False)
    for vm in app.domains:
        for name, vol in sorted(vm.volumes.items()):
            if vol.save_on_stop:
                grow = 4 * unit if name == "root" else unit * rng.randint(1, 3)
                vol.resize(grow + (4096 if (vm.name, name) == ("work", "private") and unit == MiB else 0),
                           allow_shrink=True)
                scribble(vol, rng)
    app.changes.clear()
    return app


def assign(app, vm, cls, backend, port, mode, options=None):
    """A device assignment in the release's own form (R4.2: a persistent attachment)."""
    make = app.release_classes["assignment"]
    if app.release == "4.2":
        vm.devices[cls].attach(make(app.domains[backend], port, options, persistent=True))
    else:
        vm.devices[cls].assign(make.new(app.domains[backend], port, cls, options=options, mode=mode))


def assignments(vm):
    """Double only: a qube's assignments as (class, backend, port, mode, options), sorted."""
    return sorted((cls, b, p, m, tuple(sorted(o.items()))) for cls, found in vm._devices.items()
                  for b, p, _d, m, o in found)


def scribble(vol, rng, count=3, path=None):
    """Random data at ``count`` random places of a volume's committed data
    (or of ``path``: ``vol.live`` for a running qube's writes); the rest
    stays as it was."""
    with open(path or vol.path, "r+b") as f:
        size = f.seek(0, 2)
        for _ in range(count):
            offset = rng.randrange(0, size - 4096)
            f.seek(offset)
            f.write(rng.randbytes(min(size - offset, rng.choice((4096, 100000, 300000)))))
