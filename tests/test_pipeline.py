"""The bulk paths' pipelines: the agent reads and opens chunks ahead on
worker threads, dom0 checks ids on a worker; order, errors in place, the
verify-before-use rule and the bound on what is in flight all hold."""
import threading
import time

from qubeswyng import archive as dom0_archive
from wyngagent import objects
from wyngagent.archive import IN_FLIGHT, Archive, ArchiveError, chunk_name
from wyngagent.storage.local import LocalStore


class CountingStore(LocalStore):
    """A local store whose reads are slow and counted, like a remote one."""

    def __init__(self, root):
        super().__init__(root)
        self.lock, self.reading, self.most = threading.Lock(), 0, 0

    def read(self, name):
        with self.lock:
            self.reading += 1
            self.most = max(self.most, self.reading)
        try:
            time.sleep(0.005)
            return super().read(name)
        finally:
            with self.lock:
                self.reading -= 1


def test_agent_reads_ahead_in_order_with_errors_in_place_and_bounded(tmp_path):
    store = CountingStore(str(tmp_path / "a"))
    store.make_root()
    archive = Archive(store)
    archive.open(objects.Codec(objects.CIPHER_XCHACHA, objects.COMP_ZSTD, 3, bytes(32)), 1 << 16)
    ids = [bytes([i]) * 32 for i in range(3 * IN_FLIGHT)]
    for i, cid in enumerate(ids):
        if i % 5 != 3:
            store.write(chunk_name(cid), archive.codec.seal(chunk_name(cid), b"chunk %d " % i * 100))
    store.write(chunk_name(ids[4]), b"damaged")
    results = []
    for result in archive.get_chunks(iter(ids)):
        results.append(result)
        time.sleep(0.002)  # a slow consumer: the readers must not run away
    assert len(results) == len(ids)
    for i, result in enumerate(results):
        if i % 5 == 3:
            assert isinstance(result, ArchiveError) and "missing" in str(result)
        elif i == 4:
            assert isinstance(result, objects.ObjectError)
        else:
            assert result == b"chunk %d " % i * 100
    assert 1 < store.most <= IN_FLIGHT


def test_dom0_ahead_keeps_order_bounds_the_work_and_skips_none():
    started, lock = [], threading.Lock()

    def work(item):
        with lock:
            started.append(item[0])
        return item[0] * 2

    def items():
        for i in range(50):
            yield (i, None if i % 7 == 0 else b"x")
            with lock:  # never more than AHEAD + 1 items handed to the worker before their use
                assert len(started) <= consumed[0] + dom0_archive.AHEAD + 1

    consumed = [0]
    out = []
    for item, result in dom0_archive.ahead(work, items()):
        out.append((item[0], result))
        consumed[0] += 1
    assert out == [(i, None if i % 7 == 0 else 2 * i) for i in range(50)]
    assert 0 not in started and 7 not in started
