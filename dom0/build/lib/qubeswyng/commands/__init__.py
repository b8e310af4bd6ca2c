"""One module per command; each has ``run(opts, app) -> exit code``.
Helpers shared by several commands live here."""
import re

from ..errors import Fail

SESSION_RE = re.compile(r"^\d{8}-\d{6}$")


def volume_name(name):
    """Archive volume names: relative paths or LVM names, printable, bounded."""
    if not name or len(name.encode()) > 240 or not name.isprintable() \
            or name.startswith("/") or ".." in name.split("/") or ":|:" in name:
        raise Fail("%r is not a valid volume name" % name)
    return name


def pick_session(opts, vol):
    """Index of the session --session names in ``vol`` (newest if none)."""
    sessions = vol["sessions"]
    if not sessions:
        raise Fail("volume %r has no sessions" % vol["name"])
    spec = opts.session
    if not spec:
        return len(sessions) - 1
    if "," in spec:
        raise Fail("--session: give one session here, not a range")
    if spec.startswith("^"):
        for i in range(len(sessions) - 1, -1, -1):
            if spec[1:] in sessions[i].get("tags", {}):
                return i
        raise Fail("volume %r has no session tagged %r" % (vol["name"], spec[1:]))
    if not SESSION_RE.match(spec):
        raise Fail("--session: %r is not YYYYMMDD-HHMMSS or ^TAG" % spec)
    for i in range(len(sessions) - 1, -1, -1):
        if sessions[i]["name"] == spec:
            return i
        if sessions[i]["name"] < spec and opts.session_strict == "off":
            return i
    raise Fail("volume %r has no session %s" % (vol["name"], spec))
