"""delete: remove volumes and every session of them from the archive; or,
with --clean, only this tool's local snapshots and metadata.

Deleting from the archive: the agent first records that garbage is due,
then the root without the volumes is committed, then the collector removes
their manifests and the chunks no other volume uses.  Interrupted anywhere,
the next writer finishes the collection (doc/lifecycle.md).  Then the
volumes' local snapshots and snapshot records go too.

--clean removes the local data of the archive at --dest (or with --all of
every archive), and with --local also the snapshots found in that pool; the
archive is not touched (doc/sources.md).
"""
from ..archive import Archive
from ..clock import point
from ..errors import Fail
from ..progress import say, size
from ..settings import resolve
from ..sources.snapshots import clean_local, forget
from . import confirm


def run(opts, app):
    if opts.clean:
        return clean(opts, app)
    if not opts.volumes:
        raise Fail("delete: name the volumes to delete (or --clean for local metadata)")
    confirm(opts, "Delete %s and all of its sessions from the archive?" % ", ".join(opts.volumes))
    with Archive(opts, app).open(write=True) as archive:
        vols = resolve(archive, opts.volumes)
        archive.mark_garbage()
        for vol in vols:
            archive.root["volumes"].remove(vol)
            archive.meta.drop_map(vol["id"])
        point("dom0:delete-before-commit")
        archive.commit()
        objects, freed = archive.collect()
        local = sum(forget(archive.meta, vol["id"]) for vol in vols)
    say(opts, "deleted %s; %d objects (%s) reclaimed; local snapshots: %s freed" % (
        ", ".join(opts.volumes), objects, size(freed), size(local)))
    return 0


def clean(opts, app):
    if not opts.all and not opts.dest:
        raise Fail("delete --clean: give --dest (that archive's local data) or --all")
    archive_id = None
    if not opts.all:
        with Archive(opts, app).open() as archive:
            archive_id = archive.header.archive_id
    removed = clean_local(opts, archive_id)
    say(opts, "removed %d snapshots (%s freed) and the local metadata of %s" % (len(removed), size(
        sum(n for _s, n in removed)), "every archive" if opts.all else "archive %s" % archive_id.hex()))
    return 0
