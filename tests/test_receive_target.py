"""receive --save-to never silently replaces data: over a file that is not
empty, or a block device that is not all zeros in its first MiB, it asks on
a terminal, and otherwise needs --force."""
import contextlib
import os
import pty
import select
import subprocess
import sys
import time

import pytest

from conftest import need, need_root, which
from images import MiB, make, same

QUESTION = "holds data. Replace it? [y/N]"


@pytest.fixture(scope="module")
def archived(tmp_path_factory):
    from conftest import Wyng
    tmp = tmp_path_factory.mktemp("target")
    wyng = Wyng(tmp)
    wyng.init()
    wyng.send("vol", make(tmp / "img", 3 * MiB, [(0, MiB, "random"), (2 * MiB, 4096, "text")]))
    return wyng


def _one_line_error(done, words):
    assert done.returncode == 1 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qvm-wyng: error: ") and words in lines[0], done.stderr


@pytest.mark.parametrize("flags", [[], ["--unattended"], ["--force"], ["--force", "--unattended"]])
def test_a_file_that_holds_data_needs_force(archived, tmp_path, flags):
    target = tmp_path / "precious"
    target.write_bytes(b"my thesis\n")
    done = archived.receive("vol", target, *flags, expect=None)
    if "--force" in flags:
        assert done.returncode == 0, done.stderr
        assert same(target, archived.tmp / "img")
    else:  # no terminal here: nobody to ask
        _one_line_error(done, "precious holds data: --force replaces it")
        assert target.read_bytes() == b"my thesis\n"
        assert os.listdir(tmp_path) == ["precious"]


def test_an_empty_file_or_a_new_path_is_written_without_asking(archived, tmp_path):
    (tmp_path / "empty").write_bytes(b"")
    for name in ("empty", "new"):
        archived.receive("vol", tmp_path / name, "--unattended")
        assert same(tmp_path / name, archived.tmp / "img")


def _on_a_terminal(wyng, target, answer):
    """receive on a pseudo-terminal that answers ``answer`` once the question
    is asked; returns the exit status and everything shown on the terminal."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "qubeswyng.cli"] + wyng.args(
        ["receive", "vol", "--save-to=%s" % target]), stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    shown, answered, deadline = b"", False, time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            if select.select([leader], [], [], 1)[0]:
                try:
                    data = os.read(leader, 1024)
                except OSError:  # EIO: the command ended
                    break
                shown += data
            if not answered and QUESTION.encode() in shown:
                os.write(leader, answer.encode() + b"\n")
                answered = True
        return proc.wait(60), shown.decode()
    finally:
        proc.kill()
        proc.wait()
        os.close(leader)


@pytest.mark.parametrize("answer", ["n", "", "y"])
def test_on_a_terminal_it_asks_first(archived, tmp_path, answer):
    target = tmp_path / "precious"
    target.write_bytes(b"my thesis\n")
    code, err = _on_a_terminal(archived, target, answer)
    if answer == "y":
        assert code == 0, err
        assert same(target, archived.tmp / "img")
    else:
        assert code == 1 and "not confirmed, nothing changed" in err
        assert target.read_bytes() == b"my thesis\n"


@contextlib.contextmanager
def _loop_device(path, size, data=b""):
    need_root()
    need(which("losetup"), "losetup (util-linux)")
    with open(path, "wb") as f:
        f.truncate(size)
        f.write(data)
    device = subprocess.run(["losetup", "--find", "--show", str(path)], capture_output=True, text=True,
                            check=True).stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", device])


def test_a_device_with_data_in_its_first_mib_needs_force(archived, tmp_path):
    with _loop_device(tmp_path / "disk", 4 * MiB, bytes(MiB - 1) + b"\1") as device:
        _one_line_error(archived.receive("vol", device, "--unattended", expect=None), "holds data")
        with open(device, "rb") as f:
            assert f.read(MiB)[-1:] == b"\1"
        archived.receive("vol", device, "--unattended", "--force")
        with open(device, "rb") as f:
            assert f.read(3 * MiB) == (archived.tmp / "img").read_bytes()


def test_a_device_of_zeros_is_written_without_asking(archived, tmp_path):
    with _loop_device(tmp_path / "disk", 4 * MiB) as device:
        archived.receive("vol", device, "--unattended")
        with open(device, "rb") as f:
            assert f.read(3 * MiB) == (archived.tmp / "img").read_bytes()
