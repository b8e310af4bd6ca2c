"""The scheduled backup (doc/qubes.md, "Scheduled backups").

qubes-wyng-backup.timer starts qubes-wyng-backup.service, which runs
``qvm-wyng backup --unattended $OPTIONS $QUBES`` with the variables of
/etc/wyng/schedule.conf (its EnvironmentFile).  ``list --qubes`` reads the
same file to tell which qubes the schedule has not backed up in time.
"""
import os
import shlex

from .errors import Fail

PATH = "/etc/wyng/schedule.conf"
ENV = "QVM_WYNG_SCHEDULE"  # another file, for tests


def scheduled(opts, app):
    """(the qubes a scheduled run backs up, hours after which their last
    backup is overdue) if there is a schedule and it backs up to the
    archive of ``opts``; None otherwise.  The file is read as systemd reads
    an EnvironmentFile: KEY=VALUE lines, # and ; comments, quotes removed."""
    path = os.environ.get(ENV) or PATH
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.partition("=") for line in f.read().splitlines() if line.strip()[:1] not in ("", "#", ";")]
    except FileNotFoundError:
        return None
    from . import cli, qubes  # the commands import this module; cli imports them
    try:
        conf = {key.strip(): " ".join(shlex.split(value)) for key, _, value in lines}
        run = cli.parse(["backup"] + conf.get("OPTIONS", "").split() + conf.get("QUBES", "").split())
        if run.dest != opts.dest:
            return None
        names = [vm.name for vm in qubes.select(qubes.connect(app), run.volumes, run.all, run.exclude)]
        return names, int(conf.get("OVERDUE_HOURS", 36))
    except (Fail, ValueError) as e:
        raise Fail("%s: %s" % (path, e)) from None
