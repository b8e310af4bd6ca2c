"""Real ext4 filesystems in volume images, for the browse tests: made with
mkfs.ext4 (lazy, so a large sparse image costs little), written through a
loop mount, and read back as {path: sha256}.  Needs root."""
import contextlib
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

MiB = 1 << 20


def sh(*argv):
    done = subprocess.run(argv, capture_output=True, text=True)
    assert done.returncode == 0, "%s: %s" % (" ".join(map(str, argv)), done.stderr)
    return done.stdout.strip()


def mkfs(target, size=None):
    """ext4 on ``target`` (a new sparse image of ``size`` bytes, or a device)."""
    if size is not None:
        with open(target, "wb") as f:
            f.truncate(size)
    sh("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1", str(target))


def partitioned(image, size):
    """A GPT disk like a template's root volume: p1 BIOS boot (no
    filesystem), p2 a small ext4, p3 ext4 on the rest."""
    with open(image, "wb") as f:
        f.truncate(size)
    done = subprocess.run(["sfdisk", "-q", str(image)], capture_output=True, text=True,
                          input="label: gpt\n,1M,21686148-6449-6E6F-744E-656564454649\n,16M\n,\n")
    assert done.returncode == 0, done.stderr
    for n in (2, 3):
        with loop(image, n) as dev:
            mkfs(dev)


@contextlib.contextmanager
def loop(image, partition=None):
    """A loop device on ``image``, or on its partition N (an offset loop:
    the kernel here may not read partition tables)."""
    where = []
    if partition:
        rows = sh("partx", "--show", "--noheadings", "--output", "NR,START,SECTORS", str(image)).splitlines()
        _nr, start, count = next(map(int, r.split()) for r in rows if int(r.split()[0]) == partition)
        where = ["--offset", str(512 * start), "--sizelimit", str(512 * count)]
    dev = sh("losetup", "--find", "--show", *where, str(image))
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "--detach", dev])


@contextlib.contextmanager
def writable(image, partition=None):
    """The filesystem of ``image`` (or of its partition N) mounted read-write."""
    with loop(image, partition) as dev, tempfile.TemporaryDirectory(prefix="ext4-") as folder:
        sh("mount", "-o", "noinit_itable", dev, folder)
        try:
            yield Path(folder)
        finally:
            sh("umount", folder)


def tree(folder):
    """{relative path: sha256} of every regular file under ``folder``."""
    out = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d != "lost+found"]
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.file_digest(f, "sha256").hexdigest()
    return out


def write(folder, files):
    """Write {relative path: bytes}; None deletes the file."""
    for rel, data in files.items():
        path = Path(folder) / rel
        if data is None:
            path.unlink()
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def leftovers(under):
    """Mounts and loop devices that still use something under ``under``."""
    under = str(under)
    found = [line.split()[4] for line in open("/proc/self/mountinfo") if line.split()[4].startswith(under)]
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        if backing.read_text().strip().startswith(under):
            found.append("/dev/" + backing.parts[3])
    return found
