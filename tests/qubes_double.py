"""A double of ``qubesadmin.Qubes`` with exactly the surface listed in
../shared/qubes-api.md, for tests (qubesadmin exists only in dom0).

    app = QubesDouble(tmp_path)            # dom0, labels, a file-reflink pool
    fedora = app.add_new_vm("TemplateVM", "fedora-40", "black")
    work = app.add_new_vm("AppVM", "work", "blue", template="fedora-40")
    qubeswyng.cli.main([...], app=app)

- Qubes hold properties with defaults like qubesd's (``property_is_default``
  is true until a value is set), refuse what qubesd refuses (read-only
  properties, unknown ones, a netvm that provides no network, a template of
  the wrong class, a volume import while running or with the wrong amount
  of data) and return VM and Label objects for properties of those types.
- Volumes live in pools: ``file-reflink`` (``<dir_path>/<vid>.img`` files,
  on any filesystem) or ``lvm_thin`` (real thin volumes, in the qemu guest).
  ``import_data_with_size`` reads the stream to the end and replaces the
  volume only if exactly ``size`` bytes came (qubesd's "not enough data").
- ``run_service('wyng.Agent')`` starts the real qubes-rpc/wyng.Agent over
  pipes, with cwd and HOME in ``<root>/vms/<name>``: the qube's filesystem.
- Disposables (``add_new_vm('DispVM', ...)`` from a template for dispvms,
  as qvm-backup-restore makes them): ``auto_cleanup``; ``kill`` of one that
  is not running fails, and ends the processes its services run (SIGTERM,
  so that a real wyng.Browse undoes its mounts on this host, where a real
  qube would just vanish); with auto_cleanup the qube is removed.
  ``run_service('wyng.Browse')`` runs the real qubes-rpc/wyng.Browse.
- Every change to a qube is appended to ``app.changes``.
"""
import itertools
import os
import subprocess
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
AGENT = REPO / "qubes-rpc" / "wyng.Agent"
BROWSE = REPO / "qubes-rpc" / "wyng.Browse"
LABELS = ("red", "orange", "yellow", "green", "gray", "blue", "purple", "black")
VM_PROPS = ("template", "netvm", "default_dispvm", "management_dispvm", "audiovm", "guivm")
READ_ONLY = ("qid", "uuid", "xid", "ip", "visible_ip", "start_time", "stubdom_xid")
MiB = 1 << 20


class DoubleError(Exception):
    """What qubesadmin.exc.QubesException stands for."""


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
            raise DoubleError("invalid firewall rule %r" % rule)
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


# -- pools and volumes ----------------------------------------------------------

class FilePool:
    """driver file-reflink: ``<dir_path>/<vid>.img``; any filesystem will do."""

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

    def path(self, vid):
        return Path(self.config["dir_path"]) / (vid + ".img")

    def create(self, vid, size):
        path = self.path(vid)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.truncate(size)

    def remove(self, vid):
        self.path(vid).unlink(missing_ok=True)

    def size(self, vid):
        return self.path(vid).stat().st_size

    def resize(self, vid, size):
        with open(self.path(vid), "r+b") as f:
            f.truncate(size)

    def replace(self, vid, stream, size):
        temp = self.path(vid).with_suffix(".import")
        try:
            with open(temp, "wb") as out:
                copied = _copy(stream, out, size)
            os.rename(temp, self.path(vid))
        finally:
            temp.unlink(missing_ok=True)
        return copied


class LvmPool:
    """driver lvm_thin: thin volumes ``<vg>/vm-<name>-<volume>`` (needs lvm2)."""

    def __init__(self, app, name, vg, thin_pool):
        self.app, self.name = app, name
        self.config = {"driver": "lvm_thin", "volume_group": vg, "thin_pool": thin_pool, "revisions_to_keep": "1"}

    driver, volumes, usage_details = FilePool.driver, FilePool.volumes, FilePool.usage_details

    def vid(self, vm, volume):
        return "%s/vm-%s-%s" % (self.config["volume_group"], vm.name, volume)

    def path(self, vid):
        return Path("/dev") / vid

    def create(self, vid, size):
        subprocess.run(["lvcreate", "-q", "-V", "%db" % _round(size), "-T",
                        "%s/%s" % (self.config["volume_group"], self.config["thin_pool"]),
                        "-n", vid.split("/")[1]], check=True, capture_output=True)

    def remove(self, vid):
        subprocess.run(["lvremove", "-q", "-f", vid], check=True, capture_output=True)

    def size(self, vid):
        with open(self.path(vid), "rb") as f:
            return f.seek(0, 2)

    def resize(self, vid, size):
        if _round(size) != self.size(vid):
            subprocess.run(["lvresize", "-q", "-f", "-L", "%db" % _round(size), vid], check=True, capture_output=True)

    def replace(self, vid, stream, size):
        """Into a new thin volume, swapped in only when the data was whole."""
        new = vid + "-import"
        self.create(new, size)
        try:
            with open(self.path(new), "r+b") as out:
                copied = _copy(stream, out, size)
        except BaseException:
            self.remove(new)
            raise
        self.remove(vid)
        subprocess.run(["lvrename", "-q", new, vid.split("/")[1]], check=True, capture_output=True)
        return copied


