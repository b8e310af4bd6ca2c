"""Option defaults from /etc/wyng/wyng.ini, read the way Wyng documents it.

::

    [var-global-default]
    dest = qubes://backupvm/home/user/wyng.backup
    authmin = 10
    send-unchanged = 1
    tag = weekly
        offsite,copied to the safe

- One section, ``[var-global-default]``; any other section is an error.
- Keys are the long option names without ``--`` (``chunk-factor``);
  ``chunk_factor`` is the same key.  A key named twice is an error.
- Flags take ``1`` or ``0``; ``verbose`` takes a count; other options
  their command-line value.  Comments are whole lines starting with ``#``
  or ``;`` (a ``#`` inside a value is part of it: passcmd, paths).
- A repeatable option lists one value a line, lines after the first
  indented.  Other options take exactly one value.
- Precedence: built-in default < wyng.ini < command line.  An option given
  on the command line replaces the ini value, for repeatable options too
  (the lists are not merged, so the command line can always override).
- ``--config=PATH`` reads PATH instead, which must exist; a missing default
  file is fine.  ``QVM_WYNG_CONFIG`` names another default file (tests use
  it so they never read the real one).
- Keys mean what they mean in Wyng.  Keys Wyng ignores in the file
  (options for one run: ``session``, ``tag``, ``all``, ``force`` ...)
  are ignored here too, with a notice, and so are
  ``force-allow-rollback`` and ``force-other-archive`` (accepting a
  rolled-back or another archive must be the choice of one run).  Wyng's
  options that mean nothing here (``dedup``: always on; ``meta-reduce``
  ...) are accepted with a notice.  Only a key neither tool knows is an
  error.
"""
import argparse
import ast
import configparser
import os

from .errors import Fail

DEFAULT_PATH = "/etc/wyng/wyng.ini"
ENV = "QVM_WYNG_CONFIG"
SECTION = "var-global-default"
# Wyng 0.8 ignores these keys in the file; the last two are our additions
IGNORED = ("config debug force save-to session unattended volume-desc tag all all-before vols-from "
           "import-other-from upgrade-format help skip-corrupt-chunks force-retry force-allow-rollback "
           "force-other-archive").split()
# Wyng 0.8 options that have no meaning here
WYNG_ONLY = ("dedup use-snapshot-diff req-snapshot remap local-from vid meta-reduce quick vouch purge maxsync "
             "tar-bypass opt-ssh opt-qubes change-uuid purge-tmp").split()


def read(explicit, options):
    """``{option name: value}`` from the file ``explicit`` (--config: it must
    exist) or else the default file (if there is one), converted and checked
    with the option table ``options`` (cli.OPTIONS), and the notices to print
    about keys left unused."""
    path = (os.environ.get(ENV) or DEFAULT_PATH) if explicit is None else explicit
    if explicit is None and not os.path.exists(path):
        return {}, []
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise Fail("%s: not UTF-8 text" % path) from None
    return parse(text, options, path)


def parse(text, options, where="wyng.ini"):
    ini = configparser.ConfigParser(interpolation=None, default_section="", strict=True)
    ini.optionxform = lambda key: key.strip().lower().replace("_", "-")
    try:
        ini.read_string(text, source=where)
    except configparser.DuplicateOptionError as e:
        raise Fail("%s line %d: %s is set twice" % (where, e.lineno, e.option)) from None
    except configparser.DuplicateSectionError as e:
        raise Fail("%s line %d: section [%s] appears twice" % (where, e.lineno, e.section)) from None
    except configparser.MissingSectionHeaderError as e:
        raise Fail("%s line %d: settings must follow a [%s] line" % (where, e.lineno, SECTION)) from None
    except configparser.ParsingError as e:
        lineno, line = e.errors[0]
        raise Fail("%s line %d: not 'key = value': %s" % (where, lineno, ast.literal_eval(line).strip())) from None
    for section in ini.sections():
        if section != SECTION:
            raise Fail("%s: unknown section [%s] (only [%s])" % (where, section, SECTION))
    items = ini.items(SECTION) if ini.has_section(SECTION) else []
    unused = [key for key, _v in items if key in IGNORED or key in WYNG_ONLY]
    return ({key: convert(key, value, options, where) for key, value in items if key not in unused},
            ["%s: %s: %s" % (where, key, "ignored in the file: give it on the command line" if key in IGNORED else
                             "a Wyng option that has no meaning here, ignored") for key in unused])


def convert(key, value, options, where):
    def bad(message):
        return Fail("%s: %s: %s" % (where, key, message))

    if key not in options:
        raise bad("unknown option")
    kwargs = options[key][1]
    action = kwargs.get("action", "store")
    lines = [line.strip() for line in value.splitlines() if line.strip()]
    if not lines:
        raise bad("empty value")
    if action != "append" and len(lines) > 1:
        raise bad("takes one value (only repeatable options take more lines)")
    if action == "store_true":
        if lines[0] not in ("1", "0"):
            raise bad("must be 1 or 0, not %r" % lines[0])
        return lines[0] == "1"
    if action == "count":
        if not lines[0].isdigit():
            raise bad("must be a count (0, 1, 2 ...), not %r" % lines[0])
        return int(lines[0])
    values = [one(item, kwargs, bad) for item in lines]
    return values if action == "append" else values[0]


def one(text, kwargs, bad):
    kind = kwargs.get("type")
    if kind is not None:
        try:
            text = kind(text)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            raise bad("not a valid %s: %r" % (getattr(kind, "__name__", "value"), text)) from None
    if "choices" in kwargs and text not in kwargs["choices"]:
        raise bad("must be one of %s, not %r" % (", ".join(map(str, kwargs["choices"])), text))
    return text


def given_options(parser, args):
    """The option names the command line ``args`` sets (``parser`` is a fresh
    one: its defaults are suppressed so that only given options appear)."""
    options = [action for action in parser._actions if action.option_strings]
    for action in options:
        action.default = argparse.SUPPRESS
    given = vars(parser.parse_intermixed_args(args))
    return {action.option_strings[-1][2:] for action in options if action.dest in given}


def apply(opts, values, given):
    """Set the ini ``values`` on the parsed ``opts`` for every option the
    command line did not give."""
    vars(opts).update((name.replace("-", "_"), value) for name, value in values.items() if name not in given)
