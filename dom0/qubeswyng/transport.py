"""Where the agent runs: a local process, or the wyng.Agent qrexec service.

A transport is a process with two pipes (``stdin_fd`` for requests,
``stdout_fd`` for replies), ``close()`` and ``exit_note()``.  ``--dest``
picks it: ``file:/path`` runs the agent here (plain Linux, tests),
``qubes://VM/path`` runs it in the backup VM.
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

AGENT_PATHS = ("/etc/qubes-rpc/wyng.Agent", "/usr/lib/qubes-wyng/wyng.Agent")


class ProcessTransport:
    def __init__(self, proc):
        self.proc = proc
        self.stdin_fd = proc.stdin.fileno()
        self.stdout_fd = proc.stdout.fileno()

    def exit_note(self):
        """How the agent ended, once it has (waiting a little for it)."""
        try:
            code = self.proc.wait(5)
        except subprocess.TimeoutExpired:
            return ""
        if code < 0:
            return " (agent killed by %s)" % signal.Signals(-code).name
        return " (agent exit status %d)" % code

    def close(self):
        for f in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                f.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def local_agent_command():
    """The agent executable for ``file:`` destinations."""
    override = os.environ.get("QVM_WYNG_AGENT")
    if override:
        return [override]
    for path in AGENT_PATHS:
        if os.access(path, os.X_OK):
            return [path]
    # an agent installed beside this interpreter (a venv), then on PATH
    beside = os.path.join(os.path.dirname(sys.executable), "wyng-agent")
    found = beside if os.access(beside, os.X_OK) else shutil.which("wyng-agent")
    if not found:
        raise Fail("no local agent: install the qubes-wyng agent (wyng-agent) to use file: destinations")
    return [found]


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
        try:
            proc = subprocess.Popen(local_agent_command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        except OSError as e:
            raise Fail("cannot start the agent: %s" % e.strerror) from None
        return ProcessTransport(proc), path
    from . import qubes
    return ProcessTransport(qubes.run_agent(app, vm)), path
