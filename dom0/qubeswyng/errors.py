"""The one exception the CLI turns into ``qvm-wyng: error: …`` and an exit code."""

EXIT_ERROR = 1       # the command failed; nothing it was asked for is half-done
EXIT_PARTIAL = 2     # some qubes or volumes were not (fully) done, the others were (Wyng's 2)


class Fail(Exception):
    pass
