"""wyng.Browse: a session of a volume, read-only, fetched from dom0 as it
is read (doc/browse.md).

dom0 starts it with nothing on the command line, in a new disposable qube
(``qvm-wyng browse``, as root) or as a local process (``qvm-wyng mount``),
and answers its reads with chunks dom0 has checked.  dom0's first frame,
VOLUME, says what to do:

- with a mount point: present ``<mount point>/<volume>.img`` (FUSE) until
  it is unmounted;
- without: present the image in a folder of its own, attach it (or each
  of its partitions) to a read-only loop device, mount every filesystem
  found read-only without replaying its journal, open a file manager on
  them, and undo all of it when the file manager closes (the last,
  separable step: WYNG_BROWSE_OPEN names a command to run on the folder
  instead).

Filesystems are parsed here, never in dom0.  What goes to dom0 is READ
requests, NOTE lines for the user and, when it fails, ERR with the reason.
"""
import contextlib
import errno
import os
import pwd
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time

from . import wire
from .fuse import OneFile

VERSION = 1
VOLUME, READ, NOTE = 1, 2, 3
HEAD = struct.Struct(">HQQ")  # version, volume size, session time; then name NUL mount point
RANGE = struct.Struct(">QI")  # offset, length
MAX_READ = 1 << 20
ROOT = os.environ.get("WYNG_BROWSE_ROOT", "/run/qubes-wyng-browse")
SESSION_ENV = "/tmp/qubes-session-env"  # the GUI session's environment, written by qubes-gui-agent
SESSION_WAIT = 60
FILE_MANAGERS = (["nautilus", "--new-window"], ["thunar"], ["nemo"], ["caja"], ["dolphin"], ["pcmanfm"])
# options that keep the journal (or log) from being replayed on a read-only mount
NO_REPLAY = {"ext3": "noload", "ext4": "noload", "xfs": "norecovery,nouuid", "btrfs": "rescue=nologreplay"}
NOT_MOUNTED = ("swap", "LVM2_member", "crypto_LUKS", "linux_raid_member")


class Error(Exception):
    pass


class Dom0:
    """dom0's range server, over what were this process's stdin and stdout."""

    def __init__(self, rfd, wfd):
        self.rfd = rfd
        self.reader, self.writer = wire.Reader(rfd), wire.Writer(wfd)
        self.lock = threading.Lock()
        self.gone = False

    def volume(self):
        """(size, session time, image name, mount point or '') from VOLUME."""
        frame = self.reader.frame()
        if frame is None or frame[0] != VOLUME or len(frame[1]) < HEAD.size:
            raise Error("dom0 did not name a volume")
        version, size, when = HEAD.unpack_from(frame[1])
        if version != VERSION:
            raise Error("browse protocol %d is not supported (this is %d): update qubes-wyng" % (version, VERSION))
        name, _, path = frame[1][HEAD.size:].partition(b"\0")
        name = re.sub(r"[^A-Za-z0-9._+-]+", "-", name.decode("utf-8", "replace")).strip(".-") or "volume"
        return size, when, name, os.fsdecode(path)

    def read(self, offset, length):
        parts = []
        with self.lock:
            try:
                for start in range(offset, offset + length, MAX_READ):
                    n = min(MAX_READ, offset + length - start)
                    if self.gone:
                        raise EOFError
                    self.writer.send(READ, RANGE.pack(start, n))
                    frame = self.reader.frame()
                    if frame is None or frame[0] != wire.DATA or len(frame[1]) != n:
                        raise EOFError
                    parts.append(frame[1])
            except (OSError, EOFError, wire.ProtocolError):
                self.gone = True
                raise OSError(errno.EIO, "dom0 ended the session") from None
        return b"".join(parts)

    def say(self, text, op=NOTE):
        with self.lock, contextlib.suppress(OSError):
            self.writer.send(op, text.encode("utf-8", "replace")[:1000])


def run(*argv):
    """Run a tool; its output, or Error with its last line of errors."""
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if done.returncode:
        lines = (done.stderr or done.stdout).strip().splitlines() or ["exit status %d" % done.returncode]
        raise Error("%s: %s" % (argv[0], lines[-1]))
    return done.stdout.strip()


def present(dom0, size, when, name, target):
    """``qvm-wyng mount``: the image in ``target`` until it is unmounted."""
    fs = OneFile(name + ".img", size, when, dom0.read)
    fd = fs.mount(target)

    def gone():
        raise Error("dom0 ended the session")
    try:
        dom0.say("%s/%s.img is ready (read-only); unmount %s to end" % (target, name, target))
        fs.serve(fd, dom0.rfd, gone)
    finally:
        fs.unmount(target)
        os.close(fd)


