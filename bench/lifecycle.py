#!/usr/bin/env python3
"""Prune and garbage-collection benchmark (issue 4's budgets).

1. prune: a volume of --size bytes (bench/workload.py image) with --sessions
   sessions, each after rewriting 0.2 % of it; time to remove the middle
   session (fold + commit) and, apart, the garbage collection after it.
   Budget: 2 s plus GC for 4 GiB and 30 sessions.
2. gc: an archive with --chunks chunk objects, made through the real agent
   by PUT_CHUNK of tiny distinct chunks and ten volumes whose manifests list
   them (the objects are genuine sealed chunks; only their plaintext is
   small).  Then a volume is deleted and the collector removes its tenth.
   Budget: 1 million objects in 60 s with at most 200 MiB peak RSS.

Everything runs the real dom0 code in this process against the real agent
(qubes-rpc/wyng.Agent) on a local folder.  Output: Markdown on stdout and
the same figures as JSON in --json.
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "dom0"), str(REPO / "bench")]
os.environ.setdefault("QVM_WYNG_AGENT", str(REPO / "qubes-rpc" / "wyng.Agent"))
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO / "dom0"), str(REPO / "backupvm")])
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]

from qubeswyng import cli  # noqa: E402
from qubeswyng.archive import Archive  # noqa: E402
from qubeswyng.commands import prune  # noqa: E402
from qubeswyng.manifest import ChunkMap  # noqa: E402

import workload  # noqa: E402

PASS = "benchmark passphrase"


class Bench:
    def __init__(self, folder):
        self.folder = Path(folder)
        self.base = ["--dest=file:%s" % (self.folder / "archive"), "--meta-dir=%s" % (self.folder / "meta"),
                     "--passcmd=echo '%s'" % PASS, "--authmin=5"]

    def cli(self, *args):
        done = subprocess.run([sys.executable, "-m", "qubeswyng.cli"] + self.base + list(args),
                              capture_output=True, text=True)
        if done.returncode:
            raise SystemExit("qvm-wyng %s failed: %s" % (args[0], done.stderr))
        return done.stdout

    def open(self, command):
        return Archive(cli.parse(self.base + [command])).open(write=True)


def agent_peak(archive):
    """Peak RSS (KiB) of the agent process of this connection."""
    with open("/proc/%d/status" % archive.transport.proc.pid) as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1])


def bench_prune(b, size, sessions):
    image = b.folder / "volume.img"
    workload.make(image, size)
    b.cli("arch-init")
    start = time.monotonic()
    for n in range(sessions):
        if n:
            workload.change(image, 0.002, seed=n)
        b.cli("send", "--import-other-from=vol:|:%s" % image, "--send-unchanged")
    made = time.monotonic() - start
    os.sync()  # measure on a settled disk, not against the setup's writeback
    archive = b.open("prune")
    try:
        vol = archive.require_volume("vol")
        middle = vol["sessions"][sessions // 2]["name"]
        start = time.monotonic()
        archive.mark_garbage()
        prune._fold(archive, vol, {sessions // 2})
        archive.commit()
        fold = time.monotonic() - start
        start = time.monotonic()
        objects, freed = archive.collect()
        gc = time.monotonic() - start
        peak = agent_peak(archive)
    finally:
        archive.close()
    start = time.monotonic()  # the whole command as a user runs it, GC included
    b.cli("prune", "vol", "--session=" + vol["sessions"][sessions // 4]["name"])
    command = time.monotonic() - start
    chunks = sum(1 for _ in (b.folder / "archive" / "chunks").rglob("*"))
    image.unlink()
    return {"volume_bytes": size, "sessions": sessions, "session_removed": middle, "setup_s": round(made, 1),
            "prune_s": round(fold, 3), "gc_s": round(gc, 3), "prune_command_s": round(command, 3),
            "gc_removed_objects": objects,
            "gc_removed_bytes": freed, "objects_after": chunks, "agent_peak_rss_mib": round(peak / 1024, 1)}


def bench_gc(b, total, volumes=10):
    b.cli("arch-init", "--chunk-factor=1")
    archive = b.open("send")
    start = time.monotonic()
    try:
        per = total // volumes
        for v in range(volumes):
            ids = ChunkMap(per)
            for i in range(per):
                data = b"%d:%d" % (v, i)
                ids[i] = cid = archive.keys.chunk_id(data)
                archive.put_chunk(cid, data)
            vol = archive.add_volume("vol%02d" % v)
            ses = {"name": "20260101-000000", "time": 1767225600, "size": per * archive.chunk_size, "tags": {}}
            archive.write_manifest(vol, ses, "", ids, b"\xff" * (per // 8) + bytes([(1 << per % 8) - 1]))
            vol["sessions"].append(ses)
            archive.agent_stats()
        archive.commit()
    finally:
        archive.close()
    made = time.monotonic() - start
    os.sync()
    archive = b.open("delete")
    try:
        start = time.monotonic()
        objects, _freed = archive.collect()  # nothing to remove: a full scan
        scan = time.monotonic() - start
        vol = archive.require_volume("vol00")
        archive.mark_garbage()
        archive.root["volumes"].remove(vol)
        archive.commit()
        start = time.monotonic()
        removed, freed = archive.collect()
        gc = time.monotonic() - start
        peak = agent_peak(archive)
    finally:
        archive.close()
    return {"chunk_objects": per * volumes, "manifests": volumes, "setup_s": round(made, 1),
            "gc_nothing_to_remove_s": round(scan, 2), "gc_after_delete_s": round(gc, 2),
            "gc_removed_objects": removed, "gc_removed_bytes": freed,
            "agent_peak_rss_mib": round(peak / 1024, 1),
            "dom0_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=4 << 30, help="prune: volume size (default 4 GiB)")
    p.add_argument("--sessions", type=int, default=30, help="prune: sessions (default 30)")
    p.add_argument("--chunks", type=int, default=1000000, help="gc: chunk objects (default 1 million)")
    p.add_argument("--dir", help="work folder on the disk to measure (default: a temporary folder)")
    p.add_argument("--json", help="also write the figures here")
    p.add_argument("--only", choices=("prune", "gc"))
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="wyng-bench-", dir=args.dir))
    figures = {}
    try:
        if args.only != "gc":
            (work / "p").mkdir()
            figures["prune"] = bench_prune(Bench(work / "p"), args.size, args.sessions)
            shutil.rmtree(work / "p")
        if args.only != "prune":
            (work / "g").mkdir()
            figures["gc"] = bench_gc(Bench(work / "g"), args.chunks)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("# Prune and GC benchmark\n")
    print("machine: %d CPUs, %s, Python %s; load average at the end %.1f (other work shares the machine)\n"
          % (os.cpu_count(), os.uname().machine, sys.version.split()[0], os.getloadavg()[0]))
    if "prune" in figures:
        f = figures["prune"]
        print("## Prune one session of %d, %.1f GiB volume\n" % (f["sessions"], f["volume_bytes"] / 2 ** 30))
        print("| figure | value | budget | ratio |\n| --- | --- | --- | --- |")
        print("| fold + commit | %.3f s | 2 s | %.2f |" % (f["prune_s"], f["prune_s"] / 2))
        print("| GC after it | %.3f s, %d objects removed | — | — |" % (f["gc_s"], f["gc_removed_objects"]))
        if "prune_command_s" in f:
            print("| `qvm-wyng prune` of another session, whole command with GC | %.3f s | — | — |"
                  % f["prune_command_s"])
        print("| agent peak RSS | %.1f MiB | — | — |\n" % f["agent_peak_rss_mib"])
    if "gc" in figures:
        f = figures["gc"]
        print("## GC of %d chunk objects\n" % f["chunk_objects"])
        print("| figure | value | budget | ratio |\n| --- | --- | --- | --- |")
        print("| GC, nothing to remove | %.2f s | 60 s | %.2f |" % (f["gc_nothing_to_remove_s"],
                                                               f["gc_nothing_to_remove_s"] / 60))
        print("| GC after deleting a volume (%d objects removed) | %.2f s | 60 s | %.2f |" % (
            f["gc_removed_objects"], f["gc_after_delete_s"], f["gc_after_delete_s"] / 60))
        print("| agent peak RSS | %.1f MiB | 200 MiB | %.2f |" % (f["agent_peak_rss_mib"],
                                                              f["agent_peak_rss_mib"] / 200))
        print("| dom0 peak RSS | %.1f MiB | — | — |\n" % f["dom0_peak_rss_mib"])
    if args.json:
        with open(args.json, "w") as out:
            json.dump(figures, out, indent=1)


if __name__ == "__main__":
    main()
