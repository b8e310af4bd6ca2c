"""The exceptions the CLI turns into ``qvm-wyng: error: …`` and the exit
statuses, numbered as Wyng numbers them where Wyng has a meaning for the
number (doc/qvm-wyng.1, EXIT STATUS, lists what differs)."""

EXIT_ERROR = 1       # the command failed; nothing it was asked for is half-done
EXIT_PARTIAL = 2     # some qubes or volumes were not (fully) done, the others were (Wyng's 2)
EXIT_AUTH = 3        # authentication failed: wrong passphrase, or an archive that fails its MAC


class Fail(Exception):
    status = EXIT_ERROR


class AuthFail(Fail):
    status = EXIT_AUTH
