"""The built-in demo: back up a disk image, change it, back it up again,
restore both sessions and compare them with what was backed up.

Everything happens in a work folder (default /var/tmp/qubes-wyng-demo,
removed first); the real qvm-wyng and the real agent do the work.
"""
import argparse
import filecmp
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
import workload  # noqa: E402

PASSPHRASE = "demo passphrase, not a secret"


def step(text):
    print("\n== %s" % text, flush=True)


class Demo:
    def __init__(self, work):
        self.work = work
        self.archive = work / "archive"
        self.times = []

    def wyng(self, *args, label=None, show=True):
        cmd = [sys.executable, "-m", "qubeswyng.cli", "--dest=file:%s" % self.archive,
               "--meta-dir=%s" % (self.work / "meta"), "--passcmd=echo '%s'" % PASSPHRASE, "--authmin=0", *args]
        print("$ qvm-wyng " + " ".join(a for a in cmd[3:] if not a.startswith(("--passcmd", "--meta-dir"))),
              flush=True)
        start = time.monotonic()
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        seconds = time.monotonic() - start
        if show:
            sys.stdout.write(done.stdout)
        if done.returncode != 0:
            sys.exit("demo: qvm-wyng %s failed (exit %d)" % (args[0], done.returncode))
        print("   (%.2f s)" % seconds)
        self.times.append((label or args[0], seconds))
        return done.stdout


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--work", default="/var/tmp/qubes-wyng-demo", help="work folder (emptied first)")
    p.add_argument("--size", type=int, default=384, help="demo image size in MiB")
    args = p.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    demo = Demo(work)
    image = work / "disk.img"

    step("1. Make a %d MiB demo disk image (random, compressible text, and holes)" % args.size)
    start = time.monotonic()
    workload.make(image, args.size << 20)
    print("   %s: %d MiB, %d MiB allocated (%.2f s)" % (image, args.size, os.stat(image).st_blocks // 2048,
                                                      time.monotonic() - start))
    shutil.copyfile(image, work / "disk-at-session-1.img")

    step("2. Create an encrypted archive")
    demo.wyng("arch-init")

    step("3. Back up the image (full)")
    full = json.loads(demo.wyng("send", "--import-other-from=disk:|:%s" % image, "--json",
                                label="full send", show=False))["volumes"][0]
    print("   %d chunks read, %d stored (%d MiB before compression)" % (
        full["chunks_read"], full["chunks_sent"], full["bytes_sent"] >> 20))

    step("4. Change 1% of the image and back it up again (incremental)")
    changed = workload.change(image, 0.01)
    print("   rewrote %d KiB at scattered places" % (changed >> 10))
    shutil.copyfile(image, work / "disk-at-session-2.img")
    incr = json.loads(demo.wyng("send", "--import-other-from=disk:|:%s" % image, "--json",
                                label="1% incremental send", show=False))["volumes"][0]
    print("   %d of %d chunks had changed and were stored" % (incr["chunks_sent"], incr["chunks_scanned"]))

    step("5. List, then restore both sessions and compare byte for byte")
    demo.wyng("list", "disk")
    listing = json.loads(demo.wyng("list", "disk", "--json", show=False))
    sessions = [s["session"] for s in listing["volumes"][0]["sessions"]]
    ok = True
    for number, session in enumerate(sessions, 1):
        restored = work / ("restored-%d.img" % number)
        demo.wyng("receive", "disk", "--session=%s" % session, "--save-to=%s" % restored,
                  label="receive %d" % number)
        same = filecmp.cmp(restored, work / ("disk-at-session-%d.img" % number), shallow=False)
        print("   session %s: %s" % (session, "identical to what was backed up" if same else "DIFFERENT"))
        ok = ok and same

    step("Summary")
    times = dict(demo.times)
    for name, seconds in demo.times:
        print("   %-22s %7.2f s" % (name, seconds))
    print("   full send %.0f MB/s; the incremental send took %.0f%% of its time" % (
        (args.size << 20) / 1e6 / times["full send"], 100 * times["1% incremental send"] / times["full send"]))
    print("\n%s" % ("Demo passed: both sessions restored exactly." if ok else "Demo FAILED."))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
