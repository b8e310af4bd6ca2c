"""The image source: any regular file or block device, read in full.

Holes (SEEK_DATA/SEEK_HOLE) are not read: a chunk wholly inside a hole is
a zero chunk, and a full read hands on a hole's chunks as one run, so a
big volume holding little data costs about what its data does.  Every
other chunk is read and its id compared with the parent session's, so the
cost is a full read of the allocated data.
"""
import collections
import contextlib
import errno
import itertools
import mmap
import os
import stat

from ..errors import Fail

AHEAD = 16  # chunks of a sparse read announced to the kernel before they are read


def open_path(path, flags, mode=0o777):
    """``os.open``, failing with one line that names ``path``."""
    try:
        return os.open(path, flags, mode)
    except OSError as e:
        raise Fail("%s: %s" % (path, e.strerror)) from None


class FullRead:
    """send's source interface (sources/snapshots.py) for a source without
    snapshots: every chunk is read and compared."""

    def begin(self, _archive, _vol, _chunk_map):
        return self, None

    def pending(self, *_mac):
        pass

    done = close = pending


class ImageSource(FullRead):
    def __init__(self, path):
        self.path = path
        # O_NONBLOCK: opening a FIFO must not wait for a writer
        self.fd = open_path(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        mode = os.fstat(self.fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            os.close(self.fd)
            raise Fail("%s: not a regular file or block device (it cannot be seeked)" % path)
        self.size = os.lseek(self.fd, 0, os.SEEK_END)  # reads say where (pread, SEEK_DATA)

    def close(self):
        os.close(self.fd)

    def data_ranges(self):
        """(start, end) byte ranges that may hold data, in order."""
        pos = 0
        while pos < self.size:
            try:
                start = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    return  # only a hole is left
                if e.errno == errno.EINVAL:
                    yield pos, self.size  # no hole support (block devices)
                    return
                raise
            end = min(os.lseek(self.fd, start, os.SEEK_HOLE), self.size)
            yield start, end
            pos = end

    def chunks(self, chunk_size, wanted=None):
        """Yield (index, data) for every chunk, data bytes of its own (read
        straight into them: no copy), and (range of indexes, None) for a run
        of chunks wholly in a hole, which are not read.  ``wanted`` (a sorted
        iterable of indexes) limits what is read."""
        count = -(-self.size // chunk_size)
        # chunk runs [first, stop) that touch data, walked forward with the indexes
        ranges = ((start // chunk_size, -(-end // chunk_size)) for start, end in self.data_ranges())
        if wanted is None:
            read, pos = self._direct(chunk_size), 0
            for first, stop in itertools.chain(ranges, [(count, count)]):
                if pos < first:
                    yield range(pos, first), None
                for index in range(max(pos, first), stop):
                    yield index, self._read(index, chunk_size, read)
                pos = max(pos, stop)
            return
        first, stop = 0, 0
        for index in self._announced(wanted, chunk_size):
            while index >= stop:
                first, stop = next(ranges, (count, index + 1))
            yield (range(index, index + 1), None) if index < first else (index, self._read(index, chunk_size))

    def _read(self, index, chunk_size, read=None):
        offset = index * chunk_size
        length = min(chunk_size, self.size - offset)
        data = read(length, offset) if read else os.pread(self.fd, length, offset)
        if len(data) != length:
            raise Fail("%s: short read at byte %d (did it shrink?)" % (self.path, offset + len(data)))
        return data

    def _direct(self, chunk_size):
        """A read of the whole volume goes around the page cache: O_DIRECT
        into one aligned buffer, copied out into bytes as pread would (sends
        measured 15% faster, and dom0's page cache is not filled with the
        volume).  None where the filesystem refuses O_DIRECT."""
        with contextlib.suppress(OSError):
            f = open("/proc/self/fd/%d" % self.fd, "rb", 0, opener=lambda p, fl: os.open(p, fl | os.O_DIRECT))
            buf = mmap.mmap(-1, chunk_size)  # the file closes when the returned reader goes
            return lambda length, offset: buf[:min(length, os.preadv(f.fileno(), [buf], offset))]

    def _announced(self, wanted, chunk_size):
        """``wanted``, each chunk announced (POSIX_FADV_WILLNEED) AHEAD chunks
        before it is yielded: scattered reads then wait in the disk's queue
        together instead of one after the other.  It costs page cache only."""
        ahead = collections.deque()
        for index in wanted:
            os.posix_fadvise(self.fd, index * chunk_size, chunk_size, os.POSIX_FADV_WILLNEED)
            ahead.append(index)
            if len(ahead) > AHEAD:
                yield ahead.popleft()
        yield from ahead
