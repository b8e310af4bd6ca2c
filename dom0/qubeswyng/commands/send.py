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
from ..manifest import ZERO, chunk_count, count_set
from ..progress import Progress, notice, say, size
from ..sources import open_source
from ..sources.image import ImageSource
from ..sources.snapshots import send_source
from . import Several, prune, volume_name

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


def wanted(opts, archive):
    """(volume name, function that opens its source) for every volume asked
    for: --import-other-from, the names given, and with --all every archive
    volume found in --local; less --volex."""
    extra, local = imports(opts), [volume_name(n) for n in opts.volumes]
    if (local or opts.all) and not opts.local:
        raise Fail("send needs --local for volume names and --all; for a plain file or device use "
                   "--import-other-from=NAME:|:PATH")
    if opts.all:
        local += [v["name"] for v in archive.root["volumes"] if v["name"] not in local and found(opts.local, v["name"])]
    names = [n for n, _p in extra] + local
    if len(set(names)) != len(names):
        raise Fail("send: a volume is named twice")
    chosen = [(n, lambda p=p: ImageSource(p)) for n, p in extra if n not in opts.volex] + [
        (n, lambda n=n: send_source(opts, opts.local, n)) for n in local if n not in opts.volex]
    if not chosen:
        raise Fail("send: no volumes given" + (" (nor found in --local)" if opts.all else ""))
    return chosen


def found(local, name):
    """Whether the pool ``local`` holds a volume ``name``."""
    try:
        return open_source(local, name, create=True).exists()
    except Fail:
        return False


def session_name(archive, names):
    """YYYYMMDD-HHMMSS, local time, later than every session of these volumes."""
    latest = max((v["sessions"][-1]["name"] for v in map(archive.volume, names) if v and v["sessions"]), default="")
    named = ((time.strftime("%Y%m%d-%H%M%S", time.localtime(t)), t) for t in itertools.count(now()))
    return next((name, t) for name, t in named if name > latest)


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

    def without_holes(items):  # of a run of hole chunks, only those the parent held data in can differ
        for index, data in items:
            if data is not None:
                yield index, data
                continue
            low, high = 32 * index.start, 32 * min(index.stop, old_count)
            if low < high and chunk_map.ids.count(0, low, high) != high - low:
                yield from ((i, None) for i in range(index.start, high // 32) if chunk_map[i] != ZERO)
    for (index, data), cid in ahead(chunk_id, without_holes(reader.chunks(cs, wanted))):
        cid = cid or ZERO  # data None: a hole
        if data is not None:
            st["chunks_read"] += 1
            st["bytes_read"] += len(data)
        if index >= old_count or chunk_map.ids[32 * index:32 * index + 32] != cid:
            changed[index >> 3] |= 1 << (index & 7)
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
    if count > old_count:  # every chunk past the parent's end is listed, holes too (not met one by one)
        bits = int.from_bytes(changed, "little") | ((1 << count - old_count) - 1) << old_count
        changed[:] = bits.to_bytes(len(changed), "little")
    st["chunks_changed"] = count_set(changed)
    after, sent = archive.agent_stats(), st["chunks_sent"] + st["chunks_repaired"]
    # the agent's figures, only shown, kept within what they can be (a sealed chunk adds < 64 bytes)
    st["chunks_deduplicated"] = min(max(0, after[1] - before[1]), sent)
    st["bytes_stored"] = min(max(0, after[3] - before[3]), sent * (cs + 64))
    if opts.dry_run or st["chunks_changed"] == 0 and reader.size == old_size and not opts.send_unchanged:
        st["session"] = None
        return st, None
    ses = {"name": session[0], "time": session[1], "size": reader.size, "tags": tags}
    archive.write_manifest(vol, ses, vol["sessions"][-1]["name"] if vol["sessions"] else "", chunk_map, changed)
    vol["sessions"].append(ses)
    st["session"] = session[0]
    return st, (vol, ses, chunk_map)


def run(opts, app, targets=None):
    """Send the volumes asked for (backup passes its qubes' opened sources
    as ``targets``: one failure fails them all).  A volume that fails is
    left out and the others are committed (doc/decisions.md)."""
    tags = parse_tags(opts.tag)
    prune.parse_apdays(opts.apdays)
    opened = list(targets or [])
    try:
        with Archive(opts, app).open(write=not opts.dry_run) as archive:
            chosen = [(n, lambda s=s: s) for n, s in targets] if targets else wanted(opts, archive)
            several = Several(opts, targets is None and len(chosen) > 1)
            opened = several.each(chosen, lambda _n, opener: opener())
            if opts.autoprune not in (None, "off"):  # full: always; on, min: while the destination is short of space
                names, vols = {}, [v for v in map(archive.volume, dict(opened)) if v]
                reclaimed = prune.autoprune(archive, opts, vols, names, sum(src.size for _n, src in opened))
                prune.report(opts, names, reclaimed, show=lambda o, text: notice(o, "autoprune: " + text))
            session = session_name(archive, [n for n, _s in opened])
            known, lost = {v["id"] for v in archive.root["volumes"]}, archive.damaged()
            sent = several.each(opened, lambda n, src: send_volume(archive, n, src, session, tags, opts, lost))
            archive.root["volumes"] = [v for v in archive.root["volumes"] if v["sessions"] or v["id"] in known]
            if not opts.dry_run:
                commit(archive, [(dict(opened)[n], archive.volume(n), added) for n, (_st, added) in sent])
    finally:
        for _n, src in opened:
            src.close()
    report(opts, [st for _n, (st, _added) in sent])
    return several.status()


def commit(archive, sent):
    """Commit the root with the new sessions; each source's snapshot is
    recorded as its volume's head around the commit (sources/snapshots.py)."""
    heads = [(src, vol["sessions"][-1]["mac"]) for src, vol, _added in sent]
    for src, mac in heads:
        src.pending(mac)
    new = [added for _src, _vol, added in sent if added]
    if new:
        archive.commit()
        for vol, ses, chunk_map in new:
            archive.meta.save_map(vol["id"], bytes.fromhex(ses["mac"]), chunk_map)
    for src, mac in heads:
        src.done(mac)


def report(opts, results):
    if opts.json:
        print(json.dumps({"volumes": results}, indent=1))
        return
    for st in results:
        if st["chunks_repaired"]:
            notice(opts, "%s: %d chunks the archive had lost %s again" % (
                st["volume"], st["chunks_repaired"], "to store" if opts.dry_run else "stored"))
        if st["session"] is None and not opts.dry_run:
            notice(opts, "%s: unchanged, no session recorded" % st["volume"])
            continue
        say(opts, "%s: %s, %d of %d chunks changed, %s %s" % (
            st["volume"], "dry run" if opts.dry_run else "session " + st["session"], st["chunks_changed"],
            st["chunks_scanned"], size(st["bytes_sent"]), "to send" if opts.dry_run else "sent"))
        if opts.verbose:
            print("  %s: read %d chunks (%s), sent %d, deduplicated %d, stored %s" % (
                "incremental" if st["incremental"] else "in full", st["chunks_read"], size(st["bytes_read"]),
                st["chunks_sent"], st["chunks_deduplicated"], size(st["bytes_stored"])))
