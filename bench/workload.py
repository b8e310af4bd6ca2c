"""Deterministic benchmark images: random, compressible and hole regions.

The image is cut into 4 MiB regions in a repeating pattern of twelve:
six random (incompressible), four text-like (zstd packs them to about a
third) and two holes, so about half random, a third compressible and the
rest holes.  The same seed always gives the same bytes.  With ``spread``,
the same regions are spread evenly over a larger sparse file (holes
between them): a big volume with little data.
"""
import argparse
import os
import random

REGION = 4 << 20
PATTERN = "RCRCRHRCRCRH"  # R random, C compressible, H hole: 6/4/2 of 12
WORDS = ("qubes", "volume", "backup", "chunk", "session", "archive", "manifest", "the",
         "of", "and", "data", "disk", "snapshot", "private", "root", "template", "vm",
         "kernel", "module", "file", "system", "user", "home", "config", "log")


def region_bytes(rng, kind, lines):
    if kind == "R":
        return rng.randbytes(REGION)
    # text-like: a random sequence of lines from a fixed vocabulary of lines
    text = "".join(rng.choices(lines, k=REGION // 40)).encode()
    while len(text) < REGION:
        text += text
    return text[:REGION]


def vocabulary(rng):
    return [" ".join(rng.choice(WORDS) for _ in range(5)) + " %08x\n" % rng.getrandbits(32)
            for _ in range(4096)]


def make(path, size, seed=1, spread=None):
    """An image of ``size`` bytes, or of ``spread`` bytes holding the
    regions of a ``size`` image at even distances."""
    rng = random.Random(seed)
    lines = vocabulary(rng)
    stride = REGION * max(1, (spread or size) // size)
    with open(path, "wb") as f:
        f.truncate(max(size, spread or 0))
        for i, offset in enumerate(range(0, size, REGION)):
            kind = PATTERN[i % len(PATTERN)]
            if kind == "H":
                rng.random()  # keep the sequence independent of holes' content
                continue
            f.seek(i * stride)
            f.write(region_bytes(rng, kind, lines)[:size - offset])


def change(path, fraction, seed=2, block=64 << 10):
    """Overwrite ``fraction`` of the image with new random blocks at
    scattered, deterministic places; returns the number of bytes written."""
    size = os.path.getsize(path)
    rng = random.Random(seed)
    count = max(1, int(size * fraction) // block)
    with open(path, "r+b") as f:
        for _ in range(count):
            f.seek(rng.randrange(0, size // block) * block)
            f.write(rng.randbytes(block))
    return count * block


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("path")
    p.add_argument("--size", type=int, default=4 << 30)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--change", type=float, help="rewrite this fraction of an existing image instead")
    args = p.parse_args()
    if args.change is not None:
        print(change(args.path, args.change, args.seed + 1))
    else:
        make(args.path, args.size, args.seed)


if __name__ == "__main__":
    main()
