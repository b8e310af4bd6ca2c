"""restore: qubes by name from their settings record and volumes (doc/qubes.md).

Everything from the archive is authenticated and checked before the system
changes: each settings record (size bounded, then the strict schema), every
manifest chain, that existing qubes may be overwritten, that templates are
there.  Then: create missing qubes and apply their settings, templates
first; properties naming other qubes and devices last, once all exist;
stream each volume's verified chunks into Volume.import_data_with_size.
From there on nothing stops the restore: a setting qubesd refuses is an
omission, a qube that cannot be made or filled has failed, and the command
ends with every qube's outcome (exit 2 unless all were fully restored).
"""
import sys

from .. import qubes, settings
from ..archive import Archive
from ..errors import EXIT_PARTIAL, Fail
from ..progress import notice, say, size
from . import pick_session
from .receive import restore


class Plan:
    def __init__(self, qube, target, rec, session, data):
        self.qube, self.target, self.rec, self.session, self.data = qube, target, rec, session, data
        self.vm, self.created, self.omitted, self.failed = None, False, [], None

    def outcome(self):
        done = "%s from session %s%s" % ("created" if self.created else "restored", self.session,
                                         "".join(", %s %s" % (n, size(t)) for n, t, _m, _l in self.data))
        if self.failed:
            done = "FAILED: %s" % self.failed
            if self.vm:
                done += "; it keeps the tag %s, so it cannot start: restore it again with --force, or " \
                        "remove it (qvm-remove %s)" % (qubes.RESTORING, self.target)
        return "%s: %s%s" % (self.target, done, "; omitted: " + "; ".join(self.omitted) if self.omitted else "")


def chosen(opts, archive, app):
    """{qube: its archive volumes} of the qubes to restore; --all leaves
    out the qubes this system has (a new install's templates), unless
    --force."""
    have = {q: v for q, v in settings.qubes_in(archive.root).items() if settings.SETTINGS in v}
    if bool(opts.volumes) == bool(opts.all):
        raise Fail("restore: name the qubes or give --all (not both)")
    names = sorted(have) if opts.all else [settings.qube_name(n) for n in opts.volumes]
    for name in names:
        if name not in have:
            raise Fail("there is no backup of qube %s in the archive" % name)
    names = [n for n in dict.fromkeys(names) if n not in opts.exclude]
    here = [n for n in names if opts.all and not opts.force and qubes.state(app, n)]
    if here:
        notice(opts, "left out, as this system has them (--force restores over them): %s" % ", ".join(here))
        names = [n for n in names if n not in here]
    if opts.rename_to and len(names) != 1:
        raise Fail("--rename-to restores one qube")
    return {n: have[n] for n in names}


def load(opts, archive, qube, vols):
    """The checked record of ``qube`` at the session asked for, and the
    verified chunk maps of its volumes at that same session."""
    svol = vols[settings.SETTINGS]
    index = pick_session(opts, svol)
    ses = svol["sessions"][index]
    if ses["size"] > settings.MAX_SIZE:
        raise Fail("the settings record of %s is refused: %d bytes, more than %d" % (
            qube, ses["size"], settings.MAX_SIZE))
    buf = bytearray(ses["size"])

    def put(offset, data):
        buf[offset:offset + len(data)] = data
    restore(archive, archive.chunk_map(svol, index), ses["size"], put, opts, svol["name"])
    rec = settings.parse(buf, qube)
    data = []
    for name in [] if opts.settings_only else rec["volumes"]:
        vol = vols.get(name, {"sessions": []})
        found = [i for i, s in enumerate(vol["sessions"]) if s["name"] == ses["name"]]
        if not found:
            raise Fail("%s: volume %s has no session %s in the archive" % (qube, name, ses["name"]))
        data.append((name, vol["sessions"][found[0]]["size"], archive.chunk_map(vol, found[0]), vol["name"]))
    return Plan(qube, opts.rename_to or qube, rec, ses["name"], data)


def check(opts, app, plans):
    """Refuse before anything changes; returns the plans, templates first."""
    by_name = {p.qube: p for p in plans}
    for p in plans:
        found = qubes.state(app, settings.qube_name(p.target))
        if found is None and opts.data_only:
            raise Fail("--data-only: there is no qube %s to restore into" % p.target)
        if found and not opts.force:
            raise Fail("qube %s exists: --force restores over it (it must be halted)" % p.target)
        if found and found[0] != p.rec["class"]:
            raise Fail("qube %s is a %s, its backup a %s" % (p.target, found[0], p.rec["class"]))
        if found and not found[1]:
            raise Fail("qube %s is running: shut it down to restore over it" % p.target)
        template = p.rec["template"]
        if template and template not in by_name and qubes.state(app, template) is None:
            raise Fail("qube %s needs its template %s, which is neither on this system nor restored "
                       "(restore it too, or first)" % (p.qube, template))

    def depth(p, n=0):
        parent = by_name.get(p.rec["template"])
        return n if parent is None or n > len(plans) else depth(parent, n + 1)
    return sorted(plans, key=lambda p: (depth(p), p.qube))


def run(opts, app):
    if opts.settings_only and opts.data_only:
        raise Fail("--settings-only and --data-only exclude each other")
    app = qubes.connect(app)
    with Archive(opts, app).open() as archive:
        plans = check(opts, app, [load(opts, archive, q, v) for q, v in chosen(opts, archive, app).items()])
        rename = {p.qube: p.target for p in plans}
        for p in plans:  # a disposable's template needs template_for_dispvms before it is created
            p.created = qubes.state(app, p.target) is None
            try:
                p.vm = qubes.create(app, p.rec, p.target, opts.pool) if p.created else qubes.get(app, p.target)
                if not p.created:
                    qubes.begin(p.vm)
            except Fail as e:
                p.failed = str(e)
                continue
            if not opts.data_only:
                qubes.apply_settings(app, p.vm, p.rec, False, rename, p.omitted)
        made = [p for p in plans if p.vm]
        for p in [] if opts.data_only else made:
            qubes.apply_settings(app, p.vm, p.rec, True, rename, p.omitted)
        for p in made:
            try:
                for name, total, chunk_map, label in p.data:
                    qubes.import_volume(p.vm, name, total, lambda write: restore(
                        archive, chunk_map, total, write, opts, label))
                qubes.finish(p.vm)
            except (Fail, OSError) as e:
                p.failed = str(e)
    done = [p.vm for p in made if not p.failed]
    qubes.refresh_menus(done, opts)
    for p in plans:  # problems on stderr, also with --quiet
        (say if not p.failed and not p.omitted else tell)(opts, p.outcome())
        if p.created and not p.failed and p.rec["class"] in ("TemplateVM", "StandaloneVM"):
            notice(opts, "%s: its applications appear in the menus after: qvm-sync-appmenus %s" % (p.target, p.target))
    whole = [p for p in plans if not p.failed and not p.omitted]
    (say if len(whole) == len(plans) else tell)(opts, "restore: %d of %d qubes restored, %d with omissions, %d failed"
                                                % (len(whole), len(plans), len(done) - len(whole), len(plans) - len(done)))
    return 0 if len(whole) == len(plans) else EXIT_PARTIAL


def tell(_opts, text):
    print(text, file=sys.stderr)
