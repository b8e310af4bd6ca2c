"""dom0 against an agent that lies: clean one-line errors, bounded memory,
no traceback, and nothing written that was not authenticated."""
import os
import random
import resource
import struct
import sys

import pytest

from conftest import AGENT, REPO, Wyng
from fuzz_targets import encode_entries
from images import KiB, make

LIAR = REPO / "tests" / "lying_agent.py"
CHUNK = 256 * KiB
# frames of a receive: 1 HELLO, 2 header, 3 OPEN, 4-5 root, 6-7 manifest, 8.. chunks
POSITIONS = [1, 2, 3, 4, 6, 8, 10]
MODES = ["truncate", "oversize", "garbage", "unknown", "errflood", "escape", "shrink"]


def _limit_memory():
    limit = 1 << 30  # a 4 GiB claim must never turn into an allocation
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """One archive for the module: the lies below never change it."""
    tmp_path = tmp_path_factory.mktemp("liar")
    wyng = Wyng(tmp_path)
    image = make(tmp_path / "img", 6 * CHUNK, [(0, 6 * CHUNK, "random")])
    wyng.init()
    wyng.send("vol", image)
    wyng.run("list")  # caches the key, so every lie below reaches past the KDF
    return wyng


def _lied_to(wyng, tmp_path, lie, *args):
    import subprocess
    cmd = [sys.executable, "-m", "qubeswyng.cli"] + wyng.args(args)
    env = dict(os.environ, QVM_WYNG_AGENT=str(LIAR), REAL_AGENT=str(AGENT), LIE=lie)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, preexec_fn=_limit_memory, timeout=60)


@pytest.mark.parametrize("mode,position", [
    # replies 1 and 3 carry no authenticated payload to shrink
    (m, p) for m in MODES for p in POSITIONS if not (m == "shrink" and p in (1, 3))])
def test_lying_agent_gets_a_clean_refusal(archive, tmp_path, mode, position):
    out = tmp_path / "restored"
    done = _lied_to(archive, tmp_path, "%s:%d" % (mode, position), "receive", "vol", "--save-to=%s" % out)
    # 3 (an authentication failure) when the lie is in the header or the root
    assert done.returncode == (3 if "the archive root fails" in done.stderr else 1), done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qvm-wyng: error: "), done.stderr
    assert "\x1b" not in done.stderr and len(done.stderr) < 1200
    assert not out.exists()


@pytest.mark.parametrize("position", [8, 9, 11])
def test_replayed_chunk_is_refused(archive, tmp_path, position):
    out = tmp_path / "restored"
    done = _lied_to(archive, tmp_path, "replay:%d" % position, "receive", "vol", "--save-to=%s" % out)
    assert done.returncode == 1
    assert "fails authentication" in done.stderr
    assert not out.exists()


# frames of arch-check on the one-session archive: 4 LOCK, 5-6 root, 7-8 the
# manifest, 9.. the scan report
@pytest.mark.parametrize("mode,position", [
    # LOCK's reply is a hint (garbage due, who held the lock): shrinking it is harmless
    (m, p) for m in MODES for p in (4, 9, 10) if not (m == "shrink" and p == 4)])
def test_lying_agent_during_arch_check(archive, tmp_path, mode, position):
    done = _lied_to(archive, tmp_path, "%s:%d" % (mode, position), "arch-check")
    assert done.returncode == (3 if "the archive root fails" in done.stderr else 1), done.stdout + done.stderr
    assert "Traceback" not in done.stderr and "\x1b" not in done.stderr + done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qvm-wyng: error: "), done.stderr


def test_lies_during_send_leave_the_archive_as_it_was(archive, tmp_path):
    before = archive.sessions("vol")
    for lie in ("truncate:5", "garbage:4", "oversize:6", "errflood:7", "shrink:5", "unknown:8"):
        done = _lied_to(archive, tmp_path, lie, "send", "--import-other-from=vol:|:%s" % (archive.tmp / "img"),
                        "--send-unchanged")
        assert done.returncode in (1, 3) and "Traceback" not in done.stderr, done.stderr
    assert archive.sessions("vol") == before
    archive.run("verify", "vol")


# -- the decoder on its own, fed random and mutated frames ----------------------

