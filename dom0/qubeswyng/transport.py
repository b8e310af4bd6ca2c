"""Where the agent runs: a local process, or the wyng.Agent qrexec service.

A transport is a process with two pipes (``stdin_fd`` for requests,
``stdout_fd`` for replies), ``close()``, ``status()`` and ``exit_note()``.
``--dest`` picks it: ``file:/path`` runs the agent here (plain Linux,
tests), ``qubes://VM/path`` runs it in the backup VM.  ``mount`` runs the
VM package's other service, wyng.Browse, here the same way.
"""
import contextlib
import os
import shutil
import signal
import subprocess
import sys
from urllib.parse import urlsplit

from .errors import Fail
from .settings import qube_name

SERVICE_DIRS = ("/etc/qubes-rpc", "/usr/lib/qubes-wyng")


class ProcessTransport:
    def __init__(self, proc, name="agent"):
        self.proc, self.name = proc, name
        self.stdin_fd = proc.stdin.fileno()
        self.stdout_fd = proc.stdout.fileno()

    def status(self):
        """The exit status, once the process has ended (waiting a little); None if it goes on."""
        try:
            return self.proc.wait(5)
        except subprocess.TimeoutExpired:
            return None

    def exit_note(self):
        """How the process ended, once it has."""
        code = self.status()
        if code is None:
            return ""
        if code < 0:
            return " (%s killed by %s)" % (self.name, signal.Signals(-code).name)
        return " (%s exit status %d)" % (self.name, code)

    def close(self):
        for f in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                f.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def local_command(service="wyng.Agent"):
    """The executable of a VM-side service run here: the agent for
    ``file:`` destinations, wyng.Browse for ``mount``."""
    short = service.split(".")[1]
    override = os.environ.get("QVM_WYNG_" + short.upper())
    if override:
        return [override]
    for folder in SERVICE_DIRS:
        if os.access(os.path.join(folder, service), os.X_OK):
            return [os.path.join(folder, service)]
    # installed beside this interpreter (a venv), then on PATH
    program = "wyng-" + short.lower()
    beside = os.path.join(os.path.dirname(sys.executable), program)
    found = beside if os.access(beside, os.X_OK) else shutil.which(program)
    if not found:
        raise Fail("no local %s: install the qubes-wyng VM half (%s) here" % (service, program))
    return [found]


def local(service, name):
    """A VM-side service started here, over pipes."""
    try:
        proc = subprocess.Popen(local_command(service), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    except OSError as e:
        raise Fail("cannot start the %s: %s" % (name, e.strerror)) from None
    return ProcessTransport(proc, name)


def parse_dest(dest):
    """(kind, vm, path) from a --dest URL; kind is 'file' or 'qubes'."""
    if not dest:
        raise Fail("--dest is required")
    url = urlsplit(dest)
    if url.scheme == "file":
        path = url.path if not url.netloc else None
        if not path or not path.startswith("/"):
            raise Fail("--dest=file: needs an absolute path, like file:/srv/backups/laptop.wyng")
        return "file", None, os.path.normpath(path)
    if url.scheme == "qubes":
        if not url.netloc or not url.path.startswith("/"):
            raise Fail("--dest=qubes: takes the form qubes://VM/absolute/path")
        return "qubes", qube_name(url.netloc), os.path.normpath(url.path)
    if url.scheme == "qubes-ssh":
        vm, _, remote = url.netloc.partition(":")
        user, _, host = remote.rpartition("@")
        if not (vm and user and host) or not url.path.startswith("/"):
            raise Fail("--dest=qubes-ssh: takes the form qubes-ssh://VM:user@host[:port]/path")
        raise Fail("--dest=qubes-ssh: ssh storage through qube %s is not supported yet; "
                   "qubes://VM/path stores in the qube itself" % qube_name(vm))
    if url.scheme in ("ssh", "s3"):
        raise Fail("--dest=%s: is not supported yet" % url.scheme)
    raise Fail("--dest: unknown destination type %r (use file:/path or qubes://VM/path)" % dest.split(":")[0])


def start(dest, app=None):
    """Start the agent for ``dest``; returns (transport, archive path)."""
    kind, vm, path = parse_dest(dest)
    if kind == "file":
        return local("wyng.Agent", "agent"), path
    from . import qubes
    return ProcessTransport(qubes.run_agent(app, vm)), path
