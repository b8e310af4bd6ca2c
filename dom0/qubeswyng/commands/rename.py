"""rename: give an archive volume another name (its data stays as it is)."""
from ..archive import Archive
from ..errors import Fail
from ..progress import say
from . import volume_name


def run(opts, app):
    if len(opts.volumes) != 2:
        raise Fail("rename takes OLD NEW")
    old, new = opts.volumes[0], volume_name(opts.volumes[1])
    with Archive(opts, app).open(write=True) as archive:
        vol = archive.require_volume(old)
        if archive.volume(new):
            raise Fail("volume %r is already in the archive" % new)
        vol["name"] = new
        archive.root["volumes"].sort(key=lambda v: v["name"])
        archive.commit()
    say(opts, "renamed %s to %s" % (old, new))
    return 0
