"""The project benchmark: send, incremental send, receive, verify and
arch-check of a deterministic image, beside the rate of simply reading the
image and the CPU limit measured on its data.

    sudo python3 bench/bench.py [--size GiB] [--volume GiB] [--work DIR]
                                [--venv DIR | --source] [--json FILE]

Everything is measured in one run on one machine, so the ratios between the
figures mean something; absolute MB/s depend on the machine.  Both halves
run here (the agent as a local process over pipes), with encryption and
zstd:3 on and the auth cache warm (scrypt is not timed), installed as a
user installs them: a fresh venv in the work folder with
``pip install ./dom0 ./backupvm`` (--venv DIR uses, and fills if empty,
that venv instead; --source runs this checkout with this interpreter, for
quick A/B runs while developing).

For each step: MB/s of the volume; CPU-seconds per GiB of each half
(utime + stime from /proc); peak RSS of each half (VmHWM); and the bytes
the kernel read from disk for the step's processes (ru_inblock from wait4,
page cache dropped first), beside the program's own count for sends.
The CPU limit of a step is the cores divided by the summed per-byte CPU
cost of its zstd:3 (or decompression), AEAD and HMAC-SHA256 work, measured
on this image by bench/costs.py in the same run; "reached" is the step's
rate over that limit, or over `cat` (cold cache) when that is lower; for
receive also over a flushed `cp` of the image into the work folder when
that is lower (receive writes the volume there: a slow disk is its limit).

--volume larger than --size spreads the same data over a sparse file of
that size (holes between): peak RSS must not grow with it, the send is
timed beside a send of the same data as a dense image (and should take at
most 3 times as long), and the restored file keeps the holes (its
allocated size is reported).  The incremental changes 1% of the data, and
`cat` and `cp` read the dense image.
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

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PASS = "bench passphrase"
GiB = 1 << 30
TICK = os.sysconf("SC_CLK_TCK")


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


class Install:
    """How qvm-wyng, the agent and bench/costs.py are run."""

    def __init__(self, args, work):
        if args.source:
            self.python = sys.executable
            self.env = dict(os.environ, PYTHONPATH="%s/dom0:%s/backupvm" % (REPO, REPO),
                            QVM_WYNG_AGENT=str(REPO / "qubes-rpc" / "wyng.Agent"),
                            PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
            self.qvm_wyng = [self.python, "-m", "qubeswyng.cli"]
            return
        venv = Path(args.venv) if args.venv else work / "venv"
        self.python = str(venv / "bin" / "python")
        if not (venv / "bin" / "qvm-wyng").exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            subprocess.run([self.python, "-m", "pip", "install", "-q", str(REPO / "dom0"), str(REPO / "backupvm")],
                           check=True)
        self.env = dict(os.environ, QVM_WYNG_AGENT=str(venv / "bin" / "wyng-agent"))
        self.env.pop("PYTHONPATH", None)
        self.qvm_wyng = [str(venv / "bin" / "qvm-wyng")]

    def costs(self, image):
        out = subprocess.run([self.python, str(HERE / "costs.py"), str(image)], env=self.env, check=True,
                             capture_output=True, text=True).stdout
        return json.loads(out)


class Sampler(threading.Thread):
    """Samples VmHWM and CPU time of dom0 and its child, the agent."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.peaks, self.agent_cpu, self.done = pid, {}, 0.0, False

    def run(self):
        while not self.done:
            for pid in [self.pid] + self.children():
                role = "dom0" if pid == self.pid else "agent"
                self.peaks[role] = max(self.peaks.get(role, 0), self.hwm(pid) or 0)
                if role == "agent":
                    self.agent_cpu = max(self.agent_cpu, self.cpu(pid))
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

    @staticmethod
    def cpu(pid):
        try:
            with open("/proc/%d/stat" % pid) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def wyng(install, work, *args, cold=True):
    """Run one qvm-wyng command; returns its figures and its stdout."""
    if cold:
        drop_caches()
    cmd = install.qvm_wyng + ["--dest=file:%s" % (work / "archive"), "--meta-dir=%s" % (work / "meta"),
                              "--passcmd=echo '%s'" % PASS, "--authmin=5", *args]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=install.env)
    sampler = Sampler(proc.pid)
    sampler.start()
    out = proc.stdout.read()
    _pid, status, usage = os.wait4(proc.pid, 0)  # usage includes the agent, which dom0 waited for
    seconds = time.monotonic() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    sampler.done = True
    sampler.join()
    if proc.returncode != 0:
        sys.exit("bench: qvm-wyng %s failed" % args[0])
    total_cpu = usage.ru_utime + usage.ru_stime
    return {"s": seconds, "rss": sampler.peaks, "cpu_dom0": total_cpu - sampler.agent_cpu,
            "cpu_agent": sampler.agent_cpu, "disk_read": usage.ru_inblock * 512}, out


