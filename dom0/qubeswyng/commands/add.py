"""add: put volume names without sessions in the archive."""
from ..archive import Archive
from ..errors import Fail
from . import volume_name


def run(opts, app):
    names = [volume_name(n) for n in opts.volumes]
    if not names:
        raise Fail("add: name the volumes to add")
    archive = Archive(opts, app).open(write=True)
    try:
        for name in names:
            if archive.volume(name):
                raise Fail("volume %r is already in the archive" % name)
            archive.add_volume(name)
        archive.commit()
    finally:
        archive.close()
    if not opts.quiet:
        print("added %s" % ", ".join(names))
    return 0
