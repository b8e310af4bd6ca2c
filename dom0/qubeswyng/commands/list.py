"""list: the volumes of an archive, or the sessions of some volumes."""
import json
import time

from ..archive import Archive
from ..clock import now
from ..progress import say, size
from ..schedule import scheduled
from ..settings import SETTINGS, qubes_in


def session_info(ses):
    return {"session": ses["name"], "size": ses["size"], "changed_chunks": ses.get("changed", 0),
            "time": ses["time"], "tags": ses.get("tags", {})}


def run(opts, app):
    with Archive(opts, app).open() as archive:
        root = archive.root
        vols = [archive.require_volume(n) for n in opts.volumes] if opts.volumes else root["volumes"]
    if opts.qubes:
        return list_qubes(opts, root, scheduled(opts, app))
    if opts.json:
        print(json.dumps({"archive": root["archive"], "updated": root["time"], "volumes": [
            {"name": v["name"], "sessions": [session_info(s) for s in v["sessions"]]} for v in vols]},
            indent=1))
        return 0
    if not opts.volumes:
        say(opts, "Archive updated %s; %d volumes" % (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(root["time"])), len(vols)))
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
        last = sessions[-1]["name"] if sessions else None
        sizes = [s["size"] for n, v in vols.items() if n != SETTINGS for s in v["sessions"] if s["name"] == last]
        when = sessions[-1]["time"] if sessions else None
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
