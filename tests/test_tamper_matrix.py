"""The tampering matrix: every kind of stored object x every way storage can
tamper with it x every command that reads it, on an encrypted archive and
on one stored with --encrypt=off --compression=off (where dom0's own MACs
and chunk ids are the only guard, the agent passing on what it reads).

Each cell tampers with one object, runs the command in this process (the
real agent over pipes, the qubesadmin double), and then puts the object
back.  A cell passes when the command either

- refused (R): exit 1 with one line ``qvm-wyng: error: …`` naming the kind
  of object (arch-check: its report of the damaged session; restore, when
  a chunk fails as the data streams: its report of the qube that failed,
  exit 2; send and verify, which carry on past a failing volume: an error
  line per failed volume and their count, exit 2, the send's other volume
  committed and the archive verifying), no traceback, nothing written to a
  receive or restore target; or
- warned (W): succeeded but named the problem (the collector keeps every
  chunk when a manifest cannot be read); or
- was not concerned (H): succeeded with the data intact (a command that
  never reads that object, or one that needs only its existence);

and when, after the object is put back, the archive is as it was (or, after
a command that changed it, every volume still verifies) and dom0's record of
the root is unchanged.  The expected outcomes are in ``expected``; a cell
that differs fails the test.  The printed matrix shows every cell.

Archives are built once for the module; a cell costs one command (about
0.2 s: most of it starting the agent).
"""
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import PASS
from images import MiB
from qubes_double import QubesDouble, build_system, scribble

KINDS = ("header", "root", "manifest", "chunk", "settings-manifest", "settings-chunk", "lock")
TAMPERS = ("bitflip", "truncate", "delete", "older", "swap", "foreign")
COMMANDS = ("receive", "verify", "arch-check", "send", "prune", "delete", "restore", "list")
WRITERS = ("arch-check", "send", "prune", "delete")
OTHER_PASS = "another passphrase entirely"
# what a refusal must name, by kind (the agent names objects by their storage name)
NAMES = {"header": r"header|passphrase|no archive", "root": r"root|archive: |rolled back",
         "manifest": r"manifest", "chunk": r"chunk", "settings-manifest": r"manifest",
         "settings-chunk": r"chunk", "lock": r"lock"}


def expected(flavor, kind, tamper, command):
    """The outcomes a cell may have (a set of R, W, H), or None where there
    is no cell: the command does not read the object, or the tamper cannot
    be (the header is written once; no lock is the normal state), or the
    plain archive's cell would repeat the encrypted one's (the header's
    settings and the lock are stored the same way in both)."""
    if (kind, tamper) in (("header", "older"), ("lock", "delete")):
        return None
    if flavor == "plain" and (kind == "lock" or kind == "header" and tamper not in ("swap", "foreign")):
        return None
    if kind in ("header", "root"):
        return {"R"}  # every command opens the archive
    if kind == "lock":  # only writers read it: they refuse a live lock, take a dead or unreadable one
        return {"R", "H"} if command in WRITERS else None
    if command == "list" or command == "send" and kind.endswith("chunk"):
        return None  # list reads the root only; send never reads a chunk it does not store
    if command in ("receive", "verify", "restore"):
        return {"R"}
    if command == "arch-check":
        if flavor == "plain" and kind.endswith("chunk") and tamper != "delete":
            return None  # documented: without encryption the agent cannot authenticate chunk contents
        return {"R"}
    if kind.endswith("manifest"):
        # send and prune read (and check) the chains of what they write; the collector (delete)
        # reads every manifest and removes no chunk if one is not the root's or lists a missing chunk
        return {"W", "H"} if command == "delete" else {"R"}
    # chunks: the collector (prune, delete) lists them; without one it removes nothing
    return {"W", "H"} if tamper == "delete" else {"H"}


# -- the archives --------------------------------------------------------------------------

class Run:
    def __init__(self, code, out, err):
        self.code, self.out, self.err = code, out, err