def copy_seconds(image, work):
    """A sparse copy of the image into the work folder, flushed (cold cache)."""
    drop_caches()
    target = work / "copy"
    start = time.monotonic()
    subprocess.run(["cp", "--sparse=always", str(image), str(target)], check=True)
    fd = os.open(target, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    seconds = time.monotonic() - start
    target.unlink()
    return seconds


def data_ranges(path):
    """(start, end) of each run of data in a file (SEEK_DATA, SEEK_HOLE)."""
    fd, pos, out = os.open(path, os.O_RDONLY), 0, []
    try:
        while True:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                return out
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, pos))
    finally:
        os.close(fd)


def same(a, b):
    """Whether two files hold the same bytes, reading only where one of
    them has data (both read zeros elsewhere): a 1 TiB sparse image is
    compared in the time its data takes."""
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        done = 0
        for start, end in sorted(data_ranges(a) + data_ranges(b)):
            for pos in range(max(start, done), end, 1 << 20):
                n = min(1 << 20, end - pos)
                if os.pread(fa.fileno(), n, pos) != os.pread(fb.fileno(), n, pos):
                    return False
            done = max(done, end)
    return True


def limits(costs, cores):
    """CPU-limit MB/s of each step from the per-byte costs (ns/byte)."""
    ns = costs["ns_per_byte"]
    steps = {"send": ns["hmac"] + ns["zstd"] + ns["seal"], "receive": ns["hmac"] + ns["unzstd"] + ns["open"],
             "arch-check": ns["unzstd"] + ns["open"]}
    steps["verify"] = steps["receive"]
    return {step: 1e3 * cores / cost for step, cost in steps.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=float, default=4, help="data in GiB (default 4)")
    p.add_argument("--volume", type=float, help="volume size in GiB, the data spread over it (default --size)")
    p.add_argument("--work", default="/var/tmp/qubes-wyng-bench", help="work folder (emptied first)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--venv", help="use (and fill if empty) this venv instead of a fresh one")
    how.add_argument("--source", action="store_true", help="run this checkout with this interpreter")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    install = Install(args, work)
    image, size = work / "image", int(args.size * GiB)
    spread = int(args.volume * GiB) if args.volume and args.volume > args.size else None
    workload.make(image, size, spread=spread)
    volume = os.path.getsize(image)
    mb = volume / 1e6
    r = {"image_bytes": volume, "allocated_bytes": os.stat(image).st_blocks * 512, "cores": os.cpu_count()}
    r["costs"] = install.costs(image)
    r["limit_MBps"] = limits(r["costs"], r["cores"])

    # a spread image is held to the same data, dense: reading a sparse volume's holes through cat
    # or cp says nothing, and its send is compared with the dense one's
    dense = work / "dense" if spread else image
    if spread:
        workload.make(dense, size)
    cold = drop_caches()
    r["cat_cold_MBps"] = size / 1e6 / cat_seconds(dense) if cold else None
    r["cat_warm_MBps"] = size / 1e6 / cat_seconds(dense)
    r["copy_MBps"] = size / 1e6 / copy_seconds(dense, work)

    for folder in [work] + ([work / "dense-archive"] if spread else []):
        wyng(install, folder, "arch-init")
        wyng(install, folder, "list")  # unlocks the master key once (scrypt) and caches it: no step pays for it
    if spread:
        r["dense_send"], _out = wyng(install, work / "dense-archive", "send", "--import-other-from=vol:|:%s" % dense)
    r["send"], out = wyng(install, work, "send", "--json", "--import-other-from=vol:|:%s" % image)
    r["send"]["program_read"] = json.loads(out)["volumes"][0]["bytes_read"]
    r["changed_bytes"] = workload.change(image, 0.01 * size / volume)  # 1% of the data
    r["incremental"], out = wyng(install, work, "send", "--json", "--import-other-from=vol:|:%s" % image)
    r["incremental"]["program_read"] = json.loads(out)["volumes"][0]["bytes_read"]
    restored = work / "restored"
    r["receive"], _out = wyng(install, work, "receive", "vol", "--save-to=%s" % restored)
    r["verify"], _out = wyng(install, work, "verify", "vol")
    r["arch-check"], _out = wyng(install, work, "arch-check")
    for step in ("send", "receive", "verify", "arch-check"):
        r[step]["MBps"] = mb / r[step]["s"]
    if not same(image, restored):
        sys.exit("bench: the restored image differs")
    r["restored_allocated_bytes"] = os.stat(restored).st_blocks * 512
    r["allocated_bytes_after_change"] = os.stat(image).st_blocks * 512
    r["archive_bytes"] = sum(f.stat().st_size for f in (work / "archive").rglob("*") if f.is_file())
    report(r)
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)


