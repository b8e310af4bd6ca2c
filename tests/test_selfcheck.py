"""wyng-agent --self-check: one line of versions, exit 0; a clear failure
when a module it needs (cryptography, pycryptodome, zstandard) is missing."""
import subprocess
import sys

import pytest

from conftest import REPO

VERSION = (REPO / "version").read_text().strip()


def self_check(*blocked, entry="-m wyngagent --self-check"):
    """The self-check with the ``blocked`` modules made unimportable."""
    code = "import sys; " + "".join("sys.modules[%r] = None; " % m for m in blocked) + \
        "from wyngagent.command import main; sys.exit(main(%r))" % (entry.split()[2:],)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_self_check_passes_and_prints_one_line():
    done = subprocess.run([sys.executable, "-m", "wyngagent", "--self-check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1
    assert done.stdout.startswith("wyng-agent %s self-check ok: aead " % VERSION)
    assert "zstandard " in done.stdout and "python " in done.stdout


def test_self_check_names_both_aead_implementations():
    done = self_check()
    assert done.returncode == 0, done.stderr
    assert "aead cryptography" in done.stdout and "reference: pycryptodome" in done.stdout


@pytest.mark.parametrize("blocked", [("cryptography",), ("zstandard",), ("Cryptodome", "Crypto")])
def test_self_check_fails_clearly_without_a_dependency(blocked):
    done = self_check(*blocked)
    assert done.returncode == 1
    assert done.stdout == ""
    assert "self-check FAILED" in done.stderr and blocked[-1] in done.stderr
    assert done.stderr.count("\n") == 1


def test_self_check_refuses_a_wrong_aead():
    code = ("import sys; from wyngagent import aead, selfcheck; "
            "aead.seal = lambda k, n, a, p: aead.ref_seal(k, n, a, p)[:-1] + b'x'; sys.exit(selfcheck.run())")
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
