"""The one exception the CLI turns into ``qvm-wyng: error: …`` and an exit code."""

EXIT_ERROR = 1       # the command failed; nothing it was asked for is half-done


class Fail(Exception):
    pass
