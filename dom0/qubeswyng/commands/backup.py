"""backup: qubes by name, their save_on_stop volumes and settings, and the
files or devices of --import-other-from (dom0's /boot, say), as one
session (doc/qubes.md).  Every volume of a backed-up qube gets a session,
changed or not, so a session name is a restore point of the whole qube.
Qubes Manager's "Last backup" is set only after the archive committed."""
import itertools
import time

from .. import qubes
from ..errors import Fail
from ..settings import PREFIX
from ..sources import open_all
from ..sources.image import ImageSource
from . import send


def run(opts, app):
    app = qubes.connect(app)
    vms = qubes.select(app, opts.volumes, opts.all, opts.exclude)
    extra = send.imports(opts)
    if len({n for n, _p in extra}) != len(extra) or any(n.startswith(PREFIX) for n, _p in extra):
        raise Fail("--import-other-from: each volume once, and not under %s (the qubes' own)" % PREFIX)
    targets = open_all(itertools.chain((pair for vm in vms for pair in qubes.sources(app, vm, opts)),
                                       ((name, ImageSource(path)) for name, path in extra)))
    opts.send_unchanged = True
    send.run(opts, app, targets)
    qubes.stamp(vms, int(time.time()))
    return 0
