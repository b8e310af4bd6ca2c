"""qvm-wyng: the command line.

``qvm-wyng [OPTIONS] COMMAND [VOLUME ...] [OPTIONS]``: one option set for
every command, options before or after the command, as in Wyng.  The two
tables below are the single source of ``--help``, ``COMMAND --help`` and
the man page (doc/qvm-wyng.1 is generated from them).
"""
import argparse
import sys
import traceback

from . import __version__
from .commands import arch_init, delete, diff, list as list_cmd, monitor, receive, send
from .errors import Fail

META_DIR = "/var/lib/qubes-wyng"
AUTH_DIR = "/run/qubes-wyng/auth"


def version(_opts, _app):
    print("qvm-wyng %s" % __version__)
    return 0


# name: (function, arguments, summary, options it uses)
COMMANDS = {
    "arch-init": (arch_init.run, "", "create a new archive at --dest",
                  ["dest", "encrypt", "compression", "hashtype", "chunk-factor", "passcmd"]),
    "send": (send.run, "[VOLUME ...]", "back up volumes as a new session (incremental when possible)",
             ["dest", "local", "import-other-from", "tag", "send-unchanged", "json", "passcmd", "authmin"]),
    "receive": (receive.run, "VOLUME", "restore a volume's session",
                ["dest", "local", "save-to", "overwrite", "session", "session-strict", "passcmd", "authmin"]),
    "verify": (receive.run_verify, "VOLUME", "check that a volume's session restores intact",
               ["dest", "session", "session-strict", "passcmd", "authmin"]),
    "list": (list_cmd.run, "[VOLUME ...]", "list the volumes, or the sessions of volumes",
             ["dest", "json", "passcmd", "authmin"]),
    "monitor": (monitor.run, "[VOLUME ...|--all]",
                "note the changes since the last send and renew the snapshots (no archive needed)",
                ["local", "all"]),
    "diff": (diff.run, "VOLUME ...", "compare local volumes with their archived session (exit 3: they differ)",
             ["dest", "local", "session", "session-strict", "json", "passcmd", "authmin"]),
    "delete": (delete.run, "--clean [--all]", "remove local snapshots and metadata; the archive is untouched",
               ["dest", "local", "clean", "all", "passcmd", "authmin"]),
    "version": (version, "", "print the version", []),
}

# option: (short form or None, argparse keywords)
OPTIONS = {
    "dest": (None, dict(metavar="URL", help="archive location: file:/path or qubes://VM/path")),
    "session": (None, dict(metavar="YYYYMMDD-HHMMSS|^TAG", help="the session to use (newest if not given)")),
    "session-strict": (None, dict(choices=("on", "off"), default="on",
                                  help="off: take the next older session when --session does not match")),
    "local": (None, dict(metavar="VG/POOL|/DIR", help="the pool volumes live in: an LVM thin pool, or a "
                         "directory on Btrfs or XFS (volume names are paths relative to it)")),
    "all": ("-a", dict(action="store_true", help="every volume (monitor); every archive (delete --clean)")),
    "clean": (None, dict(action="store_true", help="delete: remove local snapshots and metadata only")),
    "overwrite": (None, dict(action="store_true", help="receive --local: restore over an existing volume")),
    "save-to": (None, dict(metavar="PATH", help="receive into this file or block device")),
    "import-other-from": (None, dict(action="append", default=[], metavar="VOLUME:|:PATH",
                                     help="send the file or block device PATH as VOLUME (read in full)")),
    "tag": (None, dict(action="append", default=[], metavar="TAG[,DESCRIPTION]",
                       help="tag the new session; repeat for more tags")),
    "send-unchanged": (None, dict(action="store_true", help="record a session for unchanged volumes too")),
    "encrypt": (None, dict(default="xchacha20-poly1305", metavar="CIPHER",
                           help="xchacha20-poly1305 (default) or off (MACs stay on)")),
    "compression": (None, dict(default="zstd:3", metavar="TYPE[:LEVEL]",
                               help="zstd[:1-22] (default zstd:3), zlib[:0-9], bz2[:1-9] or off")),
    "hashtype": (None, dict(default="hmac-sha256", metavar="HASH", help="chunk id hash: hmac-sha256")),
    "chunk-factor": (None, dict(type=int, default=3, metavar="N",
                                help="chunk size 64 KiB * 2^(N-1), N = 1..6 (default 3: 256 KiB)")),
    "passcmd": (None, dict(metavar="COMMAND", help="shell command that prints the passphrase")),
    "authmin": (None, dict(type=int, default=2, metavar="MINUTES",
                           help="remember the passphrase this long (default 2; 0 off; -1 forgets)")),
    "unattended": ("-u", dict(action="store_true", help="never prompt")),
    "meta-dir": (None, dict(default=META_DIR, metavar="PATH", help="dom0 metadata folder (%s)" % META_DIR)),
    "json": (None, dict(action="store_true", help="machine-readable output")),
    "force": (None, dict(action="store_true", help="take over an archive lock held by another writer")),
    "force-allow-rollback": (None, dict(action="store_true",
                                        help="accept an archive older than the one seen last")),
    "verbose": ("-v", dict(action="count", default=0, help="more detail")),
    "quiet": ("-q", dict(action="store_true", help="only errors")),
    "debug": (None, dict(action="store_true", help="show a traceback on errors")),
}
COMMON = ["unattended", "meta-dir", "force", "force-allow-rollback", "verbose", "quiet", "debug"]


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise Fail(message)


def parser(command=None):
    """The whole parser, or (for ``COMMAND --help``) one showing only the
    options that command uses."""
    if command:
        func, args, summary, names = COMMANDS[command]
        p = Parser(prog="qvm-wyng %s" % command, usage="qvm-wyng [OPTIONS] %s %s" % (command, args),
                   description=summary)
    else:
        names = list(OPTIONS)
        p = Parser(prog="qvm-wyng", usage="qvm-wyng [OPTIONS] COMMAND [VOLUME ...] [OPTIONS]",
                   description="Fast incremental, encrypted backups of Qubes and Linux volumes.",
                   epilog="commands:\n" + "\n".join("  %-18s %s" % (n, c[2]) for n, c in COMMANDS.items()),
                   formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("command", choices=list(COMMANDS), metavar="COMMAND")
        p.add_argument("volumes", nargs="*", metavar="VOLUME")
    for name in names + [n for n in COMMON if n not in names]:
        short, kwargs = OPTIONS[name]
        p.add_argument(*([short] if short else []), "--" + name, **kwargs)
    return p


def parse(args):
    for i, arg in enumerate(args):
        if arg in COMMANDS and ("-h" in args[i:] or "--help" in args[i:]):
            parser(arg).parse_args(["--help"])
    opts = parser().parse_intermixed_args(args)
    if not -1 <= opts.authmin <= 60:
        raise Fail("--authmin must be -1 to 60")
    opts.auth_dir = AUTH_DIR
    return opts


def main(args=None, app=None):
    opts = None
    try:
        opts = parse(sys.argv[1:] if args is None else args)
        return COMMANDS[opts.command][0](opts, app)
    except Fail as e:
        _debug(opts)
        print("qvm-wyng: error: %s" % e, file=sys.stderr)
        return e.code
    except OSError as e:
        _debug(opts)
        where = (": %s" % e.filename) if e.filename else ""
        print("qvm-wyng: error: %s%s" % (e.strerror or e, where), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("qvm-wyng: interrupted", file=sys.stderr)
        return 130


def _debug(opts):
    if opts is not None and opts.debug:
        traceback.print_exc()


if __name__ == "__main__":
    sys.exit(main())
