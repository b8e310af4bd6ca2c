"""arch-deduplicate: how much dedup and compression save.

Dedup is always on (a chunk is stored once, whatever volume or session
uses it), so there is nothing to do; this reports, per volume and for the
archive, the logical bytes (the sizes of all sessions, and the chunk data
their manifests list) against the bytes stored for them.
"""
import json

from .. import archive as A
from ..archive import Archive
from ..progress import say, size


def run(opts, app):
    with Archive(opts, app).open() as archive:
        vols = archive.root["volumes"]
        items = archive.manifests()
        groups = [g for g, v in enumerate(vols) for _s in v["sessions"]]  # the order of manifests()
        records = archive.scan(A.SCAN_SIZES, items, groups) if items else []
    cs = archive.chunk_size
    figures = {r[1]: r[2:] for r in records if r[0] == A.GROUP and r[1] < len(vols)}
    total = next((r[2:] for r in records if r[0] == A.TOTAL), (0, 0, 0))
    rows = []
    for g, vol in enumerate(vols):
        # the agent's figures, only shown, within what they can be: at most the
        # entries the root counts, a sealed chunk at most 64 bytes over its size
        refs, distinct, stored = figures.get(g, (0, 0, 0))
        refs = min(refs, sum(s.get("changed", 0) for s in vol["sessions"]))
        distinct = min(distinct, refs)
        stored = min(stored, distinct * (cs + 64))
        rows.append({"volume": vol["name"], "sessions": len(vol["sessions"]),
                     "logical_bytes": sum(s["size"] for s in vol["sessions"]),
                     "listed_bytes": refs * cs, "chunks": distinct, "stored_bytes": stored})
    whole = {k: sum(r[k] for r in rows) for k in ("logical_bytes", "listed_bytes", "chunks", "stored_bytes")}
    whole.update(chunks=min(total[0], whole["chunks"]), stored_bytes=min(total[1], whole["stored_bytes"]))
    if opts.json:
        print(json.dumps({"volumes": rows, "archive": whole}, indent=1))
        return 0
    print("%-32s %8s %12s %12s %12s %7s" % ("volume", "sessions", "logical", "listed", "stored", "ratio"))
    for r in rows + [dict(whole, volume="(archive)", sessions=sum(r["sessions"] for r in rows))]:
        print("%-32s %8d %12s %12s %12s %6.1fx" % (
            r["volume"], r["sessions"], size(r["logical_bytes"]), size(r["listed_bytes"]),
            size(r["stored_bytes"]), r["logical_bytes"] / max(r["stored_bytes"], 1)))
    say(opts, "logical: all sessions' sizes; listed: chunk data their manifests list; "
              "stored: distinct chunks as stored (deduplicated, compressed, encrypted)")
    return 0
