"""qvm-wyng: the command line.

``qvm-wyng [OPTIONS] COMMAND [VOLUME ...] [OPTIONS]``: one option set for
every command, options before or after the command, as in Wyng.  The two
tables below are the single source of ``--help``, ``COMMAND --help`` and
the man page (doc/qvm-wyng.1 is generated from them).
"""
import argparse
import sys

from . import __version__, config
from .commands import (add, arch_check, arch_copy, arch_deduplicate, arch_init, arch_passphrase, backup, browse,
                       delete, diff, list as list_cmd, monitor, prune, receive, rename, restore, send)
from .errors import Fail, report
from .formats import CIPHERS
from .progress import notice

META_DIR = "/var/lib/qubes-wyng"


def version(_opts, _app):
    print("qvm-wyng %s" % __version__)
    return 0


# name: (function, arguments, summary, options it uses)
COMMANDS = {
    "arch-init": (arch_init.run, "", "create a new archive at --dest",
                  ["dest", "encrypt", "compression", "hashtype", "chunk-factor", "passcmd"]),
    "send": (send.run, "[VOLUME ...]", "back up volumes as a new session (incremental when possible)",
             ["dest", "local", "all", "volex", "import-other-from", "tag", "send-unchanged", "autoprune", "apdays",
              "keep", "dry-run", "json", "passcmd", "authmin"]),
    "receive": (receive.run, "VOLUME", "restore a volume's session",
                ["dest", "local", "save-to", "overwrite", "sparse", "sparse-write", "use-snapshot", "session",
                 "session-strict", "passcmd", "authmin"]),
    "verify": (receive.run_verify, "VOLUME|VMNAME ...|--all", "check that volumes' (or qubes') sessions restore intact",
               ["dest", "all", "volex", "session", "session-strict", "passcmd", "authmin"]),
    "list": (list_cmd.run, "[VOLUME ...]", "list the volumes, or the sessions of volumes",
             ["dest", "json", "qubes", "passcmd", "authmin"]),
    "backup": (backup.run, "[VMNAME ...|--all]", "back up qubes, their volumes and settings, as one new session",
               ["dest", "all", "exclude", "import-other-from", "tag", "json", "passcmd", "authmin"]),
    "restore": (restore.run, "[VMNAME ...|--all]", "restore qubes from their backup, creating missing ones "
                "(exit 2: some were not restored whole)",
                ["dest", "all", "exclude", "session", "rename-to", "pool", "settings-only", "data-only",
                 "passcmd", "authmin"]),
    "mount": (browse.run_mount, "VOLUME MOUNTPOINT",
              "present a session of a volume read-only as MOUNTPOINT/VOLUME.img, fetched as it is read, "
              "until MOUNTPOINT is unmounted (loop-mount the image to see its files)",
              ["dest", "session", "session-strict", "passcmd", "authmin"]),
    "browse": (browse.run_browse, "QUBE[:VOLUME]|VOLUME",
               "open the files of a qube's volume (default private) in a session, in a new disposable qube "
               "without network: dom0 never parses them",
               ["dest", "session", "session-strict", "dispvm", "passcmd", "authmin"]),
    "monitor": (monitor.run, "[VOLUME ...|--all]",
                "note the changes since the last send and renew the snapshots; free those of volumes gone "
                "from the pool (no archive needed)",
                ["local", "all"]),
    "diff": (diff.run, "VOLUME ...", "compare local volumes with their archived session (exit 2: they differ)",
             ["dest", "local", "session", "session-strict", "json", "passcmd", "authmin"]),
    "prune": (prune.run, "[VOLUME ...|--all]", "remove sessions and reclaim their space (never the newest)",
              ["dest", "all", "volex", "session", "all-before", "keep", "autoprune", "apdays", "dry-run", "passcmd",
               "authmin"]),
    "delete": (delete.run, "VOLUME ...|--clean [--all]",
               "remove volumes and all their sessions from the archive, and their local snapshots; with "
               "--clean, remove only this tool's local snapshots and metadata (the archive is untouched)",
               ["dest", "local", "clean", "all", "passcmd", "authmin"]),
    "rename": (rename.run, "OLD NEW", "rename a volume in the archive", ["dest", "passcmd", "authmin"]),
    "add": (add.run, "VOLUME ...", "add volume names without sessions", ["dest", "passcmd", "authmin"]),
    "arch-check": (arch_check.run, "[VOLUME ...]",
                   "check every manifest, chunk and MAC; report problems by volume and session",
                   ["dest", "session", "session-strict", "clean", "passcmd", "authmin"]),
    "arch-copy": (arch_copy.run, "", "copy the archive at --dest to --to (only what --to lacks; resumes)",
                  ["dest", "to", "passcmd", "authmin"]),
    "arch-passphrase": (arch_passphrase.run, "", "change the passphrase: asks for the old one, then for the new "
                        "one (a terminal, or a line of stdin); no data changes", ["dest", "passcmd"]),
    "arch-deduplicate": (arch_deduplicate.run, "", "report logical against stored bytes (dedup is always on)",
                         ["dest", "json", "passcmd", "authmin"]),
    "version": (version, "", "print the version", []),
}


