"""receive and verify: rebuild a session from the archive, checking each chunk.

The manifest chain is verified and merged first (nothing is written before
every MAC matched); then every chunk is fetched and checked against its
keyed id before it is written.  A regular file is written to a temporary
name beside the target and renamed into place only when all of it checked
out, so a failed restore never leaves a file that looks complete.  A block
device is written in place, only with chunks that checked out (never
discarded as a whole first): a zero chunk is skipped where the device reads
as zeros, else discarded (a thin volume stays thin) or written; a failure
says that the device is partly overwritten.  With --local the pool gives
the target (sources: ``receive_path``).
"""
import contextlib
import fcntl
import os
import secrets
import stat
import struct

from ..archive import Archive
from ..errors import Fail
from ..manifest import ZERO
from ..progress import Progress, say, size
from ..sources import open_source
from . import Several, chosen_volumes, pick_session

BLKDISCARD = 0x1277
ZEROS = bytes(1 << 22)


class FileTarget:
    """--save-to: a new or replaced regular file, or an existing block device."""

    def __init__(self, path, size):
        self.path = path
        try:
            try:
                mode = os.stat(path).st_mode
            except FileNotFoundError:
                mode = 0
            self.device = stat.S_ISBLK(mode)
            if mode and not (self.device or stat.S_ISREG(mode)):
                raise Fail("%s: not a regular file or block device" % path)
            if self.device:
                self.temp = None
                self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
                if os.lseek(self.fd, 0, os.SEEK_END) < size:
                    os.close(self.fd)
                    raise Fail("%s: device is smaller than the volume (%d bytes)" % (path, size))
            else:
                folder, base = os.path.split(os.path.abspath(path))
                self.temp = os.path.join(folder, ".%s.qwyng-%s" % (base, secrets.token_hex(4)))
                self.fd = os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                os.ftruncate(self.fd, size)
        except OSError as e:
            raise Fail("%s: %s" % (path, e.strerror)) from None

    def write(self, offset, data):
        if self.device and data == ZEROS[:len(data)]:
            if os.pread(self.fd, len(data), offset) == data:
                return
            with contextlib.suppress(OSError):  # no discard of just this chunk: the zeros are written
                fcntl.ioctl(self.fd, BLKDISCARD, struct.pack("=QQ", offset, len(data)))
                if os.pread(self.fd, len(data), offset) == data:
                    return
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n

    def finish(self):
        os.fsync(self.fd)
        os.close(self.fd)
        if self.temp:
            os.rename(self.temp, self.path)

    def abort(self):
        os.close(self.fd)
        if self.temp:
            os.unlink(self.temp)


def restore(archive, chunk_map, total, write, opts, label, zeros_needed):
    """Fetch and check every chunk; ``write(offset, data)`` each one."""
    cs, count = archive.chunk_size, len(chunk_map)

    def length(i):
        return min(cs, total - i * cs)
    if zeros_needed:
        zero = bytes(cs)
        for i in range(count):
            if chunk_map[i] == ZERO:
                write(i * cs, zero[:length(i)])
    wanted = ((i, cid, length(i)) for i, cid in ((i, chunk_map[i]) for i in range(count)) if cid != ZERO)
    progress = Progress(opts, label, total)
    fetched = 0
    with contextlib.closing(archive.fetch(wanted)) as chunks:
        for index, data in chunks:
            write(index * cs, data)
            fetched += 1
            progress.update(index * cs)
    progress.close()
    return fetched


def run(opts, app):
    if not opts.save_to and not opts.local:
        raise Fail("receive needs --save-to=PATH or --local=POOL")
    if len(opts.volumes) != 1:
        raise Fail("receive: name one volume")
    with Archive(opts, app).open() as archive:
        vol = archive.require_volume(opts.volumes[0])
        index = pick_session(opts, vol)
        ses, chunk_map = vol["sessions"][index], archive.chunk_map(vol, index)
        path, commit, abort = opts.save_to, None, None
        if not path:
            path, commit, abort = open_source(opts.local, vol["name"], create=True).receive_path(
                ses["size"], opts.overwrite)
        try:
            target = FileTarget(path, ses["size"])
            try:
                fetched = restore(archive, chunk_map, ses["size"], target.write, opts, vol["name"],
                                  zeros_needed=target.device)
                target.finish()
            except BaseException as e:
                target.abort()
                if target.device and not abort and isinstance(e, (Fail, OSError)):  # written in place
                    raise Fail("%s; %s is partly overwritten: receive it again" % (e, path)) from None
                raise
            if commit:
                commit()
        except BaseException:
            if abort:
                abort()
            raise
    say(opts, "%s: session %s received to %s (%s, %d chunks)" % (
        vol["name"], ses["name"], path if opts.save_to else "%s in %s" % (vol["name"], opts.local),
        size(ses["size"]), fetched))
    return 0


def run_verify(opts, app):
    def verify(name, vol):
        index = pick_session(opts, vol)
        ses = vol["sessions"][index]
        fetched = restore(archive, archive.chunk_map(vol, index), ses["size"], lambda _o, _d: None, opts, name,
                          zeros_needed=False)
        say(opts, "%s: session %s verified (%s, %d chunks)" % (name, ses["name"], size(ses["size"]), fetched))

    with Archive(opts, app).open() as archive:
        vols = chosen_volumes(opts, archive)  # a qube name: all its volumes
        several = Several(opts, len(vols) > 1)
        several.each([(v["name"], v) for v in vols], verify)
    return several.status()
