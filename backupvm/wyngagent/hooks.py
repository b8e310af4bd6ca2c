"""Test-only: ``QVM_WYNG_TEST_CRASH=LABEL`` SIGKILLs the agent at the point
named LABEL, ``QVM_WYNG_TEST_PAUSE=LABEL`` stops it there until killed.
Unset (always, outside tests) ``point`` does nothing."""
import os
import signal
import time


def point(label):
    if os.environ.get("QVM_WYNG_TEST_CRASH") == label:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("QVM_WYNG_TEST_PAUSE") == label:
        time.sleep(3600)
