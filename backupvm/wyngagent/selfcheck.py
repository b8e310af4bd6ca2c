"""``wyng-agent --self-check``: is this VM able to run the agent?

Imports the crypto and compression modules the agent needs, checks the
XChaCha20-Poly1305 implementation in use, and the pycryptodome reference,
against the published test vectors (draft-irtf-cfrg-xchacha-03, 2.2.1 and
A.3.1), seals and opens a test object with compression and encryption, and
checks that a changed byte is refused.
Prints one line: versions and the AEAD implementation; exit 0 when all is
well, 1 (with the reason) when not.
"""
import platform
import sys

from . import __version__

# draft-irtf-cfrg-xchacha-03, 2.2.1 (HChaCha20) and A.3.1 (AEAD_XChaCha20_Poly1305)
HKAT_KEY = bytes(range(32))
HKAT_NONCE = bytes.fromhex("000000090000004a0000000031415927")
HKAT_SUBKEY = bytes.fromhex("82413b4227b27bfed30e42508a877d73a0f9e4d58a74a853c12ec41326d3ecdc")
KAT_KEY = bytes(range(0x80, 0xa0))
KAT_NONCE = bytes(range(0x40, 0x58))
KAT_AAD = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
KAT_PLAIN = (b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip "
             b"for the future, sunscreen would be it.")
KAT_SEALED = bytes.fromhex(
    "bd6d179d3e83d43b9576579493c0e939572a1700252bfaccbed2902c21396cbb"
    "731c7f1b0b4aa6440bf3a82f4eda7e39ae64c6708c54c216cb96b72e1213b452"
    "2f8c9ba40db5d945b11b69b982c1bb9e3f3fac2bc369488f76b2383565d3fff9"
    "21f9664c97637da9768812f615c68b13b52e"
    "c0875924c1c7987947deafd8780acf49")


class CheckFailed(Exception):
    pass


def check(condition, what):
    if not condition:
        raise CheckFailed(what)


def versions():
    """(AEAD implementation, [name version, ...]) of what the agent uses."""
    from . import aead
    import cryptography
    import zstandard

    # pycryptodomex and Debian's python3-pycryptodome are module Cryptodome,
    # pycryptodome from PyPI is module Crypto
    pycrypto = sys.modules[aead.ChaCha20_Poly1305.__name__.split(".")[0]]
    try:
        from cryptography.hazmat.backends.openssl.backend import backend
        openssl = " (%s)" % backend.openssl_version_text()
    except (ImportError, AttributeError):
        openssl = ""
    found = ["python %s" % platform.python_version(),
             "cryptography %s%s" % (cryptography.__version__, openssl),
             "%s %s" % (pycrypto.__name__, pycrypto.__version__),
             "zstandard %s" % zstandard.__version__]
    return "cryptography (OpenSSL ChaCha20-Poly1305 + HChaCha20; reference: pycryptodome)", found


def run_checks():
    from . import aead
    from .objects import CIPHER_XCHACHA, COMP_ZSTD, Codec, ObjectError

    check(aead.hchacha20(HKAT_KEY, HKAT_NONCE) == HKAT_SUBKEY, "HChaCha20 does not match the test vector")
    check(aead.seal(KAT_KEY, KAT_NONCE, KAT_AAD, KAT_PLAIN) == KAT_SEALED,
          "XChaCha20-Poly1305 does not match the test vector")
    check(aead.open(KAT_KEY, KAT_NONCE, KAT_AAD, KAT_SEALED) == KAT_PLAIN,
          "XChaCha20-Poly1305 does not open the test vector")
    check(aead.ref_seal(KAT_KEY, KAT_NONCE, KAT_AAD, KAT_PLAIN) == KAT_SEALED,
          "pycryptodome's XChaCha20-Poly1305 does not match the test vector")

    codec = Codec(CIPHER_XCHACHA, COMP_ZSTD, 3, bytes(range(32)))
    plain = b"wyng self-check " * 4096
    sealed = codec.seal("chunks/00/self-check", plain)
    check(len(sealed) < len(plain) // 10, "zstd did not compress the test object")
    check(codec.open("chunks/00/self-check", sealed, len(plain)) == plain, "test object does not open")
    tampered = bytearray(sealed)
    tampered[-1] ^= 1
    for name, blob in (("chunks/00/self-check", bytes(tampered)), ("chunks/00/other-name", sealed)):
        try:
            codec.open(name, blob, len(plain))
        except ObjectError:
            continue
        raise CheckFailed("a changed or moved test object was accepted")


def run():
    try:
        implementation, found = versions()
        run_checks()
    except (ImportError, CheckFailed) as e:
        print("wyng-agent %s self-check FAILED: %s" % (__version__, e), file=sys.stderr)
        return 1
    print("wyng-agent %s self-check ok: aead %s; %s" % (__version__, implementation, ", ".join(found)))
    return 0
