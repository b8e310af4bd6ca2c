"""XChaCha20-Poly1305 (the IETF construction libsodium also implements).

The agent seals and opens with OpenSSL's ChaCha20-Poly1305 through the
``cryptography`` package (a dependency of every install: doc/decisions.md),
with the HChaCha20 subkey computed from one ChaCha20 block.  pycryptodome's
XChaCha20-Poly1305 (``ref_seal``/``ref_open``) is the independent reference
that the tests and ``wyng-agent --self-check`` hold it against, with the
published test vectors (draft-irtf-cfrg-xchacha-03, 2.2.1 and A.3.1).
"""
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

try:
    from Cryptodome.Cipher import ChaCha20_Poly1305
except ImportError:  # pycryptodome as PyPI ships it (Debian's ships Cryptodome)
    from Crypto.Cipher import ChaCha20_Poly1305

NONCE, TAG = 24, 16
_SIGMA = struct.unpack("<4I", b"expand 32-byte k")
_WORDS = struct.Struct("<16I")


def hchacha20(key, nonce16):
    """HChaCha20 from a ChaCha20 keystream block: the block is the rounds'
    output plus the input state, so subtracting the input's constant and
    nonce words leaves the HChaCha20 words."""
    block = Cipher(algorithms.ChaCha20(key, nonce16), None).encryptor().update(bytes(64))
    w, n = _WORDS.unpack(block), struct.unpack("<4I", nonce16)
    return struct.pack("<8I", *[(w[i] - _SIGMA[i]) & 0xFFFFFFFF for i in range(4)],
                       *[(w[12 + i] - n[i]) & 0xFFFFFFFF for i in range(4)])


# OpenSSL's calls release the GIL (measured: two threads sealing use two
# cores), so the agent's worker threads seal and open in parallel.
def _takes_views():
    """Older cryptography (Debian 12 has 38) takes only bytes as data, not
    memoryviews, which must then be copied (bytes() of bytes is no copy)."""
    try:
        ChaCha20Poly1305(bytes(32)).encrypt(bytes(12), memoryview(b"x"), None)
    except TypeError:
        return False
    return True


_data = (lambda data: data) if _takes_views() else bytes


def seal(key, nonce, aad, plain):
    return ChaCha20Poly1305(hchacha20(key, nonce[:16])).encrypt(b"\0\0\0\0" + nonce[16:], _data(plain), aad)


def open(key, nonce, aad, sealed):
    try:
        return ChaCha20Poly1305(hchacha20(key, nonce[:16])).decrypt(b"\0\0\0\0" + nonce[16:], _data(sealed), aad)
    except InvalidTag:
        return None


def ref_seal(key, nonce, aad, plain):
    box = ChaCha20_Poly1305.new(key=key, nonce=nonce)
    box.update(aad)
    ct, tag = box.encrypt_and_digest(plain)
    return ct + tag


def ref_open(key, nonce, aad, sealed):
    box = ChaCha20_Poly1305.new(key=key, nonce=nonce)
    box.update(aad)
    try:
        return box.decrypt_and_verify(sealed[:-TAG], sealed[-TAG:])
    except ValueError:
        return None
