"""monitor: fold the changes since the last send into each volume's change
map and replace its snapshot with a new one, so snapshots never age and
hold space (sources/snapshots.py).  Works on dom0's records alone: no
archive, no passphrase, every archive the volume was sent to."""
from ..errors import Fail
from ..sources.snapshots import monitor


def run(opts, _app):
    if not opts.local:
        raise Fail("monitor needs --local")
    if bool(opts.volumes) == bool(opts.all):
        raise Fail("monitor: name volumes or give --all")
    results = monitor(opts, None if opts.all else opts.volumes)
    missing = set(opts.volumes) - {name for name, _r in results}
    for name, result in results:
        if not opts.quiet or not isinstance(result, int):
            print("%s: %s" % (name, "%d chunks changed since the last send" % result
                              if isinstance(result, int) else result))
    if missing:
        raise Fail("monitor: no snapshot records for %s: send them with --local=%s first"
                   % (", ".join(sorted(missing)), opts.local))
    return 0