def report(r):
    mib = lambda n: "%.0f MiB" % (n / (1 << 20))
    gib = r["image_bytes"] / GiB
    cat = r["cat_cold_MBps"]
    ns = r["costs"]["ns_per_byte"]
    print("image: %s, %s allocated; %d cores; CPU cost per byte of the image (ns): HMAC-SHA256 %.2f, "
          "zstd:3 %.2f, unzstd %.2f, AEAD seal %.2f, open %.2f (%.0f%% of it stored)" % (
              mib(r["image_bytes"]), mib(r["allocated_bytes"]), r["cores"], ns["hmac"], ns["zstd"],
              ns["unzstd"], ns["seal"], ns["open"], 100 * r["costs"]["stored_fraction"]))
    print("cat: cold cache %s, warm %.0f MB/s; cp into the work folder, flushed: %.0f MB/s\n" % (
        "%.0f MB/s" % cat if cat else "n/a (not root)", r["cat_warm_MBps"], r["copy_MBps"]))
    print("| step | MB/s (s) | CPU limit MB/s | reached | CPU s/GiB dom0 + agent | peak RSS dom0, agent "
          "| disk read (kernel) / program |\n| --- | ---: | ---: | ---: | ---: | --- | --- |")
    for step in ("send", "incremental", "receive", "verify", "arch-check"):
        st = r[step]
        limit = r["limit_MBps"].get(step)
        bound = min(limit, cat) if limit and cat else limit
        if step == "receive":
            bound = min(bound, r["copy_MBps"])
        rate = "%.0f (%.2f s)" % (st["MBps"], st["s"]) if "MBps" in st else "%.2f s" % st["s"]
        read = mib(st["disk_read"]) + (" / %s" % mib(st["program_read"]) if "program_read" in st else "")
        print("| %s | %s | %s | %s | %.2f + %.2f | %s, %s | %s |" % (
            step, rate, "%.0f" % limit if limit else "", "%.0f%%" % (100 * st["MBps"] / bound) if limit else "",
            st["cpu_dom0"] / gib, st["cpu_agent"] / gib, mib(st["rss"].get("dom0", 0)),
            mib(st["rss"].get("agent", 0)), read))
    if "dense_send" in r:
        ratio = r["send"]["s"] / r["dense_send"]["s"]
        print("\nsparse: the send took %.2f s, %.1f times the %.2f s of the same data in a dense image "
              "(target: at most 3 times)" % (r["send"]["s"], ratio, r["dense_send"]["s"]))
    print("\nincremental (1%% changed, image source) = %.0f%% of the full send's time; restored file: %s allocated "
          "(image: %s); archive: %s" % (100 * r["incremental"]["s"] / r["send"]["s"],
                                        mib(r["restored_allocated_bytes"]), mib(r["allocated_bytes_after_change"]),
                                        mib(r["archive_bytes"])))


if __name__ == "__main__":
    main()