def browse(dom0, size, when, name):
    """``qvm-wyng browse``: the volume's filesystems, read-only, in a file manager."""
    os.makedirs(ROOT, 0o755, exist_ok=True)
    base = tempfile.mkdtemp(prefix="browse-", dir=ROOT)
    os.chmod(base, 0o755)  # the file manager's user must reach the mounts
    image, top = os.path.join(base, "image"), os.path.join(base, name)
    os.mkdir(image, 0o700)
    os.mkdir(top)
    fs = OneFile(name + ".img", size, when, dom0.read)
    fd = fs.mount(image)
    opener, undo = [], [lambda: fs.unmount(image)]

    def gone():  # dom0 has gone: close the file manager, which ends the browse
        dom0.gone = True
        for proc in opener:
            proc.terminate()
    # the kernel's requests are served while this thread sets up, and until it has undone everything
    threading.Thread(target=fs.serve, args=(fd, dom0.rfd, gone), daemon=True).start()
    try:
        mounted = mount_all(os.path.join(image, name + ".img"), top, undo, dom0)
        dom0.say("mounted read-only: " + ", ".join(mounted))
        open_folder(top, opener, dom0)
    finally:
        for proc in opener:
            proc.terminate()
        for step in reversed(undo):
            with contextlib.suppress(Error, OSError):
                step()
        for folder in sorted((os.path.join(top, p) for p in os.listdir(top)), reverse=True) + [top, image, base]:
            with contextlib.suppress(OSError):
                os.rmdir(folder)  # never rmtree: a mount that did not go would be emptied


def attach(image, undo, start=0, size=0):
    """A read-only loop device on ``size`` bytes of ``image`` from ``start`` (0: all)."""
    loop = run("losetup", "--find", "--show", "--read-only", "--offset", str(start),
               *(["--sizelimit", str(size)] if size else []), image)
    undo.append(lambda: run("losetup", "--detach", loop))
    return loop


def devices(image, undo):
    """(name, loop device) of each partition of ``image``, or ("", a loop
    device on all of it) when it has no partition table.  partx reads the
    table in user space: the kernel need not know its kind (partscan)."""
    try:
        table = run("partx", "--show", "--noheadings", "--output", "NR,START,SECTORS", image)
    except Error:
        table = ""  # a filesystem on the whole volume, as on a private volume
    rows = [tuple(map(int, row.split())) for row in table.splitlines()]
    return [("p%d" % nr, attach(image, undo, 512 * start, 512 * count)) for nr, start, count in rows if count] \
        or [("", attach(image, undo))]


def mount_all(image, top, undo, dom0):
    """Mount every filesystem of ``image`` at ``top`` (partitions at top/pN);
    returns what was mounted."""
    found = []
    for part, dev in devices(image, undo):
        try:
            kind = run("blkid", "-p", "-o", "value", "-s", "TYPE", dev)
        except Error:
            kind = ""  # no filesystem (a BIOS boot partition, free space)
        where, label = os.path.join(top, part) if part else top, part or "the volume"
        if not kind or kind in NOT_MOUNTED:
            if kind:
                dom0.say("%s holds %s: not mounted" % (label, kind))
            continue
        if part:
            os.mkdir(where)
        options = ",".join(filter(None, ("ro,nosuid,nodev,noexec", NO_REPLAY.get(kind))))
        try:
            run("mount", "-t", kind, "-o", options, dev, where)
        except Error as e:
            dom0.say("%s (%s) is not mounted: %s" % (label, kind, e))
            continue
        undo.append(lambda where=where: unmount(where))
        found.append("%s (%s)" % (where, kind))
    if not found:
        raise Error("the volume holds no filesystem that Linux here can mount")
    return found


def unmount(where):
    try:
        run("umount", where)
    except Error:
        run("umount", "--lazy", where)  # still in use: it goes when that ends


def open_folder(path, opener, dom0):
    """The last step: show the files, and wait until that ends."""
    hook = os.environ.get("WYNG_BROWSE_OPEN")
    command, env = ([hook, path], None) if hook else file_manager(path)
    if not command:
        dom0.say("no file manager found: the files are in %s until the qube is closed" % path)
        while not dom0.gone:
            time.sleep(1)
        return
    proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=sys.stderr)
    opener.append(proc)
    proc.wait()


def file_manager(path):
    """(command, environment) that opens a file manager on ``path`` in the
    qube's GUI session, as its user; (None, None) if there is none."""
    program = next((fm for fm in FILE_MANAGERS if shutil.which(fm[0])), None)
    deadline = time.monotonic() + SESSION_WAIT
    while program and not os.path.exists(SESSION_ENV) and time.monotonic() < deadline:
        time.sleep(0.2)
    if not program or not os.path.exists(SESSION_ENV):
        return None, None
    with open(SESSION_ENV) as f:
        env = dict(line.rstrip("\n").split("=", 1) for line in f if "=" in line)
    user = pwd.getpwuid(os.stat(SESSION_ENV).st_uid).pw_name
    return ["runuser", "-u", user, "--"] + program + [path], env


def main():
    # stdin and stdout are dom0's: the protocol keeps them; tools run here
    # get /dev/null and stderr instead
    rfd, wfd = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(2, 1)
    os.close(null)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    dom0 = Dom0(rfd, wfd)
    try:
        size, when, name, path = dom0.volume()
        if path:
            present(dom0, size, when, name, path)
        else:
            browse(dom0, size, when, name)
        return 0
    except (Error, OSError, wire.ProtocolError) as e:
        text = str(e)
        if isinstance(e, OSError) and e.strerror:
            text = "%s: %s" % (e.filename, e.strerror) if e.filename else e.strerror
        dom0.say(text, wire.ERR)
        return 1
    except KeyboardInterrupt:
        return 130
