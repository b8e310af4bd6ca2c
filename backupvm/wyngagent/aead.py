"""XChaCha20-Poly1305 (the IETF construction libsodium also implements).

pycryptodome(x) is the required implementation.  When the ``cryptography``
package is present its OpenSSL ChaCha20-Poly1305 is used instead, with the
HChaCha20 subkey computed from one ChaCha20 block: it is several times
faster and produces identical bytes (tests/test_objects.py checks both).
"""
import struct

try:
    from Cryptodome.Cipher import ChaCha20_Poly1305
except ImportError:  # pycryptodome as PyPI ships it (Debian's ships Cryptodome)
    from Crypto.Cipher import ChaCha20_Poly1305

try:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
    from cryptography.exceptions import InvalidTag
except ImportError:
    ChaCha20Poly1305 = None

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


# older cryptography (Debian 12 has 38) takes only bytes as data, not
# memoryviews; bytes() of a bytes object is that object, no copy.
def _fast_seal(key, nonce, aad, plain):
    return ChaCha20Poly1305(hchacha20(key, nonce[:16])).encrypt(b"\0\0\0\0" + nonce[16:], bytes(plain), aad)


def _fast_open(key, nonce, aad, sealed):
    try:
        return ChaCha20Poly1305(hchacha20(key, nonce[:16])).decrypt(b"\0\0\0\0" + nonce[16:], bytes(sealed), aad)
    except InvalidTag:
        return None


def _ref_seal(key, nonce, aad, plain):
    box = ChaCha20_Poly1305.new(key=key, nonce=nonce)
    box.update(aad)
    ct, tag = box.encrypt_and_digest(plain)
    return ct + tag


def _ref_open(key, nonce, aad, sealed):
    box = ChaCha20_Poly1305.new(key=key, nonce=nonce)
    box.update(aad)
    try:
        return box.decrypt_and_verify(sealed[:-TAG], sealed[-TAG:])
    except ValueError:
        return None


if ChaCha20Poly1305 is not None:
    seal, open = _fast_seal, _fast_open
else:
    seal, open = _ref_seal, _ref_open
