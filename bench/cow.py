"""Benchmark: incremental send from reflink snapshots against the image source.

On a Btrfs loop file (kept under --workdir, outside the repository) it
builds a volume with bench/workload.py, sends it in full twice (as a
reflink volume with --local, and as a plain image with
--import-other-from), rewrites a fraction of it at scattered places, then
times, in the same run and on the same data, the incremental send of each
with a cold page cache, and a send with no change (auth cache warm).
Figures come from ``send --json``, and the bytes each send read are also
counted from outside the program: the loop device's read statistics
(/sys/block/loopN/stat, sectors read) around each send, page cache dropped
first.  Results go to --out as Markdown and JSON.

    sudo python3 bench/cow.py                      # 16 GiB, 1% changed
    sudo python3 bench/cow.py --size 2G --verify   # smaller, and restore-check
"""
import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import workload  # noqa: E402

GiB, MiB, KiB = 1 << 30, 1 << 20, 1 << 10
NAME = "vol.img"


def sh(*argv):
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def size_arg(text):
    units = {"K": KiB, "M": MiB, "G": GiB}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def device_read(device):
    """Bytes read from the block device so far (its stat file counts 512-byte sectors)."""
    with open("/sys/block/%s/stat" % os.path.basename(device)) as f:
        return int(f.read().split()[2]) * 512


class Tool:
    def __init__(self, work, device):
        self.device = device
        self.base = [sys.executable, "-m", "qubeswyng.cli", "--meta-dir=%s" % (work / "meta"),
                     "--passcmd=echo bench-passphrase", "--authmin=30", "--dest=file:%s" % (work / "archive")]
        self.env = dict(os.environ, PYTHONPATH="%s/dom0:%s/backupvm" % (REPO, REPO),
                        QVM_WYNG_AGENT=str(REPO / "qubes-rpc" / "wyng.Agent"),
                        PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])

    def run(self, *args):
        start = time.monotonic()
        done = subprocess.run(self.base + list(args), capture_output=True, text=True, env=self.env)
        seconds = time.monotonic() - start
        if done.returncode:
            raise SystemExit("qvm-wyng %s failed: %s" % (" ".join(args), done.stderr.strip()))
        return seconds, done.stdout

    def send(self, *args):
        before = device_read(self.device)
        seconds, out = self.run("send", "--json", *args)
        st = json.loads(out)["volumes"][0]
        st["seconds"] = round(seconds, 3)
        st["device_read"] = device_read(self.device) - before
        return st


