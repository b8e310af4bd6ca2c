"""The agent's object container: both AEAD implementations agree, and a
tampered, moved, truncated or oversized object never opens."""
import os
import struct
import zlib

import pytest

from wyngagent import aead, objects, selfcheck

KEY = bytes(range(32))


def test_published_test_vectors():
    """draft-irtf-cfrg-xchacha-03 (https://datatracker.ietf.org/doc/html/draft-irtf-cfrg-xchacha-03):
    section 2.2.1 (HChaCha20) and appendix A.3.1 (AEAD_XChaCha20_Poly1305);
    the values are in selfcheck.py, which checks them in an installed VM too."""
    assert aead.hchacha20(selfcheck.HKAT_KEY, selfcheck.HKAT_NONCE) == selfcheck.HKAT_SUBKEY
    assert selfcheck.HKAT_SUBKEY.hex() == "82413b4227b27bfed30e42508a877d73a0f9e4d58a74a853c12ec41326d3ecdc"
    vector = (selfcheck.KAT_KEY, selfcheck.KAT_NONCE, selfcheck.KAT_AAD)
    for seal, open_ in ((aead.seal, aead.open), (aead.ref_seal, aead.ref_open)):
        assert seal(*vector, selfcheck.KAT_PLAIN) == selfcheck.KAT_SEALED
        assert open_(*vector, selfcheck.KAT_SEALED) == selfcheck.KAT_PLAIN


@pytest.mark.parametrize("length", [0, 1, 63, 64, 65, 1000, 256 << 10])
def test_openssl_and_pycryptodome_give_the_same_bytes(length):
    nonce, aad, plain = os.urandom(24), b"chunks/ab/cd\0\0\0\0\1", os.urandom(length)
    fast, ref = aead.seal(KEY, nonce, aad, plain), aead.ref_seal(KEY, nonce, aad, plain)
    assert fast == ref
    assert aead.ref_open(KEY, nonce, aad, fast) == plain
    assert aead.open(KEY, nonce, aad, ref) == plain
    tampered = bytearray(fast)
    tampered[-1] ^= 1
    assert aead.open(KEY, nonce, aad, bytes(tampered)) is None
    assert aead.ref_open(KEY, nonce, aad, bytes(tampered)) is None


@pytest.fixture(params=[(1, 1), (1, 0), (0, 2), (0, 3)], ids=["xchacha-zstd", "xchacha-raw", "zlib", "bz2"])
def codec(request):
    cipher, compression = request.param
    return objects.Codec(cipher, compression, 3, KEY)


def test_round_trip_and_name_binding(codec):
    data = b"hello " * 5000
    sealed = codec.seal("chunks/ab/x", data)
    assert codec.open("chunks/ab/x", sealed, len(data)) == data
    if codec.cipher:
        with pytest.raises(objects.ObjectError, match="fails authentication"):
            codec.open("chunks/ab/y", sealed, len(data))


def test_streams_detect_moved_dropped_and_added_segments():
    codec = objects.Codec(1, 1, 3, KEY)
    parts = [os.urandom(100), os.urandom(200), os.urandom(300)]
    blob = b"".join(codec.seal_stream("manifests/m", iter(parts)))
    source = lambda b: objects._BytesSource(b)  # noqa: E731
    assert list(map(bytes, codec.open_stream("manifests/m", source(blob), 1000))) == parts
    segs, pos = [], 5
    while pos < len(blob):
        (word,) = struct.unpack(">I", blob[pos:pos + 4])
        n = word & 0x7FFFFFFF
        segs.append(blob[pos:pos + 4 + n])
        pos += 4 + n
    for bad in (segs[1] + segs[0] + segs[2], segs[0] + segs[2], segs[0] + segs[1] + segs[2] + segs[2],
                segs[0] + segs[1]):
        with pytest.raises(objects.ObjectError):
            list(codec.open_stream("manifests/m", source(blob[:5] + bad), 1000))


@pytest.mark.parametrize("kind", [objects.COMP_ZSTD, objects.COMP_ZLIB, objects.COMP_BZ2])
def test_decompression_is_capped(kind):
    """An unencrypted archive's storage could plant a bomb: it is refused."""
    codec = objects.Codec(0, kind, 3, b"")
    bomb = codec.seal("chunks/ab/x", bytes(10 << 20))
    with pytest.raises(objects.ObjectError, match="beyond|oversized"):
        codec.open("chunks/ab/x", bomb, 1 << 20)


def test_garbage_never_opens():
    codec = objects.Codec(1, 1, 3, KEY)
    for blob in (b"", b"QWO\x01", b"QWO\x01\x01" + os.urandom(50), os.urandom(100),
                 b"QWO\x01\x00" + struct.pack(">I", 0x80000005) + b"\x02" + zlib.compress(b"x")):
        with pytest.raises(objects.ObjectError):
            codec.open("chunks/ab/x", blob, 1 << 20)
