"""diff: compare local volumes with their newest (or --session) archived
session, chunk by chunk, reading the local volume in full.  Exit status 0
when they are equal, 2 (EXIT_PARTIAL: "some volumes did not pass") when
any differs, 1 on errors."""
import json

from ..archive import Archive
from ..errors import EXIT_PARTIAL, Fail
from ..manifest import ZERO, chunk_count
from ..progress import Progress, size
from ..sources import open_source
from . import open_session


def run(opts, app):
    if not opts.local or not opts.volumes:
        raise Fail("diff needs --local and volume names")
    volumes = [open_source(opts.local, name) for name in opts.volumes]
    with Archive(opts, app).open() as archive:
        results = [compare(archive, volume, opts) for volume in volumes]
    for st in [] if opts.json else results:
        print("%s: %s" % (st["volume"], "same as session %s" % st["session"] if st["same"] else
                          "differs from session %s in %d of %d chunks (%s)%s" % (
                              st["session"], st["chunks_differ"], st["chunks"], size(st["bytes_differ"]),
                              "; size %d, archived %d" % (st["size"], st["archived_size"])
                              if st["size"] != st["archived_size"] else "")))
    if opts.json:
        print(json.dumps({"volumes": results}, indent=1))
    return 0 if all(st["same"] for st in results) else EXIT_PARTIAL


def compare(archive, volume, opts):
    _vol, ses, chunk_map = open_session(opts, archive, volume.name)
    cs = archive.chunk_size
    reader = volume.reader()
    try:
        zero = bytes(cs)
        st = {"volume": volume.name, "session": ses["name"], "size": reader.size, "archived_size": ses["size"],
              "chunks": chunk_count(reader.size, cs), "chunks_differ": 0, "bytes_differ": 0}
        progress = Progress(opts, volume.name, reader.size)
        for index, data in reader.chunks(cs):
            cid = ZERO if data is None or data == zero[:len(data)] else archive.keys.chunk_id(data)
            for i in index if data is None else (index,):  # data None: a run of hole chunks
                if i >= len(chunk_map) or chunk_map[i] != cid:
                    st["chunks_differ"] += 1
                    st["bytes_differ"] += min(cs, reader.size - i * cs)
                progress.update(i * cs)
        progress.close()
    finally:
        reader.close()
    st["same"] = st["chunks_differ"] == 0 and reader.size == ses["size"]
    return st