def scatter(path, fraction, write_size, seed):
    """Rewrite ``fraction`` of the file with random bytes in pieces of
    ``write_size`` at random 4 KiB-aligned offsets; returns the number of
    distinct bytes written and of 256 KiB chunks touched."""
    size = os.path.getsize(path)
    rng = random.Random(seed)
    pieces = [rng.randrange(0, (size - write_size) // 4096) * 4096 for _ in range(int(size * fraction) // write_size)]
    fd = os.open(path, os.O_RDWR)
    try:
        for offset in pieces:
            os.pwrite(fd, rng.randbytes(write_size), offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    ranges, changed = sorted((o, o + write_size) for o in pieces), 0
    end = 0
    for a, b in ranges:
        changed += max(0, b - max(a, end))
        end = max(end, b)
    chunks = {i for a, b in ranges for i in range(a // (256 * KiB), (b - 1) // (256 * KiB) + 1)}
    return changed, len(chunks)


@contextlib.contextmanager
def btrfs(work, image_size, keep=False):
    """A new folder ``work`` with a Btrfs on a loop file of ``image_size``
    bytes mounted at work/mnt; yields the loop device.  Removed after,
    unless ``keep``."""
    if os.geteuid():
        raise SystemExit("run as root (loop devices, mounts, drop_caches)")
    if work.exists():
        raise SystemExit("%s exists: remove it or give another --workdir" % work)
    work.mkdir(parents=True)
    with open(work / "btrfs.img", "wb") as f:
        f.truncate(image_size)
    device = sh("losetup", "--find", "--show", str(work / "btrfs.img")).strip()
    try:
        sh("mkfs.btrfs", "-q", "-f", device)
        (work / "mnt").mkdir()
        sh("mount", device, str(work / "mnt"))
        yield device
    finally:
        if not keep:
            subprocess.run(["umount", str(work / "mnt")])
            subprocess.run(["losetup", "-d", device])
            shutil.rmtree(work, ignore_errors=True)


def digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 * MiB), b""):
            h.update(block)
    return h.hexdigest()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=size_arg, default=16 * GiB, help="volume size (default 16G)")
    p.add_argument("--change", type=float, default=0.01, help="fraction rewritten (default 0.01)")
    p.add_argument("--write-size", type=size_arg, default=MiB, help="size of each rewrite (default 1M)")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/qubes-wyng-bench"))
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--verify", action="store_true", help="restore the last session and compare it")
    p.add_argument("--keep", action="store_true", help="leave the loop file, archive and mount")
    args = p.parse_args()
    work = args.workdir
    mnt = work / "mnt"
    results = {"size": args.size, "change": args.change, "write_size": args.write_size,
               "kernel": os.uname().release, "cpus": os.cpu_count()}
    with btrfs(work, args.size * 3, args.keep) as device:
        vol = mnt / NAME
        t = time.monotonic()
        workload.make(str(vol), args.size)
        results["make_seconds"] = round(time.monotonic() - t, 1)
        tool = Tool(work, device)
        tool.run("arch-init")
        local, plain = ("--local=%s" % mnt, NAME), ("--import-other-from=image:|:%s" % vol,)
        drop_caches()
        results["full_reflink"] = tool.send(*local)
        drop_caches()
        results["full_image"] = tool.send(*plain)
        results["changed_bytes"], results["changed_chunks"] = scatter(vol, args.change, args.write_size, 7)
        drop_caches()
        results["incremental_reflink"] = tool.send(*local)
        drop_caches()
        results["incremental_image"] = tool.send(*plain)
        results["unchanged_reflink"] = tool.send(*local)
        drop_caches()
        results["unchanged_reflink_cold"] = tool.send(*local)
        if args.verify:
            tool.run("receive", NAME, "--save-to=%s" % (work / "restored"))
            results["verified"] = digest(work / "restored") == digest(vol)
            os.unlink(work / "restored")
    report(results, args.out)


def save(out, name, lines, results):
    """The report as Markdown and the figures as JSON in ``out``, stamped; the report printed."""
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / ("%s-%s.md" % (name, stamp))).write_text(text)
    (out / ("%s-%s.json" % (name, stamp))).write_text(json.dumps(results, indent=1) + "\n")
    print(text)


def report(r, out):
    inc, img = r["incremental_reflink"], r["incremental_image"]
    rows = [("full send, reflink (--local)", r["full_reflink"]), ("full send, image", r["full_image"]),
            ("incremental, reflink", inc), ("incremental, image", img),
            ("no change, reflink", r["unchanged_reflink"]),
            ("no change, reflink, cold page cache", r["unchanged_reflink_cold"])]
    lines = ["# Reflink incremental send against the image source", "",
             "%s GiB volume on a Btrfs loop file, %.2f%% rewritten in %d KiB pieces at scattered 4 KiB-aligned "
             "places (%s MiB changed, %d chunks of 256 KiB touched); page cache dropped before each send "
             "except the first no-change one; auth cache warm. Kernel %s, %d CPUs." % (
                 r["size"] / GiB, 100 * r["change"], r["write_size"] // KiB, round(r["changed_bytes"] / MiB, 1),
                 r["changed_chunks"], r["kernel"], r["cpus"]), "",
             "| send | seconds | chunks scanned | chunks read | MiB read (program) | MiB read (device) "
             "| chunks sent | deduplicated |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label, st in rows:
        lines.append("| %s | %.2f | %d | %d | %.1f | %.1f | %d | %d |" % (
            label, st["seconds"], st["chunks_scanned"], st["chunks_read"], st["bytes_read"] / MiB,
            st["device_read"] / MiB, st["chunks_sent"], st["chunks_deduplicated"]))
    lines += ["", "- incremental time, reflink / image: **%.3f** (target <= 0.1)" % (inc["seconds"] / img["seconds"]),
              "- bytes read by the reflink incremental / bytes changed: **%.2f** by its own count, **%.2f** by "
              "the loop device's (target <= 2)" % (inc["bytes_read"] / r["changed_bytes"],
                                                   inc["device_read"] / r["changed_bytes"]),
              "- no-change send: **%.2f s** (target < 1 s)" % r["unchanged_reflink"]["seconds"]]
    if "verified" in r:
        lines.append("- the last session restored equal to the volume: **%s**" % r["verified"])
    save(out, "cow", lines, r)


if __name__ == "__main__":
    main()
