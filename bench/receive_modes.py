"""Benchmark: Wyng's receive modes against a full receive.

On a Btrfs loop file (under --workdir, outside the repository; the
archive lives beside it, not on it, so the loop device's counters are the
volume's own I/O) it builds a volume with bench/workload.py, sends it,
rewrites --change of it and sends again (session 2), rewrites --change
more (local changes after the last send), then times with a cold page
cache, restoring into the pool (--local):

- a full receive of session 1 (every chunk fetched, a new file written);
- --use-snapshot of session 1: a clone of the snapshot of session 2, and
  only the chunks session 2 changed fetched;
- --sparse of session 2 onto the volume (now session 1): the volume read
  once, only the chunks that differ fetched and written.

Figures: seconds, chunks fetched, bytes the Btrfs device read and wrote.
Targets: --use-snapshot <= 10 % of the full receive's time; --sparse reads
about the volume once and writes about what differs.

    sudo python3 bench/receive_modes.py                # 4 GiB, 1 % changed
    sudo python3 bench/receive_modes.py --size 512M    # a quick look
"""
import argparse
import os
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import workload  # noqa: E402
from cow import GiB, MiB, NAME, Tool, btrfs, digest, drop_caches, save, scatter, size_arg  # noqa: E402


def device_io(device):
    """(bytes read, bytes written) of a block device so far."""
    fields = Path("/sys/block/%s/stat" % os.path.basename(device)).read_text().split()
    return int(fields[2]) * 512, int(fields[6]) * 512


def timed_receive(tool, device, *args):
    drop_caches()
    before = device_io(device)
    seconds, out = tool.run("receive", NAME, *args)
    os.sync()
    read, written = (a - b for a, b in zip(device_io(device), before))
    fetched = int(re.search(r", (\d+) chunks\)", out).group(1))
    return {"seconds": round(seconds, 3), "chunks_fetched": fetched, "device_read": read, "device_written": written}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=size_arg, default=4 * GiB, help="volume size (default 4G)")
    p.add_argument("--change", type=float, default=0.01, help="fraction rewritten each time (default 0.01)")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/qubes-wyng-bench-receive"))
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args()
    mnt = args.workdir / "mnt"
    r = {"size": args.size, "change": args.change, "kernel": os.uname().release, "cpus": os.cpu_count()}
    with btrfs(args.workdir, args.size * 4) as device:
        vol, local, tool = mnt / NAME, "--local=%s" % mnt, Tool(args.workdir, device)
        workload.make(str(vol), args.size)
        tool.run("arch-init")
        first = tool.send(local, NAME)["session"]
        first_digest = digest(vol)
        r["changed_bytes"], r["changed_chunks"] = scatter(vol, args.change, MiB, 7)
        tool.send(local, NAME)
        second_digest = digest(vol)
        scatter(vol, args.change, MiB, 8)
        r["full"] = timed_receive(tool, device, local, "--overwrite", "--session=" + first)
        r["full_ok"] = digest(vol) == first_digest
        r["use_snapshot"] = timed_receive(tool, device, local, "--use-snapshot", "--overwrite", "--session=" + first)
        r["use_snapshot_ok"] = digest(vol) == first_digest
        r["sparse"] = timed_receive(tool, device, local, "--sparse", "--overwrite")
        r["sparse_ok"] = digest(vol) == second_digest
    report(r, args.out)


def report(r, out):
    lines = ["# receive: full, --use-snapshot, --sparse", "",
             "%.1f GiB volume on a Btrfs loop file; %.2f%% rewritten in 1 MiB pieces before the second "
             "session (%d chunks of 256 KiB) and as much again after it; page cache dropped before each "
             "receive. Kernel %s, %d CPUs." % (r["size"] / GiB, 100 * r["change"], r["changed_chunks"],
                                               r["kernel"], r["cpus"]), "",
             "| receive | seconds | chunks fetched | MiB read from the volume's fs | MiB written | restored right |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for label, key in (("full, session 1", "full"), ("--use-snapshot, session 1", "use_snapshot"),
                       ("--sparse, session 2 onto session 1", "sparse")):
        st = r[key]
        lines.append("| %s | %.2f | %d | %.1f | %.1f | %s |" % (label, st["seconds"], st["chunks_fetched"],
                     st["device_read"] / MiB, st["device_written"] / MiB, r[key + "_ok"]))
    lines += ["", "- --use-snapshot time / full receive time: **%.3f** (target <= 0.1)"
              % (r["use_snapshot"]["seconds"] / r["full"]["seconds"]),
              "- --sparse: read %.2f x the volume, wrote %.2f x the bytes that differ"
              % (r["sparse"]["device_read"] / r["size"], r["sparse"]["device_written"] / max(1, r["changed_bytes"]))]
    save(out, "receive", lines, r)


if __name__ == "__main__":
    main()
