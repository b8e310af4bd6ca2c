"""arch-init: create an archive at --dest."""
import os

from .. import keys as K
from ..archive import Archive
from ..formats import CIPHERS, Header, parse_compression
from ..progress import say


def run(opts, app):
    compression, level = parse_compression(opts.compression)  # argparse checked the other settings
    with Archive(opts, app) as archive:
        passphrase = K.read_passphrase(opts, confirm=True)
        header = Header(os.urandom(16), CIPHERS[opts.encrypt], compression, level, opts.chunk_factor,
                        K.kdf_params())  # calibrated here: about a second
        archive.create(header, passphrase)
    say(opts, "Created archive %s at %s (chunk size %d KiB, encryption %s, compression %s)" % (
        header.archive_id.hex(), opts.dest, header.chunk_size >> 10,
        opts.encrypt, opts.compression))
    return 0
