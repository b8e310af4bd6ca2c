"""The time dom0 stamps on sessions and roots, and test-only hooks.

``QVM_WYNG_TEST_NOW`` (Unix seconds) replaces the clock, so that tests can
make sessions at chosen times.  ``QVM_WYNG_TEST_CRASH=LABEL`` SIGKILLs the
process at the point named LABEL, ``QVM_WYNG_TEST_PAUSE=LABEL`` stops it there
(SIGSTOP: until SIGCONT or killed).  All three are for tests only: unset, they do nothing.
"""
import os
import signal
import time


def now():
    return int(os.environ.get("QVM_WYNG_TEST_NOW") or time.time())


def point(label):
    for variable, sig in (("QVM_WYNG_TEST_CRASH", signal.SIGKILL), ("QVM_WYNG_TEST_PAUSE", signal.SIGSTOP)):
        if os.environ.get(variable) == label:
            os.kill(os.getpid(), sig)
