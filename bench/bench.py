"""The project benchmark: send, incremental send, receive and verify of a
deterministic image, beside the rate of simply reading the image.

    .venv/bin/python bench/bench.py [--size GiB] [--work DIR] [--json FILE]

Everything is measured in one run on one machine, so the ratios between the
figures mean something; absolute MB/s depend on the machine.  Both halves
run here (the agent as a local process over pipes), with encryption and
zstd:3 on.  Peak RSS is each process's VmHWM, sampled while it runs.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import workload

PASS = "bench passphrase"


def drop_caches():
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def cat_seconds(path):
    start = time.monotonic()
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)
    return time.monotonic() - start


class PeakRSS(threading.Thread):
    """Samples VmHWM of a process and its children (dom0 and the agent)."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.peaks, self.done = pid, {}, False

    def run(self):
        while not self.done:
            for pid in [self.pid] + self.children():
                hwm = self.hwm(pid)
                if hwm:
                    role = "dom0" if pid == self.pid else "agent"
                    self.peaks[role] = max(self.peaks.get(role, 0), hwm)
            time.sleep(0.02)

    def children(self):
        try:
            with open("/proc/%d/task/%d/children" % (self.pid, self.pid)) as f:
                return [int(p) for p in f.read().split()]
        except OSError:
            return []

    @staticmethod
    def hwm(pid):
        try:
            with open("/proc/%d/status" % pid) as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None


def wyng(work, *args):
    cmd = [sys.executable, "-m", "qubeswyng.cli", "--dest=file:%s" % (work / "archive"),
           "--meta-dir=%s" % (work / "meta"), "--passcmd=echo '%s'" % PASS, "--authmin=5", *args]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    sampler = PeakRSS(proc.pid)
    sampler.start()
    out = proc.communicate()[0]
    seconds = time.monotonic() - start
    sampler.done = True
    sampler.join()
    if proc.returncode != 0:
        sys.exit("bench: qvm-wyng %s failed" % args[0])
    return seconds, out, sampler.peaks


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=float, default=4, help="image size in GiB (default 4)")
    p.add_argument("--work", default="/var/tmp/qubes-wyng-bench", help="work folder (emptied first)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    image, size = work / "image", int(args.size * (1 << 30))
    workload.make(image, size)
    mb = size / 1e6
    r = {"image_bytes": size, "allocated_bytes": os.stat(image).st_blocks * 512}

    cold = drop_caches()
    r["cat_cold_MBps"] = mb / cat_seconds(image) if cold else None
    r["cat_warm_MBps"] = mb / cat_seconds(image)

    wyng(work, "arch-init")
    seconds, _out, peaks = wyng(work, "send", "--import-other-from=vol:|:%s" % image)
    r["full_send_s"], r["full_send_MBps"] = seconds, mb / seconds
    r["full_send_peak_rss"] = peaks

    r["changed_bytes"] = workload.change(image, 0.01)
    seconds, out, peaks = wyng(work, "send", "--import-other-from=vol:|:%s" % image, "--json")
    r["incr_send_s"], r["incr_send_peak_rss"] = seconds, peaks
    r["incr_vs_full"] = seconds / r["full_send_s"]
    r["incr_stats"] = json.loads(out)["volumes"][0]

    drop_caches()
    seconds, _out, peaks = wyng(work, "receive", "vol", "--save-to=%s" % (work / "restored"))
    r["receive_s"], r["receive_MBps"], r["receive_peak_rss"] = seconds, mb / seconds, peaks
    seconds, _out, peaks = wyng(work, "verify", "vol")
    r["verify_s"], r["verify_MBps"], r["verify_peak_rss"] = seconds, mb / seconds, peaks
    if subprocess.run(["cmp", str(image), str(work / "restored")]).returncode != 0:
        sys.exit("bench: the restored image differs")
    r["archive_bytes"] = sum(f.stat().st_size for f in (work / "archive").rglob("*") if f.is_file())
    report(r)
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)


def report(r):
    mib = lambda n: "%.0f MiB" % (n / (1 << 20))
    rss = lambda d: "dom0 %s, agent %s" % (mib(d.get("dom0", 0)), mib(d.get("agent", 0)))
    cold = "%.0f MB/s" % r["cat_cold_MBps"] if r["cat_cold_MBps"] else "n/a (not root)"
    rows = [
        ("image", "%s (%s allocated)" % (mib(r["image_bytes"]), mib(r["allocated_bytes"])), ""),
        ("cat, cold cache", cold, "physical limit"),
        ("cat, warm cache", "%.0f MB/s" % r["cat_warm_MBps"], "physical limit"),
        ("full send", "%.0f MB/s (%.2f s)" % (r["full_send_MBps"], r["full_send_s"]), rss(r["full_send_peak_rss"])),
        ("1% incremental send", "%.2f s = %.0f%% of the full send" % (r["incr_send_s"], 100 * r["incr_vs_full"]),
         rss(r["incr_send_peak_rss"])),
        ("receive", "%.0f MB/s (%.2f s)" % (r["receive_MBps"], r["receive_s"]), rss(r["receive_peak_rss"])),
        ("verify", "%.0f MB/s (%.2f s)" % (r["verify_MBps"], r["verify_s"]), rss(r["verify_peak_rss"])),
        ("archive size", mib(r["archive_bytes"]), ""),
    ]
    print("| measure | result | peak RSS / note |\n| --- | --- | --- |")
    for row in rows:
        print("| %s | %s | %s |" % row)


if __name__ == "__main__":
    main()
