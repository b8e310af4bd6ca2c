"""qvm-wyng: the command line.

``qvm-wyng [OPTIONS] COMMAND [VOLUME ...] [OPTIONS]``: one option set for
every command, options before or after the command, as in Wyng.
"""
import argparse
import sys
import traceback

from . import __version__
from .commands import arch_init, list as list_cmd, receive, send
from .errors import Fail

META_DIR = "/var/lib/qubes-wyng"
AUTH_DIR = "/run/qubes-wyng/auth"


def version(_opts, _app):
    print("qvm-wyng %s" % __version__)
    return 0


COMMANDS = {
    "arch-init": arch_init.run,
    "send": send.run,
    "receive": receive.run,
    "verify": receive.run_verify,
    "list": list_cmd.run,
    "version": version,
}


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise Fail(message)


def parser():
    p = Parser(prog="qvm-wyng", description="Fast incremental, encrypted backups of Qubes and Linux volumes.")
    p.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND",
                   help="one of: " + ", ".join(sorted(COMMANDS)))
    p.add_argument("volumes", nargs="*", metavar="VOLUME")
    a = p.add_argument
    a("--dest", help="archive location: file:/path or qubes://VM/path")
    a("--session", help="session YYYYMMDD-HHMMSS or ^TAG (receive, verify)")
    a("--session-strict", choices=("on", "off"), default="on",
      help="off: take the next older session when --session does not match exactly")
    a("--save-to", metavar="PATH", help="receive into this file or block device")
    a("--import-other-from", action="append", default=[], metavar="VOLUME:|:PATH",
      help="send the file or block device PATH as VOLUME (reads it in full)")
    a("--tag", action="append", default=[], metavar="TAG[,DESCRIPTION]", help="tag the new session (send)")
    a("--send-unchanged", action="store_true", help="record a session for unchanged volumes too")
    a("--encrypt", default="xchacha20-poly1305", help="arch-init: xchacha20-poly1305 or off")
    a("--compression", default="zstd:3", help="arch-init: zstd[:1-22], zlib[:0-9], bz2[:1-9] or off")
    a("--hashtype", default="hmac-sha256", help="arch-init: chunk id hash (hmac-sha256)")
    a("--chunk-factor", type=int, default=3, help="arch-init: chunk size 64 KiB * 2^(N-1), N=1..6")
    a("--passcmd", help="shell command that prints the passphrase")
    a("--authmin", type=int, default=2, help="minutes to remember the passphrase (-1 forgets, 0 off)")
    a("-u", "--unattended", action="store_true", help="never prompt")
    a("--meta-dir", default=META_DIR, help="dom0 metadata folder (default %s)" % META_DIR)
    a("--json", action="store_true", help="machine-readable output (list, send)")
    a("--force", action="store_true", help="take over a stale archive lock")
    a("--force-allow-rollback", action="store_true", help="accept an archive older than the one seen last")
    a("-v", "--verbose", action="count", default=0)
    a("-q", "--quiet", action="store_true")
    a("--debug", action="store_true", help="show a traceback on errors")
    return p


def parse(args):
    opts = parser().parse_intermixed_args(args)
    if not -1 <= opts.authmin <= 60:
        raise Fail("--authmin must be -1 to 60")
    opts.auth_dir = AUTH_DIR
    return opts


def main(args=None, app=None):
    opts = None
    try:
        opts = parse(sys.argv[1:] if args is None else args)
        return COMMANDS[opts.command](opts, app)
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