class World:
    """Archive A (tampered with) of qube work, two backups, plus volume
    ``vol``; archive B (another passphrase) and C (the same passphrase)
    supply the swapped and foreign objects."""

    def __init__(self, tmp, system, flavor):
        from qubeswyng import cli
        self.cli, self.tmp, self.system, self.flavor = cli, tmp, system, flavor
        self.meta = tmp / "meta"
        self.flags = ["--encrypt=off", "--compression=off"] if flavor == "plain" else []
        self.dirs = {name: tmp / name for name in "ABC"}
        self.run("arch-init", *self.flags, archive="A")
        self.run("backup", "work", archive="A")
        self.older = {"root": (self.dirs["A"] / "archive").read_bytes()}
        for name, passphrase in (("B", OTHER_PASS), ("C", PASS)):  # work as it was: other data than A's newest
            self.run("arch-init", *self.flags, archive=name, passphrase=passphrase)
            self.run("backup", "work", archive=name, passphrase=passphrase)
        work = system.domains["work"]
        scribble(work.volumes["private"], __import__("random").Random(3), count=2)
        work.memory = 1200
        self.run("backup", "work", archive="A")
        self.private = Path(work.volumes["private"].path).read_bytes()
        (tmp / "vol.img").write_bytes(os.urandom(300000))
        self.run("send", "--import-other-from=vol:|:%s" % (tmp / "vol.img"), archive="A")
        self._find_objects()
        # what send sends: the private volume with its first chunk changed, a settings record
        self.send_image = tmp / "send.img"
        self.send_image.write_bytes(os.urandom(4096) + self.private[4096:])
        self.send_record = tmp / "send.json"
        self.send_record.write_bytes(self.record.replace(b'"memory":1200', b'"memory":1300'))
        shutil.rmtree(self.meta / self.archive_id / "maps", ignore_errors=True)  # send must read (and check) the chain
        self.pristine = tmp / "A.pristine"
        shutil.copytree(self.dirs["A"], self.pristine)
        shutil.copytree(self.meta, tmp / "meta.pristine")
        self.tree = _tree(self.dirs["A"])
        self.seen = (self.meta / self.archive_id / "root-seen").read_bytes()
        self.list_out = self.run("list", archive="A").out
        self.sleeper = subprocess.Popen(["sleep", "3600"])
        self.left_qubes = 0

    def run(self, *args, archive="A", passphrase=PASS, expect=0):
        argv = ["--meta-dir=%s" % self.meta, "--passcmd=echo '%s'" % passphrase, "--authmin=5",
                "--dest=file:%s" % self.dirs[archive]] + list(args)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = self.cli.main(argv, app=self.system)
        done = Run(code, out.getvalue(), err.getvalue())
        assert expect is None or code == expect, "%s: exit %d\n%s%s" % (args, code, done.out, done.err)
        return done

    def _find_objects(self):
        """Storage names of the objects the cells tamper with, and of their
        older, swapped and foreign stand-ins."""
        from qubeswyng import cli
        from qubeswyng.archive import Archive
        maps, roots = {}, {}
        for name in "AC":
            opts = cli.parse(["--meta-dir=%s" % self.meta, "--passcmd=echo '%s'" % PASS,
                              "--dest=file:%s" % self.dirs[name], "list"])
            with Archive(opts).open() as archive:
                roots[name] = archive.root
                for vol in archive.root["volumes"]:
                    maps[name, vol["name"]] = [archive.chunk_map(vol, i) for i in range(len(vol["sessions"]))]
                if name == "A":
                    self.archive_id = archive.header.archive_id.hex()
                    self.record = bytearray()
                    vol = archive.volume("qubes/work/settings")
                    for _i, data in archive.fetch([(0, maps["A", vol["name"]][-1][0], vol["sessions"][-1]["size"])]):
                        self.record += data
        self.record = bytes(self.record)

        def manifest(name, volume, index=-1):
            vol = next(v for v in roots[name]["volumes"] if v["name"] == volume)
            return self.dirs[name] / "manifests" / vol["sessions"][index]["manifest"]

        def chunk(name, cid):
            return self.dirs[name] / "chunks" / cid.hex()[:2] / cid.hex()
        private, settings = maps["A", "qubes/work/private"], maps["A", "qubes/work/settings"]
        i = next(i for i in range(len(private[1])) if private[0][i] != private[1][i] and any(private[0][i])
                 and any(private[1][i]))
        j = next(j for j in range(len(private[1])) if j != i and any(private[1][j]) and private[1][j] != private[1][i])
        foreign_private = maps["C", "qubes/work/private"][-1]
        self.objects = {  # kind: (object, older, swap partner, foreign)
            "header": (self.dirs["A"] / "header", None, self.dirs["B"] / "header", self.dirs["C"] / "header"),
            "root": (self.dirs["A"] / "archive", "root", self.dirs["B"] / "archive", self.dirs["C"] / "archive"),
            "manifest": (manifest("A", "qubes/work/private"), manifest("A", "qubes/work/private", 0),
                         manifest("A", "qubes/work/private", 0), manifest("C", "qubes/work/private")),
            "chunk": (chunk("A", private[1][i]), chunk("A", private[0][i]), chunk("A", private[1][j]),
                      chunk("C", foreign_private[i])),
            "settings-manifest": (manifest("A", "qubes/work/settings"), manifest("A", "qubes/work/settings", 0),
                                  manifest("A", "qubes/work/private"), manifest("C", "qubes/work/settings")),
            "settings-chunk": (chunk("A", settings[1][0]), chunk("A", settings[0][0]), chunk("A", private[1][j]),
                               chunk("C", maps["C", "qubes/work/settings"][-1][0])),
        }

    # -- tampering --------------------------------------------------------------------------
    def tamper(self, kind, tamper):
        """Apply one tamper; returns [(path, bytes to put back or None)]."""
        if kind == "lock":
            return self._lock(tamper)
        target, older, partner, foreign = self.objects[kind]
        saved = [(target, target.read_bytes())]
        data = saved[0][1]
        if tamper == "bitflip":
            target.write_bytes(data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 0x10]) + data[len(data) // 2 + 1:])
        elif tamper == "truncate":
            target.write_bytes(data[:len(data) // 2])
        elif tamper == "delete":
            target.unlink()
        elif tamper == "older":
            target.write_bytes(self.older["root"] if older == "root" else older.read_bytes())
        elif tamper == "swap":
            if kind in ("header", "root"):  # one of a kind in an archive: archive B's
                target.write_bytes(partner.read_bytes())
            else:
                saved.append((partner, partner.read_bytes()))
                target.write_bytes(saved[1][1])
                partner.write_bytes(data)
        else:
            target.write_bytes(foreign.read_bytes())
        return saved

    def _lock(self, tamper):
        """Storage plants a lock: a writer's live lock with a bit flipped or
        cut short, one left by a dead writer, another live writer's, and
        one copied from another archive."""
        live = {"owner": "qvm-wyng send on %s (pid %d)" % (socket.gethostname(), self.sleeper.pid),
                "host": socket.gethostname(), "pid": self.sleeper.pid, "expires": time.time() + 3600,
                "token": "ab" * 8}
        body = json.dumps(live).encode()
        data = {"bitflip": body[:-1] + bytes([body[-1] ^ 0x10]), "truncate": body[:len(body) // 2],
                "older": json.dumps(dict(live, expires=time.time() - 60)).encode(),
                "swap": json.dumps(dict(live, owner="qvm-wyng prune on elsewhere", host="elsewhere",
                                        token="cd" * 8)).encode(),
                "foreign": json.dumps(dict(live, owner="qvm-wyng send (archive C)", token="ef" * 8)).encode()}[tamper]
        lock = self.dirs["A"] / "lock"
        lock.write_bytes(data)
        return [(lock, None)]

    def put_back(self, saved):
        for path, data in saved:
            if data is None:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            elif path.parent.exists():  # a command that removed the folder's last object took the folder
                path.write_bytes(data)

    def reset(self):
        for src, dst in ((self.pristine, self.dirs["A"]), (self.tmp / "meta.pristine", self.meta)):
            shutil.rmtree(dst)
            shutil.copytree(src, dst)
        for name in [vm.name for vm in self.system.domains if vm.name == "work-r"]:
            del self.system.domains[name]


def _tree(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# -- one cell ---------------------------------------------------------------------------------

def _command(world, kind, command, target):
    volume = "qubes/work/settings" if kind.startswith("settings") else "qubes/work/private"
    return {"receive": ["receive", volume, "--save-to=%s" % target],
            "verify": ["verify", "work"], "arch-check": ["arch-check"],
            "send": ["send", "--import-other-from=qubes/work/private:|:%s" % world.send_image,
                     "--import-other-from=qubes/work/settings:|:%s" % world.send_record],
            "prune": ["prune", "qubes/work/private", "qubes/work/settings", "--session=%s" % world.first_session],
            "delete": ["delete", "vol", "--unattended"], "restore": ["restore", "work", "--rename-to=work-r"],
            "list": ["list"]}[command]


def cell(world, kind, tamper, command):
    """Run one cell; returns (outcome, problems)."""
    problems = []
    target = world.tmp / "received"
    world.system.changes.clear()
    saved = world.tamper(kind, tamper)
    try:
        done = world.run(*_command(world, kind, command, target), expect=None)
    finally:
        world.put_back(saved)
    text = done.err + done.out
    if "Traceback" in text:
        problems.append("traceback")
    if done.code == 0:
        outcome = "W" if "warning:" in done.err else "H"
        problems += _intact(world, kind, command, target, done)
    else:
        outcome = "R"
        lines = done.err.strip().splitlines()
        # another archive's header makes the destination another archive: which check refuses it may
        # change (dom0 binds a destination to its archive), that one does is what counts
        whole_archive = kind == "header" and tamper in ("swap", "foreign")
        report = command == "arch-check" and not done.err and "problem" in done.out
        # restore reports each qube's outcome: a chunk fails while its data streams, after the qube was made
        restored = command == "restore" and re.match(r"work-r: FAILED: .*\nrestore: 0 of 1 qubes restored", done.err)
        # send and verify of several volumes carry on past a failing one (exit 2): an error line per
        # failed volume, then their count, the volumes that worked committed; an error that breaks
        # the link to the agent ends the command there (exit 1)
        partial = command in ("send", "verify") and lines and all(
            line.startswith("qvm-wyng: error: ") or re.match(r"qvm-wyng: \d+ volumes failed: ", line)
            for line in lines)
        if not (report or restored or partial) and not (len(lines) == 1 and lines[0].startswith("qvm-wyng: error: ")):
            problems.append("not a one-line error: %r" % done.err[:300])
        elif not whole_archive and not re.search(NAMES[kind], done.err + (done.out if report else ""), re.I):
            problems.append("the error does not name the %s: %r" % (kind, (done.err or done.out)[:200]))
        if target.exists() or any(world.tmp.glob(".received.*")):
            problems.append("receive left its target behind")
        work_r = [vm for vm in world.system.domains if vm.name == "work-r"]
        if work_r and Path(work_r[0].volumes["private"].path).read_bytes() == world.private:
            problems.append("restore wrote the volume")
        if work_r:  # chunks are checked while they stream: the qube exists, its import was aborted
            world.left_qubes += 1
        committed = partial and command == "send" and done.code == 2
        if committed:  # the other volume's session: with the object back, the archive must verify
            problems += _intact(world, kind, command, target, done)
        seen = (world.meta / world.archive_id / "root-seen").read_bytes()
        if seen != world.seen and not committed:
            problems.append("dom0's root-seen changed")
        after = _tree(world.dirs["A"])  # new objects are orphans the collector removes; nothing else may change
        changed = sorted(k for k in world.tree if after.get(k) != world.tree[k])
        if changed and not (committed and changed == ["archive"]):
            problems.append("a refused command changed or removed objects: %s" % changed[:3])
    if target.exists():
        target.unlink()
    world.reset()
    return outcome, problems


def _intact(world, kind, command, target, done):
    """After a command that succeeded (and the object is back): its result
    is right, and the archive still restores."""
    if command == "receive":
        want = world.record if kind.startswith("settings") else world.private
        return [] if target.read_bytes() == want else ["receive wrote other data"]
    if command == "list":
        return [] if done.out == world.list_out else ["list shows something else"]
    if command == "restore":
        vm = world.system.domains["work-r"]
        return [] if Path(vm.volumes["private"].path).read_bytes() == world.private else ["restore wrote other data"]
    if command in ("send", "prune", "delete"):
        after = world.run("verify", "work", expect=None)
        return [] if after.code == 0 else ["after the %s, with the object back, verify fails: %s"
                                           % (command, after.err.strip())]
    return []


# -- the matrix -------------------------------------------------------------------------------

@pytest.fixture
def system(tmp_path, btrfs_session):
    pool = btrfs_session / tmp_path.name
    yield build_system(QubesDouble(tmp_path / "dom0", pool_dir=pool), unit=MiB)
    shutil.rmtree(pool, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("flavor", ["encrypted", "plain"])
def test_tampering_matrix(system, tmp_path, flavor):
    world = World(tmp_path, system, flavor)
    world.first_session = json.loads(world.run("list", "qubes/work/private", "--json").out)["volumes"][0][
        "sessions"][0]["session"]
    results, failures = {}, []
    try:
        for kind in KINDS:
            for tamper in TAMPERS:
                for command in COMMANDS:
                    allowed = expected(flavor, kind, tamper, command)
                    if allowed is None:
                        continue
                    outcome, problems = cell(world, kind, tamper, command)
                    results[kind, tamper, command] = outcome
                    if outcome not in allowed or problems:
                        failures.append("%s %s x %s: %s (expected %s) %s" % (
                            kind, tamper, command, outcome, "/".join(sorted(allowed)), "; ".join(problems)))
    finally:
        world.sleeper.kill()
        world.sleeper.wait()
    _print(flavor, results, failures)
    print("refused restores that left the new qube (tagged backup-restore-in-progress, no data imported): %d"
          % world.left_qubes)
    assert not failures, "\n".join(failures)
    assert len(results) >= 100


def _print(flavor, results, failures):
    counts = {o: sum(1 for v in results.values() if v == o) for o in "RWH"}
    print("\ntampering matrix, %s archive: R refused, W warned, H not concerned (data intact), . no cell"
          % flavor)
    print("%-28s %s" % ("", " ".join("%-10s" % c for c in COMMANDS)))
    for kind in KINDS:
        for tamper in TAMPERS:
            row = [results.get((kind, tamper, c), ".") for c in COMMANDS]
            if set(row) != {"."}:
                print("%-28s %s" % (kind + " " + tamper, " ".join("%-10s" % r for r in row)))
    print("%d cells: %d refused, %d warned, %d not concerned; %d failed (undetected or wrong)"
          % (len(results), counts["R"], counts["W"], counts["H"], len(failures)))
