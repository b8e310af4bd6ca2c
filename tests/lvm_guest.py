"""A small qemu guest with real lvm2 and dm-thin, for tests.

The machines that run the tests have no device-mapper in their kernel, so
lvm2 runs in a guest instead (facts in lvm-guest.md):

- the host's Debian kernel, booted uncompressed through its PVH entry point,
  with a tiny initramfs: static busybox, the needed modules (signatures
  stripped) and an ``/init`` that mounts the shares; both are built on first
  use and cached under ``$WYNG_GUEST_CACHE`` (default ``/var/tmp/qubes-wyng-guest``),
  keyed by kernel version;
- the host's ``/`` shared read-only over 9p, with a tmpfs overlay on top and a
  chroot into it: the guest has the host's lvm2, thin tools, Python and this
  checkout at the same paths, and everything it writes there is thrown away;
- one run directory per boot, shared read-write at its host path, holding the
  script and receiving its stdout, stderr and exit status;
- sparse host files as virtio disks (``/dev/vda``, ``/dev/vdb``, ...) that
  persist across the runs of one ``Guest``, so a later boot sees what an
  earlier one wrote.

    guest = Guest(tmp_path / "guest")
    result = guest.run("pvcreate -qy $DISK_pool; ...", disks=[("pool", 1 << 30)], timeout=120)
    assert result.returncode == 0, result
    guest.close()

Software emulation only (TCG): the nested KVM here cannot run a stock kernel.
A boot takes a few seconds; Python in the guest is 10-20 times slower than on
the host, so do many checks per boot.
"""
import ctypes
import fcntl
import gzip
import hashlib
import lzma
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

CACHE = Path(os.environ.get("WYNG_GUEST_CACHE", "/var/tmp/qubes-wyng-guest"))
REPO = Path(__file__).resolve().parent.parent
QEMU = "qemu-system-x86_64"
BUSYBOX = "/bin/busybox"
# dm_log_writes, ext4 and virtio_net: the power-loss test (tests/test_power_loss.py)
MODULES = ("virtio_pci", "virtio_blk", "9pnet_virtio", "9p", "overlay", "dm_thin_pool", "dm_snapshot", "loop",
           "dm_log_writes", "ext4", "virtio_net")
HOST_TOOLS = ("modprobe", "lvm", "dmsetup", "thin_delta")
SIGNATURE = b"~Module signature appended~\n"
DISK_NAME = re.compile(r"[a-z][a-z0-9_]{0,30}$")

# The initramfs's /init: load modules, mount the shares, overlay the host's
# root, chroot into it and run the run directory's stage2.sh, power off.
INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
fail() { echo "wyng-guest: $*"; sync; poweroff -f; sleep 10; }
while read -r file params; do
    insmod "/m/$file" $params 2>/dev/null || echo "wyng-guest: insmod $file failed"
done < /modules
o=trans=virtio,version=9p2000.L,msize=512000
mount -t 9p -o $o,cache=mmap run /run9p || fail "cannot mount the run share"
. /run9p/guest.env || fail "no guest.env in the run share"
mount -t 9p -o $o,ro hostroot /host || fail "cannot mount the host root"
mount -t tmpfs -o mode=755 tmpfs /ovl && mkdir /ovl/up /ovl/work
mount -t overlay -o lowerdir=/host,upperdir=/ovl/up,workdir=/ovl/work overlay /new || fail "cannot make the overlay"
mount -t proc proc /new/proc && mount -t sysfs sysfs /new/sys && mount -t devtmpfs devtmpfs /new/dev &&
  mkdir -p /new/dev/pts /new/dev/shm && mount -t devpts devpts /new/dev/pts && mount -t tmpfs tmpfs /new/dev/shm &&
  mount -t tmpfs -o mode=755 tmpfs /new/run || fail "cannot mount /proc, /sys, /dev, /run"
