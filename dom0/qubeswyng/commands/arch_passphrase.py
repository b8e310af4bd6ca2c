"""arch-passphrase: change the archive's passphrase (doc/FORMAT.md, Header).

The master key is re-wrapped under the new passphrase with a new salt and
scrypt parameters calibrated on this machine, as arch-init does (an old
archive gets today's cost); no data, manifest or root changes.  The agent
replaces the header in one atomic write, so a kill at any moment leaves
the old passphrase or the new one working, never both, never neither.
The old passphrase is always asked for (a cached key does not do), and
this archive's cached key is removed before and after: every later command
asks for the new passphrase.
"""
from .. import keys as K
from ..archive import Archive
from ..formats import Header
from ..progress import say


def run(opts, app):
    opts.authmin = -1  # ask for the old passphrase; forget the cached key
    with Archive(opts, app).open(write=True) as archive:
        new, old = K.read_passphrase(opts, confirm=True, new=True), archive.header
        header = Header(old.archive_id, old.cipher, old.compression, old.level, old.chunk_factor,
                        K.kdf_params())  # calibrated here, as arch-init does
        archive.put_header(header.seal(new, archive.master))
        K.cached_master(old.archive_id, -1)
    say(opts, "the passphrase of archive %s is changed" % old.archive_id.hex())
    return 0
