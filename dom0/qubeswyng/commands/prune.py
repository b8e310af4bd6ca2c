"""prune: remove sessions and reclaim their space (doc/lifecycle.md).

Chunk data is never rewritten.  Each run of removed sessions is folded into
the next kept session: its manifest is rewritten as the union of the run's
entries and its own (its own winning, cut to its size), after dom0 verified
every manifest it merges.  Then the root is committed and the agent's
garbage collector removes what no session uses any more.  The newest
session of a volume is never removed.
"""
import re

from ..archive import Archive
from ..clock import now, point
from ..errors import Fail
from ..manifest import ChunkMap, chunk_count, entries
from ..progress import say, size
from ..sources.snapshots import carry
from . import chosen_volumes, matches, session_spec

DAY = 86400
APDAYS = re.compile(r"^(\d{1,5}):(\d{1,5}):(\d{1,5}):(\d{1,5})$")


# -- which sessions ------------------------------------------------------------

def _resolve(vol, spec, last):
    """The session name a range end stands for: a date-time as given, a
    ^TAG the first (or ``last``) session carrying it; None if no session does."""
    if not session_spec(spec).startswith("^"):
        return spec
    tagged = [s["name"] for s in vol["sessions"] if matches(s, spec)]
    return (tagged[-1] if last else tagged[0]) if tagged else None


def by_session(opts, vol):
    """Indexes --session (with --all-before) selects in ``vol``: one date-time
    or every session with a tag; an inclusive range; or all before a point."""
    specs = opts.session.split(",")
    names = [s["name"] for s in vol["sessions"]]
    if len(specs) > 2 or not all(specs) or (opts.all_before and len(specs) != 1):
        raise Fail("--session takes SESSION or FIRST,LAST (one only with --all-before)")
    if opts.all_before:
        end = _resolve(vol, specs[0], last=True)
        return {i for i, n in enumerate(names) if end and n < end}
    if len(specs) == 1:
        spec = session_spec(specs[0])
        return {i for i, s in enumerate(vol["sessions"]) if matches(s, spec)}
    first, last = _resolve(vol, specs[0], last=False), _resolve(vol, specs[1], last=True)
    return {i for i, n in enumerate(names) if first and last and first <= n <= last}


def parse_apdays(spec):
    m = APDAYS.match(spec or "0:62:1:2")
    if not m or int(m.group(3)) < 1 or int(m.group(4)) < 1:
        raise Fail("--apdays takes A:B:C:D, whole days and sessions, C and D at least 1")
    return tuple(int(x) for x in m.groups())


