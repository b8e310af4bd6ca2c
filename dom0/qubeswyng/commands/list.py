"""list: the volumes of an archive, or the sessions of some volumes."""
import json
import time

from ..archive import SCAN_SIZES, TOTAL, Archive
from ..clock import now
from ..formats import CIPHERS, COMPRESSIONS
from ..progress import say, size
from ..schedule import scheduled
from ..settings import SETTINGS, qubes_in


def session_info(ses):
    return {"session": ses["name"], "size": ses["size"], "changed_chunks": ses.get("changed", 0),
            "time": ses["time"], "tags": ses.get("tags", {})}


def when(t):
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "unknown"


def details(archive, opts):
    """The archive's settings (from its authenticated header), its creation
    time (from the root; none before format notes it) and, with -v, the
    bytes its chunks take in storage: the agent walks every manifest to
    count them (SCAN with SIZES), a figure to show, never to trust."""
    h, compression = archive.header, {v: k for k, v in COMPRESSIONS.items()}[archive.header.compression]
    stored = [r[3] for r in archive.scan(SCAN_SIZES, archive.manifests()) if r[0] == TOTAL] if opts.verbose else [None]
    return {"format": archive.root["format"], "chunk_size": h.chunk_size,
            "compression": compression + (":%d" % h.level if h.compression else ""),
            "encryption": {v: k for k, v in CIPHERS.items()}[h.cipher], "created": archive.root.get("created"),
            "stored_bytes": stored[0]}


def run(opts, app):
    with Archive(opts, app).open() as archive:
        root = archive.root
        vols = [archive.require_volume(n) for n in opts.volumes] if opts.volumes else root["volumes"]
        about = None if opts.qubes or opts.volumes else details(archive, opts)
    if opts.qubes:
        return list_qubes(opts, root, scheduled(opts, app))
    if opts.json:
        print(json.dumps(dict(about or {}, archive=root["archive"], updated=root["time"], volumes=[
            {"name": v["name"], "sessions": [session_info(s) for s in v["sessions"]]} for v in vols]),
            indent=1))
        return 0
    if not opts.volumes:
        say(opts, "Archive updated %s; %d volumes" % (when(root["time"]), len(vols)))
        say(opts, "format %d, chunks of %s, %s compression, %s encryption, created %s%s" % (
            about["format"], size(about["chunk_size"]), about["compression"], about["encryption"],
            when(about["created"]), ", %s stored" % size(about["stored_bytes"]) if opts.verbose else ""))
        for v in vols:
            last = v["sessions"][-1] if v["sessions"] else None
            print("%-40s %4d sessions  %s" % (v["name"], len(v["sessions"]),
                  "last %s, %s" % (last["name"], size(last["size"])) if last else "no sessions"))
        return 0
    for v in vols:
        print("%s:" % v["name"])
        for s in v["sessions"]:
            tags = " ".join("^" + t for t in sorted(s.get("tags", {})))
            print("  %s  %10s  %7d changed  %s" % (s["name"], size(s["size"]), s.get("changed", 0), tags))
    return 0


def list_qubes(opts, root, schedule):
    """Per qube: its last backup (the newest settings session), how many
    backups, and the size of its volumes then; with a schedule for this
    archive, whether the qube is overdue (scheduled, and not backed up in
    its last OVERDUE_HOURS), qubes it has never backed up included."""
    names, hours = schedule or ([], None)
    found, rows = qubes_in(root), []
    for qube in sorted(set(found) | set(names)):
        vols = found.get(qube, {})
        sessions = vols.get(SETTINGS, {"sessions": []})["sessions"]
        last, when = (sessions[-1]["name"], sessions[-1]["time"]) if sessions else (None, None)
        sizes = [s["size"] for n, v in vols.items() if n != SETTINGS for s in v["sessions"] if s["name"] == last]
        rows.append({"qube": qube, "last_backup": last, "time": when, "backups": len(sessions), "size": sum(sizes),
                     "volumes": sorted(set(vols) - {SETTINGS}), "scheduled": qube in names,
                     "overdue": qube in names and (when is None or now() - when > hours * 3600)})
    if opts.json:
        print(json.dumps({"archive": root["archive"], "overdue_hours": hours, "qubes": rows}, indent=1))
        return 0
    for r in rows:
        print("%-32s %4d backups  %s%s" % (r["qube"], r["backups"], "last %s, %s (%s)" % (
            r["last_backup"], size(r["size"]), " ".join(r["volumes"]) or "settings only")
            if r["last_backup"] else "no backups", "  OVERDUE" if r["overdue"] else ""))
    if schedule:
        say(opts, "%d of %d scheduled qubes overdue (not backed up in %d hours)" % (
            sum(r["overdue"] for r in rows), len(names), hours))
    return 0
