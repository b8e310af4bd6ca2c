"""One module per command; each has ``run(opts, app) -> exit code``.
Helpers shared by several commands live here."""
import re
import sys

from ..errors import EXIT_PARTIAL, Fail, report
from ..settings import resolve
from ..wire import LinkBroken

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
    raise Fail("volume %r has no session %s" % (vol["name"], "tagged %r" % spec[1:] if spec.startswith("^") else spec))


def open_session(opts, archive, name):
    """(volume, session, its verified chunk map) for volume ``name`` at the
    session --session names."""
    vol = archive.require_volume(name)
    index = pick_session(opts, vol)
    return vol, vol["sessions"][index], archive.chunk_map(vol, index)


def chosen_volumes(opts, archive, default_all=False):
    """The volumes named on the command line (a qube name stands for all its
    volumes), or all with --all (or when none are named and ``default_all``);
    less --volex."""
    if opts.volumes and opts.all:
        raise Fail("%s: name volumes or give --all, not both" % opts.command)
    if not opts.volumes and not (opts.all or default_all):
        raise Fail("%s: name the volumes, or give --all" % opts.command)
    vols = resolve(archive, opts.volumes) if opts.volumes else archive.root["volumes"]
    return [v for v in vols if v["name"] not in opts.volex]


class Several:
    """Work on several volumes as Wyng does: when one fails (but not the
    link to the agent, which cannot go on), its error is printed and the
    others are still done; the command then exits EXIT_PARTIAL."""

    def __init__(self, opts, carry_on):
        self.opts, self.carry_on, self.failed = opts, carry_on, []

    def each(self, items, work):
        """[(name, work(name, item))] for the (name, item) pairs that worked."""
        done = []
        for name, item in items:
            try:
                done.append((name, work(name, item)))
            except (Fail, OSError) as e:
                if not self.carry_on or isinstance(e, LinkBroken):
                    raise
                report(e, self.opts.debug, name)
                self.failed.append(name)
        return done

    def status(self):
        if self.failed:
            print("qvm-wyng: %d volumes failed: %s" % (len(self.failed), " ".join(self.failed)), file=sys.stderr)
        return EXIT_PARTIAL if self.failed else 0


def confirm(opts, question, unasked=None):
    """Ask on a terminal unless --unattended; without one, refuse.  With
    ``unasked`` (the error then), --unattended refuses too."""
    if opts.unattended and not unasked:
        return
    if opts.unattended or not sys.stdin.isatty():
        raise Fail(unasked or "%s needs confirmation: use --unattended" % opts.command)
    if input("%s [y/N] " % question).strip().lower() not in ("y", "yes"):
        raise Fail("%s: not confirmed, nothing changed" % opts.command)
