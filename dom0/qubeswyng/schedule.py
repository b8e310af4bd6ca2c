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
OVERDUE_HOURS = 36


def read(path):
    """{KEY: value} of an EnvironmentFile as systemd reads it (KEY=VALUE a
    line, comments start with # or ;, quotes removed); None if absent."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return None
    found = {}
    for line in (line.strip() for line in lines):
        if line and line[0] not in "#;" and "=" in line:
            key, _, value = line.partition("=")
            try:
                found[key.strip()] = " ".join(shlex.split(value))
            except ValueError:
                raise Fail("%s: %s: unbalanced quotes" % (path, key.strip())) from None
    return found


def scheduled(opts, app):
    """(the qubes a scheduled run backs up, hours after which their last
    backup is overdue) if there is a schedule and it backs up to the
    archive of ``opts``; None otherwise."""
    path = os.environ.get(ENV) or PATH
    conf = read(path)
    if conf is None:
        return None
    from . import cli, qubes  # the commands import this module; cli imports them
    try:
        run = cli.parse(["backup"] + conf.get("OPTIONS", "").split() + conf.get("QUBES", "").split())
        hours = int(conf.get("OVERDUE_HOURS", OVERDUE_HOURS))
        if run.dest != opts.dest:
            return None
        return [vm.name for vm in qubes.select(qubes.connect(app), run.volumes, run.all, run.exclude)], hours
    except (Fail, ValueError) as e:
        raise Fail("%s: %s" % (path, e)) from None