mount -o bind /run9p "/new$WYNG_RUN" || fail "cannot bind the run share to $WYNG_RUN"
chroot /new /bin/sh "$WYNG_RUN/stage2.sh"
echo "wyng-guest: stage 2 ended ($?)"
sync
poweroff -f
sleep 10
"""

# stage2.sh, in the chroot; %(...)s are shell-quoted by Guest.run
STAGE2 = r"""# written by tests/lvm_guest.py for one boot
run=%(run)s
cut -d' ' -f1 /proc/uptime > "$run/booted"
mkdir -p /run/lock/lvm /run/lvm /etc/lvm/archive /etc/lvm/backup
cat >> /etc/lvm/lvm.conf <<'EOF'
activation { udev_sync = 0 udev_rules = 0 monitoring = 0 }
devices { obtain_device_list_from_udev = 0 use_devicesfile = 0 }
backup { archive = 0 }
EOF
export PATH=%(path)s HOME=/root LC_ALL=C.UTF-8 LVM_SUPPRESS_FD_WARNINGS=1
export PYTHONPATH=%(pythonpath)s PYTHON=%(python)s WYNG_OUT="$run" REPO=%(repo)s %(disks)s
cd "$REPO"
/bin/sh -e "$run/script.sh" > "$run/stdout" 2> "$run/stderr" < /dev/null
echo $? > "$run/status"
{ vgchange -an; sync; } > "$run/teardown.log" 2>&1
"""


class GuestError(Exception):
    """The guest could not be built, did not boot or did not finish."""


def kernel_version():
    """The kernel to boot: $WYNG_GUEST_KERNEL or the newest in /boot with modules."""
    wanted = os.environ.get("WYNG_GUEST_KERNEL")
    if wanted:
        return wanted
    found = [p.name[len("vmlinuz-"):] for p in Path("/boot").glob("vmlinuz-*")]
    found = [v for v in found if Path("/lib/modules", v, "modules.dep").exists()]
    if not found:
        return None
    return max(found, key=lambda v: [int(n) if n.isdigit() else n for n in re.split(r"(\d+)", v)])


def missing():
    """What this machine lacks to run a guest (empty if nothing)."""
    lack = [t for t in (QEMU,) + HOST_TOOLS if not shutil.which(t)]
    ver = kernel_version()
    if not ver:
        lack.append("a kernel in /boot with modules in /lib/modules (linux-image-amd64)")
    if not os.access(BUSYBOX, os.X_OK):
        lack.append("static busybox at %s (busybox-static)" % BUSYBOX)
    return lack


def extract_vmlinux(bzimage):
    """The ELF kernel inside a bzImage (its payload is an xz, gzip or zstd stream)."""
    for magic, unpack in ((b"\xfd7zXZ\x00", _unxz), (b"\x1f\x8b\x08", _gunzip), (b"\x28\xb5\x2f\xfd", _unzstd)):
        start = bzimage.find(magic)
        while start >= 0:
            try:
                elf = unpack(bzimage[start:])
            except (lzma.LZMAError, zlib.error, EOFError, OSError, subprocess.CalledProcessError):
                elf = None
            if elf and elf[:4] == b"\x7fELF":
                return elf
            start = bzimage.find(magic, start + 1)
    raise GuestError("no xz, gzip or zstd compressed ELF kernel found in the bzImage")


def _unxz(data):
    return lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(data)


def _gunzip(data):
    return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)


def _unzstd(data):
    if not shutil.which("zstd"):
        return None
    done = subprocess.run(["zstd", "-dc"], input=data, capture_output=True)
    return done.stdout  # zstd complains about trailing data, but the output is whole


def module_files(ver):
    """(path, parameters) of MODULES and their dependencies, in load order."""
    seen, order = set(), []
    for name in MODULES:
        done = subprocess.run(["modprobe", "-S", ver, "--show-depends", name], capture_output=True, text=True)
        if done.returncode:
            raise GuestError("modprobe --show-depends %s: %s" % (name, done.stderr.strip()))
        for line in done.stdout.splitlines():
            words = line.split()
            # CPU-specific variants (crc32c-intel, ...) fail on the emulated
            # CPU and have generic fallbacks in the list: leave them out
            if words[:1] == ["insmod"] and words[1] not in seen and "/kernel/arch/" not in words[1]:
                seen.add(words[1])
                order.append((words[1], " ".join(words[2:])))
    return order


def read_module(path):
    """A module's bytes, decompressed and without its appended signature."""
    data = Path(path).read_bytes()
    if path.endswith(".xz"):
        data = lzma.decompress(data)
    elif path.endswith(".gz"):
        data = gzip.decompress(data)
    elif path.endswith(".zst"):
        data = subprocess.run(["zstd", "-dc", path], capture_output=True, check=True).stdout
    if data.endswith(SIGNATURE):
        # struct module_signature (12 bytes, signature length last, big
        # endian) sits between the signature and the marker
        info = data[-len(SIGNATURE) - 12:-len(SIGNATURE)]
        data = data[:-len(SIGNATURE) - 12 - int.from_bytes(info[8:12], "big")]
    return data


