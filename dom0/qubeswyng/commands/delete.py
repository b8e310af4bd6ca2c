"""delete: remove volumes and every session of them from the archive.

The agent first records that garbage is due, then the root without the
volumes is committed, then the collector removes their manifests and the
chunks no other volume uses.  Interrupted anywhere, the next writer
finishes the collection (doc/lifecycle.md).
"""
from ..archive import Archive
from ..clock import point
from ..errors import Fail
from ..progress import size
from ..settings import resolve
from . import confirm


def run(opts, app):
    if not opts.volumes:
        raise Fail("delete: name the volumes to delete")
    confirm(opts, "Delete %s and all of its sessions from the archive?" % ", ".join(opts.volumes))
    archive = Archive(opts, app).open(write=True)
    try:
        vols = [archive.require_volume(name) for name in resolve(archive, opts.volumes)]
        archive.mark_garbage()
        for vol in vols:
            archive.root["volumes"].remove(vol)
            archive.meta.drop_map(vol["id"])
        point("dom0:delete-before-commit")
        archive.commit()
        objects, freed = archive.collect()
    finally:
        archive.close()
    if not opts.quiet:
        print("deleted %s; %d objects (%s) reclaimed" % (", ".join(opts.volumes), objects, size(freed)))
    return 0
