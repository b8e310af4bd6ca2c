"""The storage benchmark: send and receive of the benchmark image over ssh
(sshd on loopback) and S3 (moto_server on loopback), beside the local store,
and beside what plain ssh moves in the same run (``ssh host 'cat >
/dev/null' < image`` up, ``ssh host cat image`` down), each without and
with 20 ms of added round-trip time (a proxy that delays each direction by
10 ms: this kernel has no sch_netem).

    sudo .venv/bin/python bench/storage.py [--size MiB] [--s3-size MiB] [--work DIR] [--json FILE]

Rates are of the volume's bytes over the data phase of each command (from
its first chunk to its commit; tests/timing.py), so starting processes and
opening the connection are left out. Needs root (sshd), openssh-server and
moto_server (ci/requirements-test.txt); it starts and stops them itself.
moto_server is a Python program, so the S3 figures say more about the
agent's concurrency than about S3.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import workload

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from conftest import S3Server, Sshd, Wyng  # noqa: E402  (sets up paths and the agent)
from netdelay import DelayProxy  # noqa: E402
from timing import data_phase  # noqa: E402

DELAYS = (0.0, 0.010)  # each way


def command(wyng, image, env, size):
    """(send, receive) MB/s of ``image`` to a new archive at wyng.dest."""
    wyng.tmp.mkdir(parents=True, exist_ok=True)
    wyng.run("arch-init", env=env)
    send = data_phase(wyng, "send", "--import-other-from=vol:|:%s" % image, env=env)
    out = wyng.tmp / "restored"
    receive = data_phase(wyng, "receive", "vol", "--save-to=%s" % out, env=env)
    out.unlink()
    return size / 1e6 / send, size / 1e6 / receive


def ssh_cat(sshd, port, image, size):
    """(up, down) MB/s of plain ssh through ``port``."""
    ssh = ["ssh", "-F", str(sshd.ssh_config), "-p", str(port), "root@127.0.0.1"]
    start = time.monotonic()
    with open(image, "rb") as f:
        subprocess.run(ssh + ["cat > /dev/null"], stdin=f, check=True)
    up = time.monotonic() - start
    start = time.monotonic()
    subprocess.run(ssh + ["cat %s" % image], stdout=subprocess.DEVNULL, check=True)
    return size / 1e6 / up, size / 1e6 / (time.monotonic() - start)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=1024, help="image size in MiB for local and ssh (1024)")
    ap.add_argument("--s3-size", type=int, default=256, help="image size in MiB for S3 (256)")
    ap.add_argument("--work", help="working folder (default: a temporary one)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="wyng-bench-storage-"))
    work.mkdir(parents=True, exist_ok=True)
    images = {}
    for name, mib in (("image", args.size), ("s3-image", args.s3_size)):
        images[name] = work / name
        workload.make(images[name], mib << 20)
    (work / "sshd").mkdir(exist_ok=True)
    sshd, s3 = Sshd(work / "sshd"), S3Server(work)
    os.environ["WYNG_SSH_COMMAND"] = sshd.command()
    os.environ.update(s3.env())
    rows = []
    try:
        size = args.size << 20
        wyng = Wyng(work / "local")
        rows.append(dict(target="local", delay_ms=0, reference=None,
                         **dict(zip(("send", "receive"), command(wyng, images["image"], {}, size)))))
        for delay in DELAYS:
            proxy = DelayProxy(sshd.port, delay)
            try:
                cat = ssh_cat(sshd, proxy.port, images["image"], size)
                wyng = Wyng(work / ("ssh-%d" % (delay * 2000)))
                wyng.dest = "ssh://root@127.0.0.1:%d%s" % (proxy.port, wyng.archive)
                send, receive = command(wyng, images["image"], {}, size)
            finally:
                proxy.close()
            rows.append(dict(target="ssh", delay_ms=delay * 2000, send=send, receive=receive,
                             reference={"ssh cat up": cat[0], "ssh cat down": cat[1]}))
            proxy = DelayProxy(s3.port, delay)
            try:
                wyng = Wyng(work / ("s3-%d" % (delay * 2000)))
                wyng.dest = "s3://%s/bench" % s3.bucket()
                send, receive = command(wyng, images["s3-image"], s3.env(proxy.port), args.s3_size << 20)
            finally:
                proxy.close()
            rows.append(dict(target="s3 (moto)", delay_ms=delay * 2000, send=send, receive=receive, reference=None))
    finally:
        sshd.close()
        s3.close()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print("%-10s %6s %10s %12s   %s" % ("storage", "RTT+", "send MB/s", "receive MB/s", "reference (same run)"))
    for r in rows:
        ref = ""
        if r["reference"]:
            up, down = r["reference"]["ssh cat up"], r["reference"]["ssh cat down"]
            ref = "ssh cat: up %.0f MB/s (send %.0f%%), down %.0f MB/s (receive %.0f%%)" % (
                up, 100 * r["send"] / up, down, 100 * r["receive"] / down)
        print("%-10s %4.0fms %10.1f %12.1f   %s" % (r["target"], r["delay_ms"], r["send"], r["receive"], ref))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
