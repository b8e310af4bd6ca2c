"""Where volumes come from (doc/sources.md).

``--local`` names a storage pool: an absolute directory on Btrfs or XFS
(``reflink``) or an LVM thin pool ``VG/POOL`` (``lvm``).  ``open_source``
gives the volume ``name`` of that pool as an object with one interface
(size, snapshots, deltas, reading, receiving); ``snapshots.py`` holds the
rotation rules both kinds share.  ``image.py`` reads any file in full.
"""
import re

from ..errors import Fail

class NoSnapshots(Fail):
    """The storage cannot make snapshots (a reflink directory on a
    filesystem without reflinks): send falls back to a full read."""


POOL = re.compile(r"[A-Za-z0-9+_.][A-Za-z0-9+_.-]*/[A-Za-z0-9+_.][A-Za-z0-9+_.-]*")


def backend(local):
    """The module for --local: ``reflink`` or ``lvm``."""
    if local.startswith("/"):
        from . import reflink
        return reflink
    if POOL.fullmatch(local):
        from . import lvm
        return lvm
    raise Fail("--local=%s: give an absolute directory (Btrfs, XFS) or an LVM thin pool VG/POOL" % local)


def open_source(local, name, create=False):
    """Volume ``name`` of the pool ``local``: ``reflink.Volume`` for a file
    ``<local>/<name>``, ``lvm.Volume`` for the thin volume ``VG/<name>``.
    It must exist unless ``create`` (a receive target)."""
    return backend(local).Volume(local, name, create)


def open_all(pairs):
    """The (name, source) pairs that the iterator ``pairs`` opens, as a
    list; if opening one fails, those already opened are closed."""
    opened = []
    try:
        opened.extend(pairs)  # what was opened before a failure stays in the list
    except BaseException:
        for _n, src in opened:
            src.close()
        raise
    return opened