def cpio(entries):
    """A newc cpio archive of (name, mode, data, (rdev major, minor)) entries."""
    out = bytearray()
    for ino, (name, mode, data, rdev) in enumerate(list(entries) + [("TRAILER!!!", 0, b"", (0, 0))], 1):
        name = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name), 0)
        out += b"070701" + b"".join(b"%08X" % f for f in fields) + name
        out += b"\0" * (-len(out) % 4) + data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def initramfs(ver):
    entries = [(d, 0o40755, b"", (0, 0)) for d in ("bin", "dev", "proc", "sys", "m", "host", "run9p", "ovl", "new")]
    entries.append(("dev/console", 0o20600, b"", (5, 1)))
    entries.append(("bin/busybox", 0o100755, Path(BUSYBOX).read_bytes(), (0, 0)))
    entries.append(("init", 0o100755, INIT.encode(), (0, 0)))
    lines = []
    for n, (path, params) in enumerate(module_files(ver)):
        name = "%02d-%s.ko" % (n, os.path.basename(path).split(".ko")[0])
        entries.append(("m/" + name, 0o100644, read_module(path), (0, 0)))
        lines.append(("%s %s" % (name, params)).strip() + "\n")
    entries.append(("modules", 0o100644, "".join(lines).encode(), (0, 0)))
    return cpio(entries)


def build(ver=None):
    """(vmlinux, initramfs) paths for kernel ``ver``, built once and cached."""
    ver = ver or kernel_version()
    if not ver:
        raise GuestError("no kernel with modules found in /boot and /lib/modules")
    vmlinuz = Path("/boot", "vmlinuz-" + ver)
    # any change to this file, the kernel or busybox makes a new build
    recipe = hashlib.sha256(repr((Path(__file__).read_bytes(), INIT, MODULES, [
        (p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in (vmlinuz, BUSYBOX)])).encode()).hexdigest()[:12]
    home = CACHE / ver
    done = home / recipe
    kernel, initrd = done / "vmlinux", done / "initramfs.cpio"
    if kernel.exists() and initrd.exists():
        os.utime(done)  # in use: see the pruning below
        return kernel, initrd
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if kernel.exists() and initrd.exists():
            return kernel, initrd  # another process built it meanwhile
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=home))
        os.chmod(work, 0o755)
        try:
            (work / "vmlinux").write_bytes(extract_vmlinux(vmlinuz.read_bytes()))
            (work / "initramfs.cpio").write_bytes(initramfs(ver))
            os.rename(work, done)
            for old in home.iterdir():  # other recipes (other checkouts) unused for a week
                if old.is_dir() and old != done and time.time() - old.stat().st_mtime > 7 * 86400:
                    shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return kernel, initrd


class Result:
    """One boot: the script's exit status and output, the run directory."""

    def __init__(self, run_dir, returncode, seconds):
        self.dir = run_dir
        self.returncode = returncode
        self.seconds = seconds          # host wall time of the whole boot
        self.stdout = self.read("stdout")
        self.stderr = self.read("stderr")
        booted = self.read("booted").strip()
        self.boot_seconds = float(booted) if booted else None  # guest uptime when the script started

    def read(self, name):
        try:
            return (self.dir / name).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def console(self):
        return self.read("console.log")

    def __str__(self):
        boot = "?" if self.boot_seconds is None else "%.1f" % self.boot_seconds
        return "guest script exit %s after %.1f s (script started %s s after boot)\n--- stdout\n%s\n--- stderr\n%s" % (
            self.returncode, self.seconds, boot, self.stdout[-3000:], self.stderr[-3000:])


