"""The one exception the CLI turns into ``qvm-wyng: error: …`` and an exit code."""

EXIT_ERROR = 1       # the command failed; nothing it was asked for is half-done
EXIT_PARTIAL = 2     # some volumes were done, some failed (each was reported)


class Fail(Exception):
    pass
