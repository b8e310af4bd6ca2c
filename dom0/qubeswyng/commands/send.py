"""send: back up volumes as a new session.

Each volume's source yields its chunks (with --local, only those its
snapshots say may have changed: sources/snapshots.py); a chunk whose id
differs from the parent session's map is listed in the new delta manifest
and, unless it is zeros, sent to the agent (which stores it once, whatever
volume it is in).  The root is committed once, after every volume's
manifest is stored; sources rotate their snapshots around that commit.
"""
import heapq
import itertools
import json
import time

from ..archive import Archive, ahead
from ..clock import now
from ..errors import Fail
from ..manifest import ZERO, chunk_count
from ..progress import Progress, notice, say, size
from ..sources import open_all
from ..sources.image import ImageSource
from ..sources.snapshots import send_source
from . import prune, volume_name

IMPORT_SEP = ":|:"


def imports(opts):
    """(volume name, path) of every --import-other-from."""
    wanted = []
    for spec in opts.import_other_from:
        name, sep, path = spec.partition(IMPORT_SEP)
        if not sep or not path:
            raise Fail("--import-other-from takes VOLUME:|:PATH, not %r" % spec)
        wanted.append((volume_name(name), path))
    return wanted


def sources(opts):
    """(volume name, source) for every volume asked for, all opened before
    the archive is touched, so a bad path fails the command up front."""
    wanted = imports(opts)
    if opts.volumes and not opts.local:
        raise Fail("send needs --local for volume names (%s); for a plain file or device use "
                   "--import-other-from=NAME:|:PATH" % ", ".join(opts.volumes))
    local = [volume_name(n) for n in opts.volumes]
    if not wanted and not local:
        raise Fail("send: no volumes given")
    names = [n for n, _p in wanted] + local
    if len(set(names)) != len(names):
        raise Fail("send: a volume is named twice")
    return open_all(itertools.chain(((name, ImageSource(path)) for name, path in wanted),
                                    ((name, send_source(opts, opts.local, name)) for name in local)))


def session_name(archive, names):
    """YYYYMMDD-HHMMSS, local time, later than every session of these volumes."""
    when = now()
    latest = max((v["sessions"][-1]["name"] for v in map(archive.volume, names)
                  if v and v["sessions"]), default="")
    while True:
        name = time.strftime("%Y%m%d-%H%M%S", time.localtime(when))
        if name > latest:
            return name, when
        when += 1


def parse_tags(specs):
    tags = {}
    for spec in specs:
        tag, _, desc = spec.partition(",")
        if not tag or len(tag) > 64 or not all(c.isalnum() or c in "-_." for c in tag):
            raise Fail("--tag: %r is not a tag name (letters, digits, - _ .)" % tag)
        tags[tag] = desc[:200]
    return tags