# the kinds most options are: a flag, an option with a value, a repeatable one
def flag(text, short=None):
    return short, dict(action="store_true", help=text)


def value(metavar, text, **more):
    return None, dict(metavar=metavar, help=text, **more)


def repeat(metavar, text):
    return None, dict(action="append", default=[], metavar=metavar, help=text)


# option: (short form or None, argparse keywords)
OPTIONS = {
    "dest": value("URL", "archive location: file:/path, ssh://[user@]host[:port]/path, s3://bucket/prefix, or in a "
                  "backup qube qubes://VM/path, qubes-ssh://VM:user@host/path, qubes-s3://VM:bucket/prefix"),
    "to": value("URL", "arch-copy: copy the archive here (empty, or a copy; forms as --dest)"),
    "session": value("YYYYMMDD-HHMMSS|^TAG[,...]", "the session to use (newest if not given); prune: one, every one "
                     "tagged, or an inclusive range FIRST,LAST; arch-check: newest, or one and all older"),
    "all": flag("every volume (of the archive, send: that is in the pool; monitor: of the pool); backup: every qube "
                "with include_in_backups; restore: every qube in the archive this system lacks (force: all); "
                "delete --clean: all metadata", "-a"),
    "volex": repeat("VOLUME", "leave this volume out (of --all, or of the volumes named); repeat for more"),
    "all-before": flag("prune every session before --session"),
    "keep": repeat("YYYYMMDD-HHMMSS|^TAG", "never prune this session, or sessions with this tag; repeat for more"),
    "autoprune": (None, dict(choices=("off", "on", "min", "full"),
                             help="remove old sessions by age (--apdays): full all that are due; on, min 3, 1 "
                                  "of each volume's oldest at a time, with send while space is short")),
    "apdays": value("A:B:C:D", "autoprune: remove sessions older than A days, thin those older than B days to D per "
                    "C days; A or B 0: not that, both: none (default 0:62:1:2)"),
    "dry-run": flag("say what would be sent or removed; change nothing"),
    "clean": flag("arch-check: remove objects no session uses; delete: remove local snapshots and metadata only"),
    "session-strict": (None, dict(choices=("on", "off"), default="on",
                                  help="off: take the next older session when --session does not match")),
    "local": value("VG/POOL|/DIR", "the pool volumes live in: an LVM thin pool, or a directory on Btrfs or XFS "
                   "(volume names are paths relative to it)"),
    "overwrite": flag("receive --local: restore over an existing volume"),
    "save-to": value("PATH", "receive into this file or block device"),
    "sparse-write": flag("restore over the existing volume in place, writing only what differs, holes or discards "
                         "for zeros"),
    "sparse": flag("as --sparse-write; fetch only chunks unlike the local ones"),
    "use-snapshot": flag("--local: start from the snapshot of the last send"),
    "import-other-from": repeat("VOLUME:|:PATH", "send the file or block device PATH as VOLUME (read in full)"),
    "tag": repeat("TAG[,DESCRIPTION]", "tag the new session; repeat for more tags"),
    "send-unchanged": flag("record a session for unchanged volumes too"),
    "encrypt": value("CIPHER", "xchacha20-poly1305 (default) or off (MACs stay on)", default="xchacha20-poly1305",
                     choices=CIPHERS),
    "compression": value("TYPE[:LEVEL]", "zstd[:1-22] (default zstd:3), zlib[:0-9], bz2[:1-9] or off",
                         default="zstd:3"),
    "hashtype": value("HASH", "chunk id hash: hmac-sha256", default="hmac-sha256", choices=("hmac-sha256",)),
    "chunk-factor": value("N", "chunk size 64 KiB * 2^(N-1), N = 1..6 (default 3: 256 KiB)", type=int, default=3,
                          choices=range(1, 7)),
    "passcmd": value("COMMAND", "shell command that prints the passphrase"),
    "authmin": value("MINUTES", "remember the passphrase this long (default 2; 0 off; -1 forgets)", type=int,
                     default=2),
    "unattended": flag("never prompt", "-u"),
    "meta-dir": value("PATH", "dom0 metadata folder (%s)" % META_DIR, default=META_DIR),
    "json": flag("machine-readable output"),
    "exclude": repeat("VMNAME", "leave this qube out of --all"),
    "qubes": flag("list: one line per qube (last backup, sessions, size; OVERDUE per /etc/wyng/schedule.conf)"),
    "dispvm": value("TEMPLATE", "browse: the disposable template (default: the qube's default_dispvm, else the "
                    "system's)"),
    "rename-to": value("NEWNAME", "restore the one qube named under this name"),
    "pool": value("POOL", "restore: create missing qubes' volumes in this pool"),
    "settings-only": flag("restore: settings, not volume data"),
    "data-only": flag("restore: volume data into existing qubes, not settings"),
    "force": flag("take over an archive lock held by another writer; restore: overwrite existing (halted) qubes; "
                  "receive: replace a --save-to that holds data without asking"),
    "force-allow-rollback": flag("accept an archive older than the one seen last"),
    "force-other-archive": flag("accept that --dest holds another archive than the one seen there before"),
    "verbose": ("-v", dict(action="count", default=0, help="more detail")),
    "quiet": flag("only errors", "-q"),
    "debug": flag("show a traceback on errors"),
    "config": value("PATH", "read option defaults from PATH instead of %s" % config.DEFAULT_PATH),
}
COMMON = ["unattended", "meta-dir", "force", "force-allow-rollback", "force-other-archive", "verbose", "quiet",
          "debug", "config"]


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
    for arg in args:  # names and paths are UTF-8 in the archive, the agent's requests and dom0's output
        if not arg.isascii() and any("\udc80" <= c <= "\udcff" for c in arg):
            raise Fail("argument %s is not valid UTF-8" % ascii(arg))
    for i, arg in enumerate(args):
        if arg in COMMANDS and ("-h" in args[i:] or "--help" in args[i:]):
            parser(arg).parse_args(["--help"])
    opts = parser().parse_intermixed_args(args)
    values, unused = config.read(opts.config, OPTIONS)
    config.apply(opts, values, config.given_options(parser(), args))
    for text in unused:
        notice(opts, text)
    if not -1 <= opts.authmin <= 60:
        raise Fail("--authmin must be -1 to 60")
    return opts


def main(args=None, app=None):
    opts = None
    try:
        opts = parse(sys.argv[1:] if args is None else args)
        return COMMANDS[opts.command][0](opts, app)
    except (Fail, OSError) as e:
        return report(e, opts is not None and opts.debug)
    except KeyboardInterrupt:
        print("qvm-wyng: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