def by_age(apdays, vol, when):
    """Indexes autoprune may remove, as Wyng picks them: every session older
    than A days (A > 0), and sessions older than B days (B > 0) thinned to
    the newest D of each C-day window (UTC days).  A and B both 0: none."""
    a, b, c, d = apdays
    sessions, windows = vol["sessions"], {}
    chosen = {i for i, s in enumerate(sessions) if a and when - s["time"] > a * DAY}
    for i, s in enumerate(sessions):
        if i not in chosen and b and when - s["time"] > b * DAY:
            windows.setdefault(s["time"] // (c * DAY), []).append(i)
    for members in windows.values():
        chosen.update(members[:-d])
    return chosen


def plan(opts, vols, by_spec):
    """[(volume, names of the sessions to remove)]: what --session selects
    (``by_spec``) or autoprune's candidates, minus --keep and the newest
    session."""
    out = []
    for vol in vols:
        chosen = by_session(opts, vol) if by_spec else by_age(parse_apdays(opts.apdays), vol, now())
        for spec in map(session_spec, opts.keep):
            chosen -= {i for i, s in enumerate(vol["sessions"]) if matches(s, spec)}
        chosen.discard(len(vol["sessions"]) - 1)
        if chosen:
            out.append((vol, [vol["sessions"][i]["name"] for i in sorted(chosen)]))
    return out


# -- removing them -------------------------------------------------------------

def remove(archive, opts, removals, names):
    """Fold, commit, collect, after noting the sessions in ``names``
    ({volume name: {session names}}); with --dry-run only that.  Returns
    (objects, bytes) the collector removed.  Sessions go by name, never by
    a position that an earlier fold changed."""
    for vol, gone in removals:
        names.setdefault(vol["name"], set()).update(gone)
    if not removals or opts.dry_run:
        return 0, 0
    archive.mark_garbage()
    point("dom0:prune-marked")
    for vol, gone in removals:
        _fold(archive, vol, set(gone))
    archive.commit()
    return archive.collect()


def _fold(archive, vol, gone):
    sessions, kept, run = vol["sessions"], [], []
    for i, ses in enumerate(sessions):
        if ses["name"] in gone and i < len(sessions) - 1:
            run.append(i)
            continue
        if run:
            old_mac = ses["mac"]
            ses = _merge(archive, vol, run, i, kept[-1]["name"] if kept else "")
            if i == len(sessions) - 1:  # the volume is unchanged: keep dom0's map and snapshot records
                cached = archive.meta.load_map(vol["id"], bytes.fromhex(old_mac))
                if cached is not None:
                    archive.meta.save_map(vol["id"], bytes.fromhex(ses["mac"]), cached)
                carry(archive.meta, vol["id"], old_mac, ses["mac"])
            run = []
        kept.append(ses)
    vol["sessions"] = kept


def _merge(archive, vol, run, i, parent):
    """The manifest of session ``i`` with the removed ``run`` before it
    folded in: 32 bytes and a bit per chunk of session ``i``."""
    nxt = vol["sessions"][i]
    count = chunk_count(nxt["size"], archive.chunk_size)
    ids, listed = ChunkMap(count), bytearray((count + 7) // 8)
    for j in run + [i]:
        for index, cid in entries(archive.read_manifest(vol, j)):
            if index < count:
                ids[index] = cid
                listed[index >> 3] |= 1 << (index & 7)
    record = {k: nxt[k] for k in ("name", "time", "size", "tags")}
    return archive.write_manifest(vol, record, parent, ids, listed)


STEP = {"on": 3, "min": 1}  # autoprune candidates removed per volume and round (full: all at once)


def autoprune(archive, opts, vols, names, needed=None):
    """Remove autoprune's candidates of ``vols``: full all of them; on and
    min up to 3 and 1 of each volume's oldest a round, rounds going on while
    the destination has less than ``needed`` bytes free (None: one round).
    --dry-run: the first round.  Returns the (objects, bytes) reclaimed."""
    step, reclaimed = STEP.get(opts.autoprune), (0, 0)
    while True:
        free = archive.free_bytes() if step and needed is not None else -1  # -1: no space rule
        if free is None or free >= (needed or 0):
            break
        removals = [(v, gone[:step]) for v, gone in plan(opts, vols, by_spec=False)]
        reclaimed = tuple(map(sum, zip(reclaimed, remove(archive, opts, removals, names))))
        if not removals or not step or needed is None or opts.dry_run:
            break
    return reclaimed


def report(opts, names, reclaimed, show=say):
    for name, gone in names.items():
        show(opts, "%s: %s %d session%s: %s" % (name, "would remove" if opts.dry_run else "removed", len(gone),
                                                "s"[:len(gone) != 1], " ".join(sorted(gone))))
    if names and not opts.dry_run:
        show(opts, "pruned %d sessions; %d objects (%s) reclaimed" % (
            sum(map(len, names.values())), reclaimed[0], size(reclaimed[1])))


def run(opts, app):
    if not opts.session and opts.autoprune in (None, "off"):
        raise Fail("prune needs --session=SESSION[,SESSION] or --autoprune=on|min|full")
    parse_apdays(opts.apdays)
    names = {}
    with Archive(opts, app).open(write=not opts.dry_run) as archive:
        vols = chosen_volumes(opts, archive)
        reclaimed = remove(archive, opts, plan(opts, vols, by_spec=True), names) if opts.session else (0, 0)
        if opts.autoprune not in (None, "off"):
            reclaimed = tuple(map(sum, zip(reclaimed, autoprune(archive, opts, vols, names))))
    report(opts, names, reclaimed)
    if not names:
        say(opts, "no sessions to prune")
    return 0
