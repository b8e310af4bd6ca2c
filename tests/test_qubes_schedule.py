"""Scheduled backups: the systemd units the dom0 package ships, the command
their service runs (expanded from /etc/wyng/schedule.conf as systemd
expands it, and run the way the service runs it: qvm-wyng finds
qubesadmin itself, here the double), which qubes ``list --qubes`` calls
overdue, and the desktop notification.  systemd-analyze verify runs on the
packaged units in tests/test_packages.py.  Not covered here: systemd
starting the timer (no systemd as PID 1 on test machines) and a desktop
showing the notification (notify-send is a stub that records its call)."""
import configparser
import json
import os
import re
import shlex
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import PASS, REPO, need_root
from qubes_helpers import Dom0, release, system, timestamps  # noqa: F401 (fixtures)

SYSTEMD = REPO / "packaging" / "systemd"
NOTIFY = SYSTEMD / "qubes-wyng-notify"

ONE_RELEASE = pytest.mark.parametrize("release", ["4.3"])


def unit(name):
    """A unit file's sections, as systemd reads them."""
    parser = configparser.ConfigParser(interpolation=None, comment_prefixes=("#", ";"), strict=True)
    parser.optionxform = str
    parser.read(SYSTEMD / name)
    return parser


def environment_file(path):
    """KEY=VALUE lines, quotes removed (systemd's EnvironmentFile)."""
    pairs = (line.split("=", 1) for line in path.read_text().splitlines()
             if "=" in line and not line.lstrip().startswith(("#", ";")))
    return {key.strip(): " ".join(shlex.split(value)) for key, value in pairs}


def expand(command, env):
    """ExecStart= as systemd expands it: a word that is just $NAME becomes
    the value's words (none if empty); ${NAME} is put into its word."""
    argv = []
    for word in shlex.split(command):
        whole = re.fullmatch(r"\$(\w+)", word)
        argv += env.get(whole.group(1), "").split() if whole else [
            re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), ""), word)]
    return argv


def test_the_units_are_a_daily_catch_up_timer_and_a_oneshot_service():
    timer, service = unit("qubes-wyng-backup.timer"), unit("qubes-wyng-backup.service")
    assert dict(timer["Timer"]) == {"OnCalendar": "daily", "RandomizedDelaySec": "15min", "Persistent": "true"}
    assert timer["Install"]["WantedBy"] == "timers.target"  # enabled only by the user
    assert service["Service"]["Type"] == "oneshot"  # a run still going keeps the next one from starting
    assert service["Service"]["EnvironmentFile"] == "/etc/wyng/schedule.conf"
    assert service["Service"]["ExecStopPost"] == "-/usr/lib/qubes-wyng/notify"
    assert "Install" not in service


@ONE_RELEASE
def test_the_services_command_backs_up_the_scheduled_qubes_and_list_shows_the_overdue(tmp_path, system, monkeypatch):
    conf = tmp_path / "schedule.conf"
    conf.write_text((REPO / "etc" / "wyng" / "schedule.conf").read_text().replace(
        'QUBES="--all"', 'QUBES="--all --exclude=legacy"'))
    d = Dom0(tmp_path, system)
    d.init()
    ini = tmp_path / "wyng.ini"
    ini.write_text("[var-global-default]\ndest = %s\npasscmd = echo '%s'\nmeta-dir = %s\n" % (d.dest, PASS, d.meta))
    monkeypatch.setenv("QVM_WYNG_CONFIG", str(ini))
    monkeypatch.setenv("QVM_WYNG_SCHEDULE", str(conf))
    argv = expand(unit("qubes-wyng-backup.service")["Service"]["ExecStart"], environment_file(conf))
    assert argv == ["/usr/bin/qvm-wyng", "backup", "--unattended", "--all", "--exclude=legacy"]
    system.changes.clear()
    d.run(*argv[1:], app=False, defaults=False)
    assert sorted(timestamps(system)) == ["debian-12", "default-dvm", "disp-web", "fedora-40", "sys-firewall",
                                          "sys-net", "sys-usb", "vault", "work"]

    def overdue():
        rows = json.loads(d.run("list", "--qubes", "--json", app=False, defaults=False).out)
        assert rows["overdue_hours"] == 36
        return sorted(r["qube"] for r in rows["qubes"] if r["overdue"])
    assert overdue() == []
    system.add_new_vm("AppVM", "new-one", "green", template="fedora-40")  # scheduled, never backed up
    assert overdue() == ["new-one"]
    listed = d.run("list", "--qubes", app=False, defaults=False).out.splitlines()
    assert [line for line in listed if line.startswith("new-one ")][0].endswith("no backups  OVERDUE")
    assert listed[-1] == "1 of 10 scheduled qubes overdue (not backed up in 36 hours)"
    monkeypatch.setenv("QVM_WYNG_TEST_NOW", str(int(time.time()) + 37 * 3600))
    assert "legacy" not in overdue() and len(overdue()) == 10
    # another archive than the schedule's: the schedule says nothing about it
    other = "--dest=file:%s" % (tmp_path / "other")
    d.run("arch-init", other, app=False, defaults=False)
    assert d.run("list", "--qubes", other, app=False, defaults=False).out == ""


@ONE_RELEASE
def test_a_scheduled_run_that_cannot_get_the_passphrase_fails_with_one_line(tmp_path, system, monkeypatch):
    d = Dom0(tmp_path, system)
    d.init()
    ini = tmp_path / "wyng.ini"
    ini.write_text("[var-global-default]\ndest = %s\nmeta-dir = %s\nauthmin = 0\n" % (d.dest, d.meta))
    monkeypatch.setenv("QVM_WYNG_CONFIG", str(ini))
    done = d.run("backup", "--unattended", "--all", app=False, defaults=False, expect=1)
    assert done.err.startswith("qvm-wyng: error: ") and len(done.err.splitlines()) == 1
    assert timestamps(system) == {}


@pytest.mark.parametrize("result,notify,shown", [("exit-code", "failure", "Qubes backup failed (exit-code 1)"),
                                                 ("success", "failure", None),
                                                 ("success", "always", "Qubes backup done"),
                                                 ("exit-code", "never", None)])
def test_the_desktop_user_is_notified(result, notify, shown):
    need_root()
    with tempfile.TemporaryDirectory(prefix="qwyng-notify-") as where:  # runuser runs the stub as "nobody":
        where = Path(where)                                              # not under root's 0700 pytest folder
        where.chmod(0o777)
        out = where / "called"
        (where / "notify-send").write_text('#!/bin/sh\nprintf "%%s\\n" "$(id -un)" "$@" > %s\n' % out)
        (where / "notify-send").chmod(0o755)
        env = dict(os.environ, PATH="%s:%s" % (where, os.environ["PATH"]), SERVICE_RESULT=result, EXIT_STATUS="1",
                   NOTIFY=notify, NOTIFY_USER="nobody", INVOCATION_ID="0" * 32)
        subprocess.run([str(NOTIFY)], env=env, check=True, timeout=30)
        if shown is None:
            assert not out.exists()
            return
        lines = out.read_text().splitlines()
    assert lines[0] == "nobody" and lines[-2] == shown and lines[-1] == "See: journalctl -u qubes-wyng-backup"
    assert "--urgency=%s" % ("normal" if result == "success" else "critical") in lines
