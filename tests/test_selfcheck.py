"""wyng-agent --self-check: one line of versions, exit 0; with either AEAD
implementation; a clear failure when a module is missing."""
import importlib.util
import subprocess
import sys

from conftest import REPO, need

VERSION = (REPO / "version").read_text().strip()
BLOCK = "import sys; sys.modules[%r] = None; "


def self_check(block=None, entry="-m wyngagent --self-check"):
    code = (BLOCK % block if block else "") + "from wyngagent.command import main; sys.exit(main(%r))" % (
        entry.split()[2:],)
    if not block:
        code = "import sys; " + code
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_self_check_passes_and_prints_one_line():
    done = subprocess.run([sys.executable, "-m", "wyngagent", "--self-check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1
    assert done.stdout.startswith("wyng-agent %s self-check ok: aead " % VERSION)
    assert "zstandard " in done.stdout and "python " in done.stdout


def test_self_check_with_the_accelerator():
    need(importlib.util.find_spec("cryptography"), "the cryptography package (ci/requirements-test.txt)")
    done = self_check()
    assert done.returncode == 0, done.stderr
    assert "aead cryptography" in done.stdout


def test_self_check_without_the_accelerator_uses_pycryptodome():
    done = self_check("cryptography")
    assert done.returncode == 0, done.stderr
    assert "aead pycryptodome (module Cryptodome)" in done.stdout or "(module Crypto)" in done.stdout
    assert "cryptography" not in done.stdout.split("aead", 1)[1].split(";", 1)[1]


def test_self_check_fails_clearly_without_zstandard():
    done = self_check("zstandard")
    assert done.returncode == 1
    assert done.stdout == ""
    assert "self-check FAILED" in done.stderr and "zstandard" in done.stderr
    assert done.stderr.count("\n") == 1


def test_self_check_refuses_a_wrong_aead():
    code = ("import sys; from wyngagent import aead, selfcheck; "
            "aead.seal = lambda k, n, a, p: aead._ref_seal(k, n, a, p)[:-1] + b'x'; sys.exit(selfcheck.run())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 1 and "test vector" in done.stderr


def test_wyng_agent_command_line():
    def run(*args):
        return subprocess.run([sys.executable, "-m", "wyngagent"] + list(args), capture_output=True, text=True,
                              input="")
    assert run("--version").stdout == "wyng-agent %s\n" % VERSION
    assert run("--bogus").returncode == 2
    assert run().returncode == 0, "without arguments it is the agent; empty input ends it cleanly"


def test_qrexec_entry_ignores_arguments():
    """A qrexec service argument (wyng.Agent+--self-check) must not turn the
    service into anything but the agent."""
    done = subprocess.run([sys.executable, str(REPO / "qubes-rpc" / "wyng.Agent"), "--self-check"],
                          capture_output=True, text=True, input="")
    assert done.returncode == 0 and done.stdout == ""
