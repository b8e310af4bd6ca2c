"""Prune and autoprune over two years of sessions made with the test clock.

Which sessions go is checked against a small reference model of Wyng's
rules written here; after each prune every remaining session must restore
byte for byte, and the chunk objects removed must be exactly those that
only the removed sessions used.
"""
import datetime
import hashlib
import random
from pathlib import Path

import pytest

from conftest import Wyng
from images import KiB, tree_digests

CHUNK = 64 * KiB  # --chunk-factor=1
CHUNKS = 4
DAY = 86400
START = 1735689600  # 2025-01-01 00:00 UTC
NOW = START + 730 * DAY  # when the pruning happens


class Session:
    def __init__(self, name, time, tags, chunks):
        self.name, self.time, self.tags, self.chunks = name, time, tags, chunks
        self.digest = hashlib.sha256(b"".join(chunks)).hexdigest()


def _utc(t):
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc)


def _times():
    """Sparse sessions over two years with a few busy days, dense ones in
    the last month."""
    rng, t, times = random.Random(11), START, []
    while t < NOW - 60 * DAY:
        times.append(t)
        if len(times) % 4 == 0:  # now and then a busy day
            times += [t + 2 * 3600, t + 5 * 3600, t + 9 * 3600]
        t += rng.randrange(8 * DAY, 30 * DAY)
    t = max(t, NOW - 30 * DAY)
    while t < NOW - 3600:
        times.append(t)
        t += rng.randrange(6 * 3600, 30 * 3600)
    return times


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("history")
    wyng = Wyng(tmp)
    wyng.init("--chunk-factor=1")
    rng = random.Random(5)
    chunks = [rng.randbytes(CHUNK) for _ in range(CHUNKS)]
    image = tmp / "img"
    sessions = []
    for n, t in enumerate(_times()):
        chunks[rng.randrange(CHUNKS)] = rng.randbytes(CHUNK)  # one new chunk per session
        image.write_bytes(b"".join(chunks))
        tags = {"monthly": ""} if n % 6 == 0 else {}
        if n in (9, 25):
            tags["before-upgrade"] = "system upgrade %d" % n
        assert wyng.main("send", "--import-other-from=vol:|:%s" % image, "--send-unchanged",
                         *["--tag=%s,%s" % kv for kv in tags.items()], env={"QVM_WYNG_TEST_NOW": str(t)}) == 0
        name = _utc(t).strftime("%Y%m%d-%H%M%S")
        sessions.append(Session(name, t, tags, list(chunks)))
    assert wyng.sessions("vol") == [s.name for s in sessions]
    return wyng, sessions


# -- the reference model -------------------------------------------------------

def _tagged(sessions, spec):
    return [s.name for s in sessions if spec[1:] in s.tags]


def _point(sessions, spec, last):
    if not spec.startswith("^"):
        return spec
    tagged = _tagged(sessions, spec)
    return (tagged[-1] if last else tagged[0]) if tagged else None


