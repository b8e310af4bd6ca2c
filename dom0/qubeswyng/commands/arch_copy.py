"""arch-copy: copy the archive at --dest to --to, incrementally.

Sealed objects go from one agent to the other as they are stored (dom0
bounds their length, never looks inside; the receiving agent checks that
each opens under its name).  For each session: its manifest, read back
from --to and checked against the root, then the chunks it lists that --to
lacks.  The root goes last and is read back, so an interrupted copy leaves
--to as it was, and the next run goes on where it stopped."""
from .. import manifest, wire
from ..archive import FETCH_BATCH, Archive
from ..errors import Fail
from ..progress import say

CHUNK, MANIFEST = 0, 1  # object kinds (doc/PROTOCOL.md, HAVE)


def sealed(plain):
    """At most how large the stored object of ``plain`` bytes can be."""
    return plain + 64 * (plain // wire.PART + 2)


def run(opts, app):
    if not opts.to:
        raise Fail("arch-copy: give the destination to copy to with --to=URL")
    with Archive(opts, app).open() as src, Archive(opts, app, opts.to) as dst:
        had_root, copied = dst.adopt(src), 0
        for vol, i in src.manifests():
            ses = vol["sessions"][i]
            limit = manifest.HEAD.size + 40 * manifest.chunk_count(ses["size"], src.chunk_size) + 32
            copied += dst.copy_objects(src, MANIFEST, [bytes.fromhex(ses["manifest"])], sealed(limit))
            ids = b"".join(cid for _i, cid in manifest.entries(dst.read_manifest(vol, i)) if cid != manifest.ZERO)
            for n in range(0, len(ids), 32 * FETCH_BATCH):
                batch = [ids[j:j + 32] for j in range(n, min(len(ids), n + 32 * FETCH_BATCH), 32)]
                copied += dst.copy_objects(src, CHUNK, batch, sealed(src.chunk_size))
        dst.finish_copy(src)
        if had_root:
            dst.collect()
    say(opts, "Copied archive %s to %s: %d sessions, %d objects copied" % (
        src.header.archive_id.hex(), opts.to, len(src.manifests()), copied))
    return 0
