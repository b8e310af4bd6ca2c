"""How long a command's data phase takes: dom0 runs in this process (the
agent, as always, in its own), and the clock starts when the command's
progress line does, after the connection, lock and root are done; the
commit is included.  For tests/test_remote.py and bench/storage.py."""
import time
from unittest import mock

from qubeswyng import progress


def data_phase(wyng, *args, env=None):
    starts, original = [], progress.Progress.__init__

    def init(self, *a):
        original(self, *a)
        starts.append(time.monotonic())
    with mock.patch.object(progress.Progress, "__init__", init):
        code = wyng.main(*args, env=env)
    assert code == 0, "%s exited %d" % (args[0], code)
    return time.monotonic() - starts[0]
