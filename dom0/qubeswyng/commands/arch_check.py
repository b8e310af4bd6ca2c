"""arch-check: check everything the archive holds, report what is wrong.

dom0 reads every selected session's manifest and checks its MAC and header
against the root (the chain); the agent opens every chunk those manifests
use (authenticated decryption, bounded decompression), reports missing
ones and, for a whole-archive check, objects no session uses, which
--clean removes.  Problems are reported by volume and session; the exit
status is 1 when there is any.
"""
from .. import archive as A
from ..archive import Archive
from ..errors import Fail
from ..progress import say, size
from ..wire import LinkBroken
from . import SESSION_RE, chosen_volumes, pick_session

# what the agent's SCAN records say, as %-formats of their figures
SESSION_PROBLEMS = {A.BAD_MANIFEST: "the agent cannot read its manifest", A.MISSING: "%(a)d chunks missing",
                    A.DAMAGED: "%(a)d chunks damaged (fail authentication)"}
ARCHIVE_NOTES = {A.UNUSED_CHUNKS: "%(a)d unused chunks (%(size)s)", A.UNUSED_MANIFESTS: "%(a)d unused manifests",
                 A.LEFTOVERS: "%(a)d leftover temporary files"}


def _indexes(opts, vol):
    """newest: the newest session; DATE or ^TAG: that one and all older."""
    if not vol["sessions"]:
        return []
    return [len(vol["sessions"]) - 1] if opts.session == "newest" else list(range(pick_session(opts, vol) + 1))


def run(opts, app):
    whole = not opts.volumes and not opts.session
    if opts.clean and not whole:
        raise Fail("--clean removes unused objects of the whole archive: name no volumes or --session")
    if opts.session and opts.session != "newest" and not (SESSION_RE.match(opts.session) or
                                                            opts.session.startswith("^")):
        raise Fail("--session: give newest, YYYYMMDD-HHMMSS or ^TAG")
    with Archive(opts, app).open(write=True) as archive:  # the lock keeps writers out while we look
        vols = chosen_volumes(opts, archive, default_all=True)
        items = [(v, i) for v in vols for i in _indexes(opts, v)] if not whole else archive.manifests()
        problems = {}
        for vol in vols:
            names = [s["name"] for s in vol["sessions"]]
            if names != sorted(set(names)):
                problems.setdefault((vol["name"], ""), []).append("sessions out of order in the root")
        for vol, i in items:
            try:
                for _entry in archive.read_manifest(vol, i):
                    pass
            except LinkBroken:
                raise
            except Fail as e:
                problems.setdefault((vol["name"], vol["sessions"][i]["name"]), []).append(str(e))
        mode = A.SCAN_OBJECTS | (A.SCAN_WHOLE if whole else 0) | (A.SCAN_CLEAN if opts.clean else 0)
        records = archive.scan(mode, items)
    notes = []
    for kind, index, a, b, c in records:
        figures = {"a": a, "size": size(b)}
        if kind in SESSION_PROBLEMS and index < len(items):
            vol, i = items[index]
            problems.setdefault((vol["name"], vol["sessions"][i]["name"]), []).append(SESSION_PROBLEMS[kind] % figures)
        elif kind in ARCHIVE_NOTES and a:
            notes.append(ARCHIVE_NOTES[kind] % figures)
        elif kind == A.TOTAL and not opts.quiet:
            print("checked %d manifests; the agent opened %d chunks" % (len(items), c))
        elif kind == A.REMOVED and not opts.quiet:
            print("--clean removed %d objects (%s)" % (a, size(b)))
    for (vol, ses), what in sorted(problems.items()):
        print("%s %s: %s" % (vol, ses or "(volume)", "; ".join(what)))
    if notes and not opts.clean:
        print("archive: %s (--clean removes them)" % ", ".join(notes))
    bad = len(problems) + (0 if opts.clean else len(notes))
    if bad:
        print("arch-check: %d problem%s found" % (bad, "s"[:bad != 1]))
        return 1
    say(opts, "arch-check: no problems found")
    return 0
