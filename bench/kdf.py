"""The passphrase KDF: what arch-init calibrates on this machine, beside
Wyng 0.8's fixed scrypt (N=2^19, r=8, p=1), time and memory of each.

    .venv/bin/python bench/kdf.py [--repeat 3]

Run it on a quiet machine: calibration measures the machine as it is.
"""
import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "dom0"))

from qubeswyng import keys  # noqa: E402


def seconds(log_n, r, p, repeat):
    best = None
    for _ in range(repeat):
        start = time.perf_counter()
        hashlib.scrypt(b"passphrase", salt=bytes(32), n=1 << log_n, r=r, p=p, maxmem=(1 << 31) - 1, dklen=64)
        spent = time.perf_counter() - start
        best = spent if best is None else min(best, spent)
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=3, help="time each KDF this often, keep the best")
    opts = p.parse_args()
    os.environ.pop("QVM_WYNG_TEST_KDF", None)
    start = time.perf_counter()
    ours = keys.kdf_params()
    calibration = time.perf_counter() - start
    for label, (log_n, r, par) in (("qubes-wyng (calibrated)", ours), ("Wyng 0.8", (19, 8, 1)),
                                   ("qubes-wyng before", (16, 8, 1))):
        spent = seconds(log_n, r, par, opts.repeat)
        print("%-24s N=2^%d r=%d p=%d: %4d MiB, %.2f s" % (label, log_n, r, par, 128 * r << log_n >> 20, spent))
    print("calibration took %.2f s" % calibration)


if __name__ == "__main__":
    main()
