"""One module per command; each has ``run(opts, app) -> exit code``.
Helpers shared by several commands live here."""
import re

from ..errors import Fail
from ..settings import resolve

SESSION_RE = re.compile(r"^\d{8}-\d{6}$")


def volume_name(name):
    """Archive volume names: relative paths or LVM names, printable, bounded."""
    if not name or len(name.encode()) > 240 or not name.isprintable() \
            or name.startswith("/") or ".." in name.split("/") or ":|:" in name:
        raise Fail("%r is not a valid volume name" % name)
    return name


def session_spec(spec):
    """A --session (or --keep) value, YYYYMMDD-HHMMSS or ^TAG, checked."""
    if not spec.startswith("^") and not SESSION_RE.match(spec):
        raise Fail("--session: %r is not YYYYMMDD-HHMMSS or ^TAG" % spec)
    return spec


def matches(ses, spec):
    """Whether session record ``ses`` is the date-time ``spec``, or carries its ^TAG."""
    return spec[1:] in ses.get("tags", {}) if spec.startswith("^") else ses["name"] == spec


def pick_session(opts, vol):
    """Index of the session --session names in ``vol``: the newest if none,
    the newest with a ^TAG; with --session-strict=off a date-time that
    matches none picks the newest session before it."""
    sessions = vol["sessions"]
    if not sessions:
        raise Fail("volume %r has no sessions" % vol["name"])
    spec = opts.session
    if not spec:
        return len(sessions) - 1
    if "," in spec:
        raise Fail("--session: give one session here, not a range")
    loose = not session_spec(spec).startswith("^") and opts.session_strict == "off"
    for i in range(len(sessions) - 1, -1, -1):
        if matches(sessions[i], spec) or loose and sessions[i]["name"] < spec:
            return i
    if spec.startswith("^"):
        raise Fail("volume %r has no session tagged %r" % (vol["name"], spec[1:]))
    raise Fail("volume %r has no session %s" % (vol["name"], spec))


def chosen_volumes(opts, archive, default_all=False):
    """The volumes named on the command line (a qube name stands for all its
    volumes), or all with --all (or when none are named and ``default_all``)."""
    if opts.volumes and opts.all:
        raise Fail("%s: name volumes or give --all, not both" % opts.command)
    if opts.all or (default_all and not opts.volumes):
        return archive.root["volumes"][:]
    if not opts.volumes:
        raise Fail("%s: name the volumes, or give --all" % opts.command)
    return resolve(archive, opts.volumes)


def confirm(opts, question):
    """Ask on a terminal unless --unattended; without one, refuse."""
    import sys
    if opts.unattended:
        return
    if not sys.stdin.isatty():
        raise Fail("%s needs confirmation: use --unattended" % opts.command)
    if input("%s [y/N] " % question).strip().lower() not in ("y", "yes"):
        raise Fail("%s: not confirmed, nothing changed" % opts.command)