class PipeTransport:
    def __init__(self, data):
        self.stdout_fd, w = os.pipe()
        self.stdin_fd = os.open(os.devnull, os.O_WRONLY)
        os.write(w, data[:60000])  # fits in a pipe buffer
        os.close(w)

    def wait_exit(self):
        pass

    def exit_note(self):
        return ""

    def kill(self):
        pass

    def close(self):
        os.close(self.stdout_fd)
        os.close(self.stdin_fd)


def test_decoder_fuzz():
    from types import SimpleNamespace

    from qubeswyng import wire
    from qubeswyng.archive import Archive
    from qubeswyng.errors import Fail
    rng = random.Random(7)
    ops = [wire.OK, wire.ERR, wire.DATA, wire.END, wire.NONE, 0, 255]
    frames_of = [0, 1, 5, 29, 31, 32, 33, 301, 999, 1000, 1001]
    for _ in range(3000):
        frames = b""
        for _ in range(rng.randrange(1, 4)):
            length = rng.choice(frames_of + [rng.randrange(0, 1 << 32)])
            body = rng.randbytes(min(length, rng.randrange(0, 1200)))
            frames += struct.pack(">BI", rng.choice(ops), length) + body
        frames = frames[:rng.randrange(0, len(frames) + 1)]
        link = wire.Link(PipeTransport(frames))
        reader = Archive.__new__(Archive)  # only its decoding of SCAN and LOCK replies
        reader.link, reader.opts = link, SimpleNamespace(command="fuzz", force=False, quiet=True)
        try:
            rng.choice([
                lambda: link.reply(32),
                lambda: list(link.parts(4096)),
                lambda: link.frame((wire.DATA,), CHUNK),
                lambda: reader.scan(0, []),
                lambda: reader.lock(),
            ])()
        except Fail:
            pass
        finally:
            link.close()


@pytest.mark.parametrize("indexes", [[*range(10), *range(5, 15)], [*range(10), *range(9, 19)],
                                     [*range(40, 50)], [3, *range(3, 13)]])
def test_manifest_reader_refuses_runs_out_of_order_or_range(indexes):
    """Runs of consecutive indexes, taken apart a block at a time, are held
    to the order and range that entries are: a block overlapping the one
    before, or reaching past the volume's end (45 chunks), is refused
    however the stream is cut into parts."""
    import hashlib
    import hmac
    from qubeswyng import keys, manifest
    from qubeswyng.errors import Fail
    k = keys.Keys(bytes(32), bytes(16))
    head = manifest.Head(CHUNK, bytes(16), bytes(16), "20260101-000000", 1, 45 * CHUNK, len(indexes), "")
    body = head.pack() + b"".join(manifest.ENTRY.pack(i, bytes([i]) * 32) for i in indexes)
    mac = hmac.new(k.mac, manifest.LABEL + body, hashlib.sha256).digest()
    for cut in (manifest.HEAD.size + 10 * manifest.ENTRY.size, manifest.HEAD.size + manifest.ENTRY.size, len(body)):
        with pytest.raises(Fail, match="out of order or range"):
            list(manifest.read(k, [body[:cut], body[cut:] + mac], mac, head))


def test_manifest_reader_fuzz():
    from qubeswyng import keys, manifest
    from qubeswyng.errors import Fail
    rng = random.Random(8)
    k = keys.Keys(bytes(32), bytes(16))
    head = manifest.Head(CHUNK, bytes(16), bytes(16), "20260101-000000", 1, 50 * CHUNK, 20, "20251231-000000")
    entries = [(i * 2, rng.randbytes(32)) for i in range(20)]
    good = encode_entries(k, head, entries)
    expect_mac = good[-32:]
    assert list(manifest.entries(manifest.read(k, [good], expect_mac, head))) == entries
    for _ in range(3000):
        bad = bytearray(good)
        kind = rng.randrange(4)
        if kind == 0:
            bad[rng.randrange(len(bad))] ^= 1 << rng.randrange(8)
        elif kind == 1:
            del bad[rng.randrange(len(bad)):]
        elif kind == 2:
            bad += rng.randbytes(rng.randrange(1, 100))
        else:
            start = rng.randrange(len(bad))
            del bad[start:start + rng.randrange(1, 80)]
        cut = rng.randrange(0, len(bad) + 1)
        with pytest.raises(Fail):
            list(manifest.read(k, [bytes(bad[:cut]), bytes(bad[cut:])], expect_mac, head))
