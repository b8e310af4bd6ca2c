"""mount and browse: a session's volume, read-only, fetched as it is read.

dom0 only serves byte ranges (doc/browse.md).  The VM package's wyng.Browse
asks for them and presents the volume: ``browse`` runs it in a new
disposable qube, which mounts the filesystems and opens a file manager;
``mount`` runs it here as a local process, which presents a FUSE file the
user loop-mounts.  dom0 never parses a filesystem: it answers each range
from chunks it fetched and checked against their keyed ids, as receive
does.  A hostile presenter can ask only for ranges of this session, of
at most MAX_READ bytes, one at a time, at most RATE a second; dom0 keeps
at most CACHE bytes of chunks.
"""
import collections
import contextlib
import os
import struct
import time

from .. import qubes, wire
from ..archive import Archive
from ..errors import Fail
from ..manifest import ZERO
from ..progress import notice, say
from ..settings import qube_name, volume as qube_volume
from ..transport import ProcessTransport, local
from . import open_session

VERSION = 1
VOLUME, READ, NOTE = 1, 2, 3  # dom0's first frame; the presenter's requests
HEAD = struct.Struct(">HQQ")  # VOLUME: version, volume size, session time; then name NUL mount point
RANGE = struct.Struct(">QI")  # READ: offset, length
MAX_READ = 1 << 20
MAX_NOTES = 64
RATE = 5000                   # requests a second; more are slowed down, not refused
CACHE = 32 << 20              # bytes of verified chunks kept
AHEAD = 8 << 20               # the most read ahead for a sequential reader


class RangeServer:
    def __init__(self, archive, chunk_map, size, link, opts, who):
        self.archive, self.map, self.size, self.link, self.opts, self.who = archive, chunk_map, size, link, opts, who
        self.cs = cs = archive.chunk_size
        self.cache = collections.OrderedDict()  # index -> verified chunk, oldest use first
        self.zeros, self.capacity, self.most_ahead = bytes(cs), CACHE // cs, AHEAD // cs
        self.ahead, self.next, self.window = 0, None, (time.monotonic(), 0)
        self.fetched = self.notes = self.requests = 0

    def serve(self, head):
        """Send VOLUME, then answer requests until the presenter closes its end."""
        if not self.tell(VOLUME, *head):
            return
        while self.link.rfile.peek(1):
            op, data = self.link.frame((READ, NOTE), wire.MAX_ERROR)
            self.pace()
            self.requests += 1
            if op == NOTE:
                self.notes += 1
                if self.notes > MAX_NOTES:
                    raise Fail("the browse service sent more than %d messages" % MAX_NOTES)
                notice(self.opts, "%s: %s" % (self.who, wire.printable(data)))
                continue
            if len(data) != RANGE.size:
                raise Fail("the browse service sent a malformed read request")
            offset, length = RANGE.unpack(data)
            if not 0 < length <= MAX_READ or offset + length > self.size:
                raise Fail("the browse service asked for %d bytes at offset %d: refused (the volume has %d bytes; "
                           "at most %d a read)" % (length, offset, self.size, MAX_READ))
            if not self.tell(wire.DATA, *self.read(offset, length)):
                return

    def tell(self, op, *parts):
        """Send to the presenter; False if it has hung up (its qube was
        closed?): then how it ended tells the rest."""
        with contextlib.suppress(wire.LinkBroken):
            self.link.send(op, *parts)
            return True
        return False

    def pace(self):
        """At most RATE requests in a second: a flood costs dom0 time, not all of its CPU."""
        start, count = self.window
        if count >= RATE:
            time.sleep(max(0, start + 1 - time.monotonic()))
        now = time.monotonic()
        self.window = (now, 1) if now - start >= 1 else (start, count + 1)

    def read(self, offset, length):
        """The bytes [offset, offset + length) as pieces of verified chunks.
        A miss fetches the chunks the read needs, and after a read that
        went on where the last one ended, twice as many following chunks
        as last time (up to AHEAD bytes)."""
        cs, end = self.cs, offset + length
        first, last = offset // cs, (end - 1) // cs
        self.ahead = min(2 * self.ahead or 1, self.most_ahead) if offset == self.next else 0
        self.next = end
        for i in range(first, last + 1):
            if i in self.cache:
                self.cache.move_to_end(i)  # not evicted by what this read fetches
        if any(i not in self.cache and self.map[i] != ZERO for i in range(first, last + 1)):
            self.fetch(range(first, min(last + 1 + self.ahead, len(self.map))))
        return [memoryview(self.cache.get(i, self.zeros))[max(offset - i * cs, 0):min(end - i * cs, cs)]
                for i in range(first, last + 1)]

    def fetch(self, indexes):
        wanted = [(i, self.map[i], min(self.cs, self.size - i * self.cs)) for i in indexes
                  if i not in self.cache and self.map[i] != ZERO]
        for index, data in self.archive.fetch(wanted):  # each checked against its id
            if len(self.cache) >= self.capacity:
                self.cache.popitem(last=False)
            self.cache[index] = data
            self.fetched += 1


def serve(opts, archive, session, link, who, path="", strict=True, hint=""):
    """Open the presenter on ``session`` and answer it until it ends, with
    status 0 (unless not ``strict``: then it need only have asked for
    something, its qube may have been closed); returns the chunks fetched."""
    vol, ses, chunk_map = session
    server = RangeServer(archive, chunk_map, ses["size"], link, opts, who)
    server.serve((HEAD.pack(VERSION, ses["size"], ses["time"]), vol["name"].encode(), b"\0", os.fsencode(path)))
    if link.transport.status() != 0 and (strict or not server.requests):
        raise Fail("the browse service ended%s%s" % (link.transport.exit_note(), hint))
    return server.fetched


def run_mount(opts, app):
    if len(opts.volumes) != 2:
        raise Fail("mount: name a volume and the folder to present it in")
    name, folder = opts.volumes
    if not os.path.isdir(folder):
        raise Fail("%s: not a folder" % folder)
    with Archive(opts, app).open() as archive:
        session = open_session(opts, archive, name)
        with contextlib.closing(wire.Link(local("wyng.Browse", "browse service"), "browse service")) as link:
            fetched = serve(opts, archive, session, link, "wyng.Browse", os.path.abspath(folder))
    say(opts, "%s: session %s unmounted from %s (%d chunks fetched)" % (name, session[1]["name"], folder, fetched))
    return 0


def run_browse(opts, app):
    if len(opts.volumes) != 1:
        raise Fail("browse: name one qube (QUBE[:VOLUME]) or volume")
    qube, _, part = opts.volumes[0].partition(":")
    app = qubes.connect(app)
    with Archive(opts, app).open() as archive:
        name = qube if not part and archive.volume(qube) else qube_volume(qube_name(qube), part or "private")
        session = open_session(opts, archive, name)
        template = qubes.browse_template(app, qube, opts.dispvm)
        vm, proc = qubes.start_browser(app, template)
        link = wire.Link(ProcessTransport(proc, "browse service"), "browse service in %s" % vm.name)
        try:
            notice(opts, "%s, session %s: opening it in %s, a disposable qube without network; closing its file "
                   "manager, or the qube, ends this" % (name, session[1]["name"], vm.name))
            fetched = serve(opts, archive, session, link, vm.name, strict=False,
                            hint=": is qubes-wyng-vm installed in the template %s is based on?" % template.name)
        finally:
            qubes.end_browser(app, vm)  # first: the link's close then finds the service gone
            link.close()
    say(opts, "%s: session %s browsed (%d chunks fetched)" % (name, session[1]["name"], fetched))
    return 0
