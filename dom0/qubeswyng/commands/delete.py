"""delete --clean: remove this tool's local snapshots and metadata (for
the archive at --dest, or with --all for every archive), and with --local
also the snapshots found in that pool.  The archive is not touched."""
from ..archive import Archive
from ..errors import Fail
from ..sources.snapshots import clean_local


def run(opts, app):
    if not opts.clean:
        raise Fail("delete: only --clean is supported here")
    if not opts.all and not opts.dest:
        raise Fail("delete --clean: give --dest (that archive's local data) or --all")
    archive_id = None
    if not opts.all:
        archive = Archive(opts, app).open()
        archive_id = archive.header.archive_id
        archive.close()
    removed = clean_local(opts, archive_id)
    if not opts.quiet:
        print("removed %d snapshots and the local metadata of %s" % (
            len(removed), "every archive" if opts.all else "archive %s" % archive_id.hex()))
    return 0
