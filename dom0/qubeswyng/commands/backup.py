"""backup: qubes by name, their save_on_stop volumes and settings, as one
session (doc/qubes.md).  Every volume of a backed-up qube gets a session,
changed or not, so a session name is a restore point of the whole qube.
Qubes Manager's "Last backup" is set only after the archive committed."""
import time

from .. import qubes
from ..sources import open_all
from . import send


def run(opts, app):
    app = qubes.connect(app)
    vms = qubes.select(app, opts.volumes, opts.all, opts.exclude)
    targets = open_all(pair for vm in vms for pair in qubes.sources(app, vm, opts))
    opts.send_unchanged, opts.import_other_from = True, []
    send.run(opts, app, targets)
    qubes.stamp(vms, int(time.time()))
    return 0
