"""dom0's own state under --meta-dir (default /var/lib/qubes-wyng).

Per archive id:
- ``root-seen``: sequence number and MAC of the newest root dom0 has
  accepted or written; an older root from the agent is a rollback.
- ``maps/<volume id>``: the chunk map of a volume's newest session, keyed
  by that session's manifest MAC, so that a send need not fetch and merge
  the manifest chain when nothing else wrote to the archive in between.
- ``snapshots/<volume id>.json`` (and ``.lock``): which local snapshot
  stands for which session, and changes since (sources/snapshots.py).
And per destination, ``destinations/<sha256 of the canonical --dest>``:
the id of the archive found there (archive.py: another one is refused).
Everything here is written atomically; losing it costs speed, never safety
(except root-seen, which is what rollback detection remembers).
"""
import contextlib
import json
import os
import struct

from .errors import Fail
from .manifest import ChunkMap

MAP_HEAD = struct.Struct(">8s32sQ")
MAP_MAGIC = b"QWYNGMAP"


def write_atomic(path, *parts):
    """A root-only file written through ``<path>.new``, synced and renamed
    over ``path``: a crash leaves the old file or the new one."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    with os.fdopen(os.open(path + ".new", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        f.writelines(parts)
        f.flush()
        os.fsync(f.fileno())
    os.rename(path + ".new", path)


class Meta:
    def __init__(self, meta_dir, archive_id):
        self.archive_id, self.dir = archive_id, os.path.join(meta_dir, archive_id.hex())

    def _path(self, *names):
        return os.path.join(self.dir, *names)

    def last_seen(self):
        path = self._path("root-seen")
        try:
            with open(path) as f:
                seen = json.load(f)
            return int(seen["seq"]), bytes.fromhex(seen["mac"])
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            # not "none seen": that would accept any root the agent offers
            raise Fail("%s is damaged, so a rolled-back archive could not be detected; restore it from a "
                       "backup of dom0, or remove it to trust the archive as it is now" % path) from None

    def save_seen(self, seq, mac):
        write_atomic(self._path("root-seen"), json.dumps({"seq": seq, "mac": mac.hex()}).encode())

    def load_json(self, *names):
        with contextlib.suppress(FileNotFoundError, ValueError), open(self._path(*names)) as f:
            return json.load(f)
        return None

    def save_json(self, value, *names):
        write_atomic(self._path(*names), json.dumps(value).encode())

    def load_map(self, volume_id, head_mac):
        with contextlib.suppress(FileNotFoundError, struct.error), open(self._path("maps", volume_id), "rb") as f:
            magic, mac, count = MAP_HEAD.unpack(f.read(MAP_HEAD.size))
            if magic == MAP_MAGIC and mac == head_mac:
                ids = bytearray(os.fstat(f.fileno()).st_size - MAP_HEAD.size)  # read into: no second copy
                return ChunkMap(ids=ids) if f.readinto(ids) == len(ids) == 32 * count else None
        return None

    def save_map(self, volume_id, head_mac, chunk_map):
        write_atomic(self._path("maps", volume_id), MAP_HEAD.pack(MAP_MAGIC, head_mac, len(chunk_map)), chunk_map.ids)

    def drop_map(self, volume_id):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path("maps", volume_id))