def model(sessions, session=None, all_before=False, keep=(), autoprune=None, apdays=(0, 62, 1, 2)):
    """Names of the sessions prune should remove."""
    gone = set()
    if session:
        specs = session.split(",")
        if all_before:
            end = _point(sessions, specs[0], last=True)
            gone = {s.name for s in sessions if end and s.name < end}
        elif len(specs) == 1:
            gone = {s.name for s in sessions if s.name == specs[0] or specs[0] in ["^" + t for t in s.tags]}
        else:
            first, last = _point(sessions, specs[0], False), _point(sessions, specs[1], True)
            gone = {s.name for s in sessions if first and last and first <= s.name <= last}
    if autoprune:  # one round, as prune runs it: full all candidates, on and min the oldest 3 and 1
        a, b, c, d = apdays
        age = {s.name: (NOW - s.time) / DAY for s in sessions}
        candidates = {s.name for s in sessions if a and age[s.name] > a}
        windows = {}
        for s in sessions:
            if s.name not in candidates and b and age[s.name] > b:
                day = (_utc(s.time).date() - datetime.date(1970, 1, 1)).days
                windows.setdefault(day // c, []).append(s)
        for members in windows.values():
            members.sort(key=lambda s: s.time)
            candidates |= {s.name for s in members[:len(members) - d]}
        for spec in keep:
            candidates -= {s.name for s in sessions if s.name == spec or spec[1:] in s.tags}
        candidates = sorted(candidates - {sessions[-1].name})
        gone |= set(candidates[:{"on": 3, "min": 1}.get(autoprune, len(candidates))])
    for spec in keep:
        gone -= {s.name for s in sessions if s.name == spec or spec[1:] in s.tags}
    gone.discard(sessions[-1].name)
    return gone


# -- checking a prune ----------------------------------------------------------

def _chunk_sizes(archive):
    return {p.name: p.stat().st_size for p in (Path(archive) / "chunks").rglob("*") if p.is_file()}


def _pruned(history, tmp_path, args, expect_gone, command="prune", new=None):
    source, sessions = history
    wyng = source.copy(tmp_path)
    keys = wyng.keys()
    before = _chunk_sizes(wyng.archive)
    wyng.at(NOW, command, *args)
    kept = [s for s in sessions if s.name not in expect_gone]
    names = wyng.sessions("vol")
    expect = {s.name: s.digest for s in kept}
    if new:
        expect[_utc(NOW).strftime("%Y%m%d-%H%M%S")] = new
    assert names == sorted(expect)
    assert wyng.restore_all()["vol"] == expect
    # exactly the chunks only removed sessions used are gone
    ids = {s.name: {keys.chunk_id(c).hex() for c in s.chunks} for s in sessions}
    used = set().union(*(ids[s.name] for s in kept))
    freed = set().union(set(), *(ids[n] for n in expect_gone)) - used
    after = _chunk_sizes(wyng.archive)
    assert set(before) - set(after) == freed
    assert sum(before.values()) - sum(after[n] for n in after if n in before) == sum(before[n] for n in freed)
    assert len(list((wyng.archive / "manifests").iterdir())) == len(names)
    return wyng


def test_history_spans_two_years_with_dense_recent_sessions(history):
    _w, sessions = history
    assert (sessions[-1].time - sessions[0].time) > 700 * DAY
    assert sum(NOW - s.time < 30 * DAY for s in sessions) > 20


CASES = [
    ("one session", dict(session="@5")),
    ("every session with a tag", dict(session="^monthly")),
    ("range of date-times", dict(session="@10,@20")),
    ("range from the first tagged to a date", dict(session="^before-upgrade,@30")),
    ("range from a date to the last tagged", dict(session="@3,^before-upgrade")),
    ("range that reaches the newest", dict(session="@40,@-1")),
    ("all before a date", dict(session="@30", all_before=True)),
    ("all before the last tagged", dict(session="^before-upgrade", all_before=True)),
    ("all before, keeping a date and a tag", dict(session="@-5", all_before=True, keep=["@7", "^monthly"])),
    ("autoprune full, default apdays", dict(autoprune="full")),
    ("autoprune full 365:31:1:2", dict(autoprune="full", apdays=(365, 31, 1, 2))),
    ("autoprune on 0:20:7:1", dict(autoprune="on", apdays=(0, 20, 7, 1))),
    ("autoprune min 400:1:1:1", dict(autoprune="min", apdays=(400, 1, 1, 1))),
    ("autoprune full 180:10:3:2 keeping a tag", dict(autoprune="full", apdays=(180, 10, 3, 2), keep=["^monthly"])),
    ("autoprune full 0:2:1:1", dict(autoprune="full", apdays=(0, 2, 1, 1))),
    ("autoprune on 400:0:1:1, thinning off", dict(autoprune="on", apdays=(400, 0, 1, 1))),
    ("autoprune min 0:62:1:2", dict(autoprune="min")),
]


def _args(sessions, case):
    """Command-line arguments for a case; @N stands for the name of session N."""
    def name(spec):
        return ",".join(sessions[int(p[1:])].name if p.startswith("@") else p for p in spec.split(","))
    case = dict(case)
    args = []
    if "session" in case:
        case["session"] = name(case["session"])
        args.append("--session=" + case["session"])
    if case.get("all_before"):
        args.append("--all-before")
    case["keep"] = [name(k) for k in case.get("keep", [])]
    args += ["--keep=" + k for k in case["keep"]]
    if "autoprune" in case:
        args.append("--autoprune=" + case["autoprune"])
    if "apdays" in case:
        args.append("--apdays=%d:%d:%d:%d" % case["apdays"])
    return args, case


@pytest.mark.parametrize("what,case", CASES, ids=[c[0] for c in CASES])
def test_prune_removes_what_the_rules_say(history, tmp_path, what, case):
    sessions = history[1]
    args, case = _args(sessions, case)
    gone = model(sessions, **case)
    assert gone, "the case should remove something"
    _pruned(history, tmp_path, ["vol"] + args, gone)


def test_send_with_autoprune_prunes_first(history, tmp_path):
    sessions = history[1]
    args, case = _args(sessions, dict(autoprune="full", apdays=(365, 31, 1, 2)))
    image = tmp_path / "new"
    image.write_bytes(b"".join(sessions[-1].chunks[:2]) + bytes(2 * CHUNK))
    _pruned(history, tmp_path, ["--import-other-from=vol:|:%s" % image] + args, model(sessions, **case),
            command="send", new=hashlib.sha256(image.read_bytes()).hexdigest())


def test_autoprune_is_off_when_a_and_b_are_both_0(history, tmp_path):
    source, sessions = history
    wyng = source.copy(tmp_path)
    before = _chunk_sizes(wyng.archive)
    for mode in ("full", "on", "min"):
        done = wyng.at(NOW, "prune", "vol", "--autoprune=" + mode, "--apdays=0:0:1:1")
        assert "no sessions to prune" in done.stdout
    assert wyng.sessions("vol") == [s.name for s in sessions] and _chunk_sizes(wyng.archive) == before


def test_prune_dry_run_says_what_it_would_remove_and_changes_nothing(history, tmp_path):
    source, sessions = history
    wyng = source.copy(tmp_path)
    args, case = _args(sessions, dict(autoprune="full", apdays=(365, 31, 1, 2)))
    wyng.run("list")  # the copy's --dest is bound to its archive by any first read
    before = tree_digests(wyng.archive), tree_digests(wyng.meta)
    done = wyng.at(NOW, "prune", "vol", "--dry-run", "--session=" + sessions[3].name, *args)
    assert done.stdout.startswith("vol: would remove %d sessions: " % len(model(sessions, **case) | {sessions[3].name}))
    assert set(done.stdout.split(": ", 2)[2].split()) == model(sessions, **case) | {sessions[3].name}
    assert (tree_digests(wyng.archive), tree_digests(wyng.meta)) == before


def test_newest_session_is_never_pruned(history, tmp_path):
    source, sessions = history
    wyng = source.copy(tmp_path)
    done = wyng.at(NOW, "prune", "vol", "--session=" + sessions[-1].name)
    assert "no sessions to prune" in done.stdout
    assert wyng.sessions("vol") == [s.name for s in sessions]


def test_prune_needs_a_selection(history, tmp_path):
    wyng = history[0].copy(tmp_path)
    assert "prune needs --session" in wyng.run("prune", "vol", expect=1).stderr
    assert "name the volumes, or give --all" in wyng.run("prune", "--session=20250101-000000", expect=1).stderr
    assert "A:B:C:D" in wyng.run("prune", "-a", "--autoprune=full", "--apdays=1:2:0:1", expect=1).stderr