def _round(size):
    return max(-(-size // (4 * MiB)) * 4 * MiB, 4 * MiB)


def _copy(stream, out, size):
    copied = 0
    while True:
        block = stream.read(1 << 20)
        if not block:
            break
        copied += len(block)
        if copied > size:
            raise DoubleError("too much data (expected %d bytes)" % size)
        out.write(block)
    if copied != size:
        raise DoubleError("not enough data (copied %d bytes, expected %d bytes)" % (copied, size))
    return copied


class Volume:
    def __init__(self, vm, name, pool, size, save_on_stop, snap_on_start, source=None):
        self.vm, self.name, self.pool = vm, name, pool.name
        self.vid = pool.vid(vm, name)
        self.save_on_stop, self.snap_on_start, self.source = save_on_stop, snap_on_start, source
        self.rw, self.revisions_to_keep, self.revisions = name != "root" or save_on_stop, 1, []
        self._pool = pool
        if save_on_stop:
            pool.create(self.vid, size)

    @property
    def path(self):
        """Double only: where the volume's committed data is."""
        return self._pool.path(self.vid)

    size = property(lambda self: self._pool.size(self.vid) if self.save_on_stop else 0)
    usage = property(lambda self: os.stat(self.path).st_blocks * 512 if self.save_on_stop else 0)

    def is_outdated(self):
        return False

    def resize(self, size, allow_shrink=False):
        if size < self.size and not allow_shrink:
            raise DoubleError("shrinking is not allowed")
        self._pool.resize(self.vid, size)

    def import_data(self, stream):
        return self.import_data_with_size(stream, self.size)

    def import_data_with_size(self, stream, size):
        if not self.vm.is_halted():
            raise DoubleError("%s is not halted" % self.vm.name)
        if not self.save_on_stop:
            raise DoubleError("volume %s of %s is not persistent" % (self.name, self.vm.name))
        os.fstat(stream.fileno())  # qubesadmin hands the stream to a process: it must be a file
        self.vm.app.changes.append((self.vm.name, "import", self.name, size))
        self._pool.replace(self.vid, stream, size)

    def clear_data(self):
        self.import_data_with_size(open(os.devnull, "rb"), 0)

    def revert(self, revision):
        raise DoubleError("the double keeps no revisions")


# -- qubes ----------------------------------------------------------------------

def _defaults(vm):
    """name -> default value of the properties a qube of this class has."""
    app, cls = vm.app, vm.klass
    found = {"label": None, "qid": vm._qid, "uuid": vm._uuid, "xid": -1, "start_time": "",
             "include_in_backups": cls != "DispVM", "backup_timestamp": None, "debug": False}
    if cls == "AdminVM":
        return found
    found.update({"netvm": app.default_netvm if cls not in ("TemplateVM",) else None,
                  "default_dispvm": app.default_dispvm, "management_dispvm": None, "audiovm": "dom0",
                  "guivm": "dom0", "memory": 400, "maxmem": 4000, "vcpus": 2, "kernelopts": "",
                  "virt_mode": "pvh", "provides_network": False, "autostart": False, "qrexec_timeout": 60,
                  "default_user": "user", "ip": "10.137.0.%d" % vm._qid, "visible_ip": "10.137.0.%d" % vm._qid,
                  "mac": "00:16:3e:5e:6c:%02x" % vm._qid, "installed_by_rpm": False})
    if cls in ("AppVM", "DispVM"):
        found["template"] = None
    if cls == "AppVM":
        found["template_for_dispvms"] = False
    if cls == "DispVM":
        found["auto_cleanup"] = False
    return found


class VM:
    _LOCAL = {"app", "name", "klass", "features", "tags", "firewall", "volumes", "fs", "_props", "_running",
              "_notes", "_qid", "_uuid"}

    def __init__(self, app, klass, name, qid):
        for key, value in (("app", app), ("name", name), ("klass", klass), ("_props", {}), ("_running", False),
                           ("_notes", ""), ("_qid", qid), ("_uuid", str(uuid.uuid4())),
                           ("features", Features(self)), ("tags", Tags(self)), ("firewall", Firewall(self)),
                           ("volumes", {}), ("fs", app.root / "vms" / name)):
            object.__setattr__(self, key, value)

    def __str__(self):
        return self.name

    def __repr__(self):
        return "<VM %s>" % self.name

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
            raise DoubleError("%s cannot be set" % name)
        defaults = _defaults(self)
        if name not in defaults:
            raise DoubleError("%s has no property %s" % (self.name, name))
        if name in READ_ONLY:
            raise DoubleError("property %s is read-only" % name)
        self._props[name] = value = self._check(name, value, defaults[name])
        self.app.changes.append((self.name, "property", name, value))

    def _check(self, name, value, default):
        """The value as qubesd would store it from str(value), or refuse it."""
        if name == "label":
            if str(value) not in self.app.labels:
                raise DoubleError("no such label %s" % value)
            return str(value)
        if name in VM_PROPS:
            value = None if value in (None, "") else str(value)
            target = self.app.domains[value] if value is not None else None
            if name == "netvm" and target is not None and not target.provides_network:
                raise DoubleError("%s does not provide network" % value)
            if name == "template":
                if not self.is_halted():
                    raise DoubleError("cannot change the template of a running qube")
                if target.klass != ("TemplateVM" if self.klass == "AppVM" else "AppVM") or \
                        (self.klass == "DispVM" and not target.template_for_dispvms):
                    raise DoubleError("%s cannot be the template of %s" % (value, self.name))
            return value
        if name == "backup_timestamp":
            return int(str(value))
        if isinstance(default, bool):
            if str(value) not in ("True", "False"):
                raise DoubleError("%s takes True or False" % name)
            return str(value) == "True"
        if isinstance(default, int):
            return int(str(value))
        return None if value is None else str(value)

    def is_running(self):
        return self._running

    def is_halted(self):
        return not self._running

    def start(self):
        """Double only (qvm-start)."""
        object.__setattr__(self, "_running", True)

    def shutdown(self, force=False, wait=False):
        object.__setattr__(self, "_running", False)

    kill = shutdown

    def get_notes(self):
        return self._notes

    def set_notes(self, text):
        self.app.changes.append((self.name, "notes", text))
        object.__setattr__(self, "_notes", text)

    def run_service(self, service, user=None, filter_esc=False, localcmd=None, wait=True, autostart=True,
                    **popen_kwargs):
        if not self._running:
            if not autostart:
                raise DoubleError("%s is not running" % self.name)
            self.start()
        self.app.service_calls.append((self.name, service))
        command = self.app.services.get(service, ["false"])  # qrexec: no such service
        self.fs.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, HOME=str(self.fs), **self.app.service_env)
        return subprocess.Popen(command, cwd=self.fs, env=env, **popen_kwargs)


class Domains:
    def __init__(self):
        self._vms = {}

    def __getitem__(self, name):
        if str(name) not in self._vms:
            raise KeyError(name)  # qubesadmin: QubesVMNotFoundError, a KeyError
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
            raise DoubleError("%s is the template of %s" % (name, ", ".join(users)))
        vm = self._vms.pop(str(name))
        for vol in vm.volumes.values():
            if vol.save_on_stop:
                vol._pool.remove(vol.vid)


class QubesDouble:
    def __init__(self, root, pool_dir=None):
        self.root = Path(root)
        self.changes, self.service_calls = [], []
        self.services = {"wyng.Agent": [str(AGENT)], "wyng.Browse": [str(BROWSE)]}
        self.service_env = {}
        self.labels = {name: Label(name) for name in LABELS}
        self.domains = Domains()
        self.pools = {}
        self.add_pool(FilePool(self, "varlibqubes", pool_dir or self.root / "pool"))
        self.default_pool = "varlibqubes"
        self.default_netvm = self.default_dispvm = None
        self._qids = itertools.count(1)
        dom0 = VM(self, "AdminVM", "dom0", 0)
        dom0._props["label"] = "black"
        self.domains._vms["dom0"] = dom0

    def add_pool(self, pool):
        """Double only (qvm-pool add)."""
        self.pools[pool.name] = pool
        return pool

    def get_label(self, name):
        return self.labels[str(name)]

    def add_new_vm(self, cls, name, label, template=None, pool=None, pools=None):
        if cls not in ("AppVM", "DispVM", "StandaloneVM", "TemplateVM"):
            raise DoubleError("no such class %s" % cls)
        if name in self.domains or not name or len(name) > 31:
            raise DoubleError("qube %s exists or is not a valid name" % name)
        if (template is None) != (cls in ("StandaloneVM", "TemplateVM")):
            raise DoubleError("%s %s template" % (cls, "needs a" if template is None else "takes no"))
        vm = (DisposableVM if cls == "DispVM" else VM)(self, cls, name, next(self._qids))
        vm._props["label"] = str(self.get_label(label))
        set.add(vm.tags, "created-by-dom0")
        if template is not None:
            vm._check("template", template, None)
            vm._props["template"] = str(template)
        self.domains._vms[name] = vm
        target = self.pools[pool or self.default_pool]
        persistent_root = cls in ("StandaloneVM", "TemplateVM")
        for volume, size, saved, snap in (("root", 8 * MiB, persistent_root, not persistent_root),
                                          ("private", 2 * MiB, cls != "DispVM", cls == "DispVM"),
                                          ("volatile", 1 * MiB, False, False)):
            vm.volumes[volume] = Volume(vm, volume, target, size, saved, snap)
        self.changes.append((name, "created", cls))
        return vm


class DisposableVM(VM):
    """A DispVM: its service processes end with it, and auto_cleanup removes it."""

    def __init__(self, *args):
        super().__init__(*args)
        object.__setattr__(self, "_procs", [])

    def run_service(self, service, user=None, **kwargs):
        proc = super().run_service(service, user=user, **kwargs)
        self._procs.append((service, user, proc))
        return proc

    def kill(self):
        if not self._running:
            raise DoubleError("%s is not running" % self.name)  # QubesVMNotStartedError
        object.__setattr__(self, "_running", False)
        for _service, _user, proc in self._procs:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.auto_cleanup and self.name in self.app.domains:
            del self.app.domains[self.name]

    def shutdown(self, force=False, wait=False):
        self.kill()


# -- a small Qubes system for tests --------------------------------------------------

def build_system(app, pool=None, seed=1, unit=MiB):
    """Two templates, sys-net and sys-firewall, app qubes with settings of
    every kind, a standalone, a disposable template and a named disposable,
    and the backup qube sys-backup; random data in every saved volume
    (sizes are multiples of ``unit``, plus an odd 4 KiB on one)."""
    import random
    rng = random.Random(seed)

    def new(cls, name, label, template=None, **props):
        vm = app.add_new_vm(cls, name, label, template=template, pool=pool)
        for key, value in props.items():
            setattr(vm, key, value)
        return vm
    new("TemplateVM", "fedora-40", "black")
    new("TemplateVM", "debian-12", "gray").features["os"] = "Linux"
    new("AppVM", "sys-net", "red", "fedora-40", provides_network=True, netvm=None, memory=500)
    new("AppVM", "sys-firewall", "green", "fedora-40", provides_network=True, netvm="sys-net")
    app.default_netvm = "sys-firewall"
    new("AppVM", "default-dvm", "red", "debian-12", template_for_dispvms=True)
    app.default_dispvm = "default-dvm"
    work = new("AppVM", "work", "blue", "fedora-40", memory=800, maxmem=3000, kernelopts="nopat quiet",
               default_dispvm="default-dvm", autostart=True)
    work.features["service.crond"] = "1"
    work.features["menu-items"] = "firefox.desktop org.gnome.Nautilus.desktop"
    work.tags.add("project-x")
    work.firewall.save_rules([Rule("action=accept proto=tcp dsthost=example.com dstports=443-443"),
                              Rule("action=accept specialtarget=dns"), Rule("action=drop")])
    work.set_notes("work: keep the tax records here\nsecond line")
    new("AppVM", "vault", "black", "debian-12", netvm=None, vcpus=1).set_notes("offline")
    new("StandaloneVM", "legacy", "purple", virt_mode="hvm", kernelopts="")
    new("DispVM", "disp-web", "orange", "default-dvm", include_in_backups=True)
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


def scribble(vol, rng, count=3):
    """Random data at ``count`` random places of a volume (the rest stays zeros)."""
    with open(vol.path, "r+b") as f:
        size = f.seek(0, 2)
        for _ in range(count):
            offset = rng.randrange(0, size - 4096)
            f.seek(offset)
            f.write(rng.randbytes(min(size - offset, rng.choice((4096, 100000, 300000)))))
