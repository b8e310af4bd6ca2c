"""add: put volume names without sessions in the archive."""
from ..archive import Archive
from ..errors import Fail
from ..progress import say
from . import volume_name


def run(opts, app):
    names = [volume_name(n) for n in opts.volumes]
    if not names:
        raise Fail("add: name the volumes to add")
    with Archive(opts, app).open(write=True) as archive:
        for name in names:
            if archive.volume(name):
                raise Fail("volume %r is already in the archive" % name)
            archive.add_volume(name)
        archive.commit()
    say(opts, "added %s" % ", ".join(names))
    return 0