def _die_with_parent():
    """In the qemu child: be killed if the test process dies."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Guest:
    """Boots the guest, once per ``run``; owns the disk images."""

    def __init__(self, workdir=None, memory_mb=1024, kernel=None):
        self.own_dir = workdir is None
        self.dir = Path(tempfile.mkdtemp(prefix="wyng-guest-") if workdir is None else workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.memory_mb = memory_mb
        self.kernel = kernel
        self.disks = {}   # name -> path of its sparse image
        self.runs = 0

    def disk(self, name, size):
        """The image of disk ``name``, made sparse (or resized) to ``size`` bytes."""
        if not DISK_NAME.match(name):
            raise GuestError("disk names are lower case letters, digits and _: %r" % name)
        path = self.disks.setdefault(name, self.dir / ("disk-%s.img" % name))
        if not path.exists() or path.stat().st_size != size:
            with open(path, "ab") as f:
                f.truncate(size)
        return path

    def run(self, script, disks=(), timeout=120, env=None, qemu_args=()):
        """Boot, run ``script`` with ``/bin/sh -e`` as root in the chroot, with
        cwd at the checkout, and power off; returns a ``Result``.

        ``disks`` are (name, size in bytes), attached in order as /dev/vda,
        /dev/vdb, ... and named in the script's environment as $DISK_<name>.
        The script also gets $WYNG_OUT (the run directory, shared with the
        host: write results there), $REPO, $PYTHON (this interpreter) and
        PYTHONPATH with the checkout's dom0 and backupvm. ``env`` adds
        variables, ``qemu_args`` devices (a network, say). The whole boot
        is bounded by ``timeout`` seconds."""
        kernel, initrd = build(self.kernel)
        self.runs += 1
        run_dir = self.dir / ("run%d" % self.runs)
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir()
        if re.search(r"[\s,'\"$`\\]", str(run_dir)):
            raise GuestError("the run directory's path must be plain: %s" % run_dir)
        drives, variables = [], dict(env or {})
        for n, (name, size) in enumerate(disks):
            image = self.disk(name, size)
            drives += ["-drive", "file=%s,if=virtio,format=raw,cache=unsafe,discard=unmap" % _qemu_path(image)]
            variables["DISK_" + name] = "/dev/vd" + "abcdefghijklmnopqrstuvwxyz"[n]
        python_dir = os.path.dirname(sys.executable)
        (run_dir / "guest.env").write_text("WYNG_RUN=%s\n" % shlex.quote(str(run_dir)))
        (run_dir / "script.sh").write_text(script)
        (run_dir / "stage2.sh").write_text(STAGE2 % {
            "run": shlex.quote(str(run_dir)),
            "repo": shlex.quote(str(REPO)),
            "python": shlex.quote(sys.executable),
            "path": shlex.quote(python_dir + ":/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
            "pythonpath": shlex.quote("%s/dom0:%s/backupvm" % (REPO, REPO)),
            "disks": " ".join("%s=%s" % (k, shlex.quote(str(v))) for k, v in variables.items()),
        })
        cmd = [QEMU, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
               "-accel", "tcg,thread=multi", "-smp", "1", "-m", str(self.memory_mb),
               "-kernel", str(kernel), "-initrd", str(initrd),
               "-append", "console=ttyS0 quiet panic=-1 cryptomgr.notests",
               "-serial", "file:%s" % (run_dir / "console.log"),
               "-fsdev", "local,id=hostroot,path=/,security_model=passthrough,readonly=on,multidevs=remap",
               "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
               "-fsdev", "local,id=run,path=%s,security_model=passthrough,multidevs=remap" % _qemu_path(run_dir),
               "-device", "virtio-9p-pci,fsdev=run,mount_tag=run"] + drives + list(qemu_args)
        start = time.monotonic()
        with open(run_dir / "qemu.log", "wb") as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    preexec_fn=_die_with_parent)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        seconds = time.monotonic() - start
        status = (run_dir / "status").read_text().strip() if (run_dir / "status").exists() else ""
        if not status.isdigit():
            why = "timed out after %d s" % timeout if proc.returncode == -signal.SIGKILL else \
                "stopped (qemu exit %s) before the script finished" % proc.returncode
            result = Result(run_dir, None, seconds)
            raise GuestError("guest %s; run directory %s\n--- qemu\n%s\n--- console (tail)\n%s%s" % (
                why, run_dir, result.read("qemu.log")[-2000:], result.console[-3000:],
                "".join("\n--- %s (tail)\n%s" % (n, t[-3000:]) for n, t in
                        (("stdout", result.stdout), ("stderr", result.stderr)) if t)))
        return Result(run_dir, int(status), seconds)

    def close(self):
        """Delete the disk images (and the work directory if Guest made it)."""
        for path in self.disks.values():
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        self.disks.clear()
        if self.own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _qemu_path(path):
    """A path as a qemu option value (commas doubled)."""
    return str(path).replace(",", ",,")
