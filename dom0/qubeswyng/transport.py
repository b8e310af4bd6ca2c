"""Where the agent runs: a local process, or the wyng.Agent qrexec service.

A transport is a process with two pipes (``stdin_fd`` for requests,
``stdout_fd`` for replies), ``close()``, ``kill()``, ``status()`` and
``exit_note()``.  ``--dest`` picks it: ``file:``, ``ssh://`` and ``s3://``
run the agent here (plain Linux, tests), ``qubes://VM/…``,
``qubes-ssh://VM:…`` and ``qubes-s3://VM:…`` run it in the backup qube VM.
``mount`` runs the VM package's other service, wyng.Browse, here the same
way.  The process's stderr is read by a thread as it comes (a full pipe
would block it) and never reaches dom0's terminal: its last lines,
sanitized, end the error when the process fails.
"""
import collections
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading

from .errors import Fail
from .settings import qube_name
from .wire import printable

SERVICE_DIRS = ("/etc/qubes-rpc", "/usr/lib/qubes-wyng")
SIGNALS = {s.value: s.name for s in signal.Signals}
LINE = 300  # bytes kept of each stderr line, and 4 lines at most


class ProcessTransport:
    def __init__(self, proc, name="agent"):
        self.proc, self.name = proc, name
        self.stdin_fd, self.stdout_fd = proc.stdin.fileno(), proc.stdout.fileno()
        self.said = collections.deque(maxlen=4)
        self.listener = threading.Thread(target=self._listen, daemon=True)
        self.listener.start()

    def _listen(self):
        if self.proc.stderr is None:  # not a pipe: nothing to read
            return
        with contextlib.suppress(OSError, ValueError):  # closed under us
            lines = iter(lambda: self.proc.stderr.readline(LINE), b"")
            self.said.extend(line.strip() for line in lines if line.strip())

    def status(self):
        """The exit status, once the process has ended (waiting a little); None if it goes on."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            return self.proc.wait(5)
        return None

    def exit_note(self):
        """How the process ended, once it has, and the last lines it wrote
        to stderr."""
        code = self.status()
        if code is None:
            return ""
        self.listener.join(1)
        how = "killed by %s" % SIGNALS.get(-code, "signal %d" % -code) if code < 0 else "exit status %d" % code
        return " (%s %s%s)" % (self.name, how, ": " + printable(b" | ".join(self.said)) if self.said else "")

    def kill(self):
        with contextlib.suppress(OSError):
            self.proc.kill()

    def close(self):
        for f in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                f.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()
            self.proc.wait()
        self.listener.join(1)
        if self.proc.stderr and not self.listener.is_alive():  # else a child holds it: closing would wait
            self.proc.stderr.close()


def local(service, name):
    """A VM-side service started here, over pipes: the agent for
    destinations without a qube, wyng.Browse for ``mount``."""
    short = service.split(".")[1]
    # QVM_WYNG_AGENT (or _BROWSE) as it is, else a service folder, then installed
    # beside this interpreter (a venv), then on PATH
    override = os.environ.get("QVM_WYNG_" + short.upper())
    program = "wyng-" + short.lower()
    paths = [os.path.join(folder, service) for folder in SERVICE_DIRS] + [
        os.path.join(os.path.dirname(sys.executable), program)]
    found = override or next((path for path in paths if os.access(path, os.X_OK)), None) or shutil.which(program)
    if not found:
        raise Fail("no local %s: install the qubes-wyng VM half (%s) here" % (service, program))
    try:
        proc = subprocess.Popen([found], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as e:
        raise Fail("cannot start the %s: %s" % (name, e.strerror)) from None
    return ProcessTransport(proc, name)


# --dest forms; the qubes ones run the agent in the qube and give it the URL of the plain form
FORMS = {"file": "file:/absolute/path", "ssh": "ssh://[user@]host[:port]/path", "s3": "s3://[profile@]bucket/prefix",
         "qubes": "qubes://VM/absolute/path", "qubes-ssh": "qubes-ssh://VM:user@host[:port]/path",
         "qubes-s3": "qubes-s3://VM:[profile@]bucket/prefix"}


def parse_dest(dest):
    """(backup qube or None, the storage URL the agent opens) from --dest.
    dom0 checks only the form; the agent parses the rest (doc/storage.md)."""
    if not dest:
        raise Fail("--dest is required")
    given, _, rest = dest.partition(":")
    if given not in FORMS:
        raise Fail("--dest: unknown destination type %r (use %s)" % (given[:20], ", ".join(FORMS.values())))
    kind, vm = given, None
    if given.startswith("qubes"):
        vm, sep, inner = rest[2:].partition("/" if given == "qubes" else ":")
        if not rest.startswith("//") or not sep:
            vm = ""
        kind, rest = ("file", "/" + inner) if given == "qubes" else (given[6:], "//" + inner)
    netloc, slash, path = rest[2:].partition("/")
    if kind == "file":
        path = rest[2:] if rest.startswith("//") else rest
        good, rest = path.startswith("/"), os.path.normpath(path)
    else:
        good = rest.startswith("//") and netloc and (kind == "s3" or slash and path and ("@" in netloc or vm is None))
    if not good or vm == "":
        raise Fail("--dest=%s: takes the form %s" % (given, FORMS[given]))
    return (None if vm is None else qube_name(vm)), "%s:%s" % (kind, rest)


def start(dest, app=None):
    """Start the agent for ``dest``; returns (transport, storage URL)."""
    vm, url = parse_dest(dest)
    if vm is None:
        return local("wyng.Agent", "agent"), url
    from . import qubes
    return ProcessTransport(qubes.run_agent(app, vm)), url
