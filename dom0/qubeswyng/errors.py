"""The exceptions the CLI turns into ``qvm-wyng: error: …`` and the exit
statuses, numbered as Wyng numbers them where Wyng has a meaning for the
number (doc/qvm-wyng.1, EXIT STATUS, lists what differs)."""
import sys
import traceback

EXIT_ERROR = 1       # the command failed; nothing it was asked for is half-done
EXIT_PARTIAL = 2     # some qubes or volumes were not (fully) done, the others were (Wyng's 2)
EXIT_AUTH = 3        # authentication failed: wrong passphrase, or an archive that fails its MAC


class Fail(Exception):
    status = EXIT_ERROR


class AuthFail(Fail):
    status = EXIT_AUTH


def report(e, debug=False, what=""):
    """Print the Fail or OSError ``e`` as one error line (about ``what``,
    if given); returns its exit status."""
    if debug:
        traceback.print_exc()
    print("qvm-wyng: error: %s%s" % (what and what + ": ", e if isinstance(e, Fail) else "%s%s" % (
        e.strerror or e, (": %s" % e.filename) if e.filename else "")), file=sys.stderr)
    return getattr(e, "status", EXIT_ERROR)
