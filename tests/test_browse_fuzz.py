"""Fuzzing dom0's browse request parser (commands/browse.py RangeServer,
through wire.Link.frame): seeded random byte streams and mutated request
sequences from a would-be presenter.  Whatever arrives, dom0 either answers
a request exactly as the volume holds it or stops with a one-line Fail;
nothing else escapes, it never asks the archive for a chunk outside the
session or for a zero chunk, and every answer is for a range inside the
volume of at most MAX_READ bytes.

``one(data)`` takes any bytes (an atheris-style target); the test runs it
on a few thousand generated streams (a few seconds)."""
import argparse
import os
import random
import struct
import threading

from qubeswyng import wire
from qubeswyng.commands import browse
from qubeswyng.errors import Fail
from qubeswyng.manifest import ZERO, ChunkMap

CS = 64 * 1024
SIZE = 20 * CS + 1234                 # the last chunk is short
ZEROS = {3, 4, 17}                    # chunks the manifest marks as zeros
RNG = random.Random(0)
VOLUME = bytearray(RNG.randbytes(SIZE))
for _z in ZEROS:
    VOLUME[_z * CS:(_z + 1) * CS] = bytes(len(VOLUME[_z * CS:(_z + 1) * CS]))
VOLUME = bytes(VOLUME)
FRAME = struct.Struct(">BI")


class Archive:
    """The verified side as RangeServer sees it: chunk size and fetch()."""
    chunk_size = CS

    def __init__(self):
        self.map = ChunkMap(-(-SIZE // CS))
        for i in range(len(self.map)):
            self.map[i] = ZERO if i in ZEROS else bytes([i + 1]) * 32

    def fetch(self, wanted):
        for index, cid, length in wanted:
            assert 0 <= index < len(self.map) and index not in ZEROS and cid == self.map[index]
            assert length == len(VOLUME[index * CS:(index + 1) * CS])
            yield index, VOLUME[index * CS:index * CS + length]


class Pipes:
    """A transport made of two pipes, as wire.Link wants one."""

    def __init__(self):
        self.stdout_fd, self.feed = os.pipe()   # presenter -> dom0
        self.answers, self.stdin_fd = os.pipe()  # dom0 -> presenter

    def exit_note(self):
        return ""

    def status(self):
        return 0

    def kill(self):
        pass

    def close(self):
        for fd in (self.stdin_fd, self.stdout_fd):
            os.close(fd)


def one(data):
    """Feed ``data`` to a RangeServer as the presenter's whole output.
    Returns the (op, payload) frames dom0 answered with, checked."""
    pipes, archive = Pipes(), Archive()
    answers = bytearray()

    def drain():
        while block := os.read(pipes.answers, 1 << 20):
            answers.extend(block)
        os.close(pipes.answers)

    def feed():
        with open(pipes.feed, "wb") as f:
            try:
                f.write(data)
            except BrokenPipeError:
                pass  # dom0 stopped reading: what it refused is left
    threads = [threading.Thread(target=drain), threading.Thread(target=feed)]
    for t in threads:
        t.start()
    link = wire.Link(pipes, "browse service")
    opts = argparse.Namespace(quiet=True)
    server = browse.RangeServer(archive, archive.map, SIZE, link, opts, "fuzz")
    try:
        server.serve((b"head",))
        ended = None
    except Fail as e:
        ended = str(e)
        assert "\n" not in ended and ended.isprintable()
    finally:
        link.close()
        for t in threads:
            t.join()
    assert len(server.cache) <= server.capacity
    return check(bytes(answers), data), ended


def check(answers, data):
    """Every answer after the first (VOLUME) is DATA for a READ that asked
    for a range inside the volume, in order, with its bytes."""
    frames, pos = [], 0
    while pos < len(answers):
        op, length = FRAME.unpack_from(answers, pos)
        frames.append((op, answers[pos + FRAME.size:pos + FRAME.size + length]))
        pos += FRAME.size + length
    assert frames[0] == (browse.VOLUME, b"head")
    reads = iter(requests(data))
    for op, payload in frames[1:]:
        offset, length = next(reads)
        assert op == wire.DATA and 0 < length <= browse.MAX_READ and offset + length <= SIZE
        assert payload == VOLUME[offset:offset + length]
    return frames


def requests(data):
    """The (offset, length) of the READ frames in ``data``, in order."""
    pos = 0
    while pos + FRAME.size <= len(data):
        op, length = FRAME.unpack_from(data, pos)
        if op == browse.READ and length == browse.RANGE.size and pos + FRAME.size + length <= len(data):
            yield browse.RANGE.unpack_from(data, pos + FRAME.size)
        pos += FRAME.size + length


def frame(op, payload):
    return FRAME.pack(op, len(payload)) + payload


def generated(rng):
    """A request stream: mostly good READs and NOTEs, with mutations."""
    edges = [0, 1, CS - 1, CS, SIZE - 1, SIZE, SIZE + 1, (1 << 64) - 1, 3 * CS + 5]
    out = []
    for _ in range(rng.randint(1, 12)):
        kind = rng.random()
        offset = rng.choice(edges) if rng.random() < 0.3 else rng.randrange(0, SIZE + 100)
        length = rng.choice([0, 1, 4096, CS, browse.MAX_READ, browse.MAX_READ + 1, (1 << 32) - 1]) \
            if rng.random() < 0.3 else rng.randint(1, 3 * CS)
        if kind < 0.6:
            item = frame(browse.READ, browse.RANGE.pack(offset, length))
        elif kind < 0.7:
            item = frame(browse.NOTE, rng.randbytes(rng.randint(0, 1100)))
        elif kind < 0.8:
            item = frame(rng.randrange(256), rng.randbytes(rng.randint(0, 40)))
        elif kind < 0.9:
            item = FRAME.pack(rng.choice([browse.READ, browse.NOTE, wire.ERR]), rng.randrange(1 << 32)) + \
                rng.randbytes(rng.randint(0, 20))
        else:
            item = rng.randbytes(rng.randint(1, 30))
        out.append(item)
    data = b"".join(out)
    if rng.random() < 0.2:
        data = data[:rng.randrange(len(data) + 1)]
    return data


def test_request_parser_fuzz():
    rng = random.Random(1)
    answered, endings = 0, set()
    for _ in range(3000):
        frames, ended = one(generated(rng))
        answered += len(frames) - 1
        endings.add(ended and next((k for k in KINDS if k in ended), ended))
    assert answered > 1000  # good requests are reached, and answered
    assert endings == {None, *KINDS}  # every way of refusing is reached


KINDS = ("refused", "malformed read", "unexpected frame", "where at most", "closed the connection",
         "browse service: ")


def test_random_bytes():
    rng = random.Random(2)
    for _ in range(1000):
        one(rng.randbytes(rng.randint(0, 200)))


def test_good_reads_answered_exactly():
    rng = random.Random(3)
    reads = [(rng.randrange(SIZE - 10), rng.randint(1, 10)) for _ in range(100)] + \
        [(0, SIZE), (SIZE - CS, CS), (0, browse.MAX_READ)]
    data = b"".join(frame(browse.READ, browse.RANGE.pack(o, min(n, SIZE - o, browse.MAX_READ))) for o, n in reads)
    frames, ended = one(data)
    assert len(frames) == len(reads) + 1 and ended is None
