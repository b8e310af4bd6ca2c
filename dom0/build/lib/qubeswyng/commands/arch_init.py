"""arch-init: create an archive at --dest."""
import os

from .. import keys as K
from ..archive import Archive
from ..errors import Fail
from ..formats import CIPHERS, Header, chunk_size, parse_compression


def run(opts, app):
    if opts.encrypt not in CIPHERS:
        raise Fail("--encrypt: %r is not one of %s" % (opts.encrypt, ", ".join(CIPHERS)))
    if opts.hashtype != "hmac-sha256":
        raise Fail("--hashtype: only hmac-sha256 is supported")
    compression, level = parse_compression(opts.compression)
    if not 1 <= opts.chunk_factor <= 6:
        raise Fail("--chunk-factor must be 1 to 6")
    header = Header(os.urandom(16), CIPHERS[opts.encrypt], compression, level, opts.chunk_factor)
    archive = Archive(opts, app)
    try:
        archive.create(header, K.read_passphrase(opts, confirm=True))
    finally:
        archive.close()
    if not opts.quiet:
        print("Created archive %s at %s (chunk size %d KiB, encryption %s, compression %s)" % (
            header.archive_id.hex(), opts.dest, chunk_size(opts.chunk_factor) >> 10,
            opts.encrypt, opts.compression))
    return 0