def send_volume(archive, name, source, session, tags, opts, lost):
    vol = archive.volume(name) or archive.add_volume(name)
    cs, keys = archive.chunk_size, archive.keys
    chunk_map = archive.chunk_map(vol, cached=True)
    old_count, old_size = len(chunk_map), (vol["sessions"][-1]["size"] if vol["sessions"] else None)
    reader, wanted = source.begin(archive, vol, chunk_map)
    if lost and wanted is not None:  # read the chunks the archive lost too, where the volume holds them
        held = (i for i in range(len(chunk_map)) if chunk_map[i] in lost)
        wanted = (i for i, _same in itertools.groupby(heapq.merge(wanted, held)))
    count = chunk_count(reader.size, cs)
    chunk_map.resize(count)
    changed = bytearray((count + 7) // 8)
    zero = bytes(cs)
    st = {"volume": name, "incremental": wanted is not None, "chunks_scanned": count, "chunks_read": 0,
          "chunks_changed": 0, "chunks_sent": 0, "bytes_read": 0, "bytes_sent": 0, "chunks_repaired": 0}
    progress = Progress(opts, name, reader.size)
    before = archive.agent_stats()

    def chunk_id(item):  # on ahead's worker: bytes == bytes is a memcmp
        return ZERO if item[1] == zero[:len(item[1])] else keys.chunk_id(item[1])
    for (index, data), cid in ahead(chunk_id, reader.chunks(cs, wanted)):
        if data is not None:
            st["chunks_read"] += 1
            st["bytes_read"] += len(data)
        elif index >= old_count:  # a hole past the parent's end: listed, already zero in the map
            changed[index >> 3] |= 1 << (index & 7)
            st["chunks_changed"] += 1
            continue
        cid = cid or ZERO
        if index >= old_count or chunk_map.ids[32 * index:32 * index + 32] != cid:
            changed[index >> 3] |= 1 << (index & 7)
            st["chunks_changed"] += 1
            chunk_map[index] = cid
            if cid != ZERO:
                archive.put_chunk(cid, data)
                st["chunks_sent"] += 1
                st["bytes_sent"] += len(data)
        elif cid in lost:  # unchanged, but the archive lost it: stored again
            archive.put_chunk(cid, data)
            st["chunks_repaired"] += 1
        progress.update(index * cs)
    progress.close()
    after, sent = archive.agent_stats(), st["chunks_sent"] + st["chunks_repaired"]
    # the agent's figures, only shown, kept within what they can be (a sealed chunk adds < 64 bytes)
    st["chunks_deduplicated"] = min(max(0, after[1] - before[1]), sent)
    st["bytes_stored"] = min(max(0, after[3] - before[3]), sent * (cs + 64))
    if st["chunks_changed"] == 0 and reader.size == old_size and not opts.send_unchanged:
        st["session"] = None
        return st, None
    entries = ((i, chunk_map[i]) for i in range(count) if changed[i >> 3] & (1 << (i & 7)))
    ses = {"name": session[0], "time": session[1], "size": reader.size, "tags": tags}
    archive.write_manifest(vol, ses, vol["sessions"][-1]["name"] if vol["sessions"] else "",
                           st["chunks_changed"], entries)
    vol["sessions"].append(ses)
    st["session"] = session[0]
    return st, (vol, ses, chunk_map)


def run(opts, app, targets=None):
    targets = sources(opts) if targets is None else targets  # backup passes qubes' sources
    tags = parse_tags(opts.tag)
    prune.parse_apdays(opts.apdays)
    archive = Archive(opts, app).open(write=True)
    try:
        if opts.autoprune not in (None, "off"):
            autoprune(archive, opts, targets)
        session = session_name(archive, [n for n, _s in targets])
        lost = archive.damaged()
        sent = [send_volume(archive, name, source, session, tags, opts, lost) for name, source in targets]
        results, new = [st for st, _added in sent], [added for _st, added in sent if added]
        heads = [(src, archive.volume(n)["sessions"][-1]["mac"]) for n, src in targets]
        for src, mac in heads:
            src.pending(mac)
        if new:
            archive.commit()
            for vol, ses, chunk_map in new:
                archive.meta.save_map(vol["id"], bytes.fromhex(ses["mac"]), chunk_map)
        for src, mac in heads:
            src.done(mac)
    finally:
        archive.close()
        for _n, src in targets:
            src.close()
    report(opts, results)
    return 0


def autoprune(archive, opts, targets):
    """Before sending: full always prunes; on and min only when the
    destination has less space left than the volumes' sizes."""
    if opts.autoprune != "full":
        free = archive.free_bytes()
        if free is None or free >= sum(src.size for _n, src in targets):
            return
    vols = [v for v in map(archive.volume, [n for n, _s in targets]) if v]
    removals = prune.plan(opts, vols, by_spec=False)
    objects, freed = prune.remove(archive, removals)
    for vol, gone in removals:
        notice(opts, "%s: autoprune removed %d sessions" % (vol["name"], len(gone)))
    if removals:
        notice(opts, "autoprune reclaimed %d objects (%s)" % (objects, size(freed)))


def report(opts, results):
    if opts.json:
        print(json.dumps({"volumes": results}, indent=1))
        return
    for st in results:
        if st["chunks_repaired"]:
            notice(opts, "%s: %d chunks the archive had lost stored again" % (st["volume"], st["chunks_repaired"]))
        if st["session"] is None:
            notice(opts, "%s: unchanged, no session recorded" % st["volume"])
            continue
        say(opts, "%s: session %s, %d of %d chunks changed, %s sent" % (
            st["volume"], st["session"], st["chunks_changed"], st["chunks_scanned"],
            size(st["bytes_sent"])))
        if opts.verbose:
            print("  %s: read %d chunks (%s), sent %d, deduplicated %d, stored %s" % (
                "incremental" if st["incremental"] else "in full", st["chunks_read"], size(st["bytes_read"]),
                st["chunks_sent"], st["chunks_deduplicated"], size(st["bytes_stored"])))
