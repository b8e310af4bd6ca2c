"""Passphrase -> keys (DESIGN §2), with the standard library only.

A random 32-byte ``master`` key is made at arch-init and kept in the archive
header wrapped under a key-encryption key derived from the passphrase with
scrypt.  From ``master`` HKDF derives K_id (chunk ids) and K_mac (manifest
and root MACs), which never leave dom0, and K_enc, which the agent gets to
encrypt what it stores.  Changing the passphrase re-wraps ``master`` only.
"""
import contextlib
import hashlib
import hmac
import os
import struct
import subprocess
import sys
import time

from .clock import now
from .errors import AuthFail, Fail
from .meta import write_atomic

SCRYPT_MAX_MEM = 256 << 20  # a hostile header must not make dom0 allocate more
KDF_SECONDS = 1.0


def derive_kek(passphrase, salt, log_n, r, p):
    with contextlib.suppress(ValueError):  # OpenSSL refuses some combinations (N >= 2^(16r))
        if 10 <= log_n <= 20 and 1 <= r <= 32 and 1 <= p <= 16 and 128 * r << log_n <= SCRYPT_MAX_MEM \
                and p * r <= 64:
            return hashlib.scrypt(passphrase, salt=salt, n=1 << log_n, r=r, p=p,
                                  maxmem=SCRYPT_MAX_MEM + (1 << 20), dklen=64)
    raise Fail("archive header asks for scrypt parameters outside safe bounds")


def kdf_params():
    """scrypt (log2 N, r, p) for a new archive: N doubles while one pass
    takes under half of KDF_SECONDS (and memory stays within the bound),
    then p makes up the rest.  ``QVM_WYNG_TEST_KDF=log_n,r,p`` (tests only)
    skips the calibration."""
    fixed = os.environ.get("QVM_WYNG_TEST_KDF")
    if fixed:
        return tuple(map(int, fixed.split(",")))
    for log_n in range(16, 19):  # 64 MiB (the old fixed cost) to SCRYPT_MAX_MEM (2^18 with r = 8)
        start = time.perf_counter()
        derive_kek(b"", bytes(32), log_n, 8, 1)
        spent = time.perf_counter() - start
        if spent >= KDF_SECONDS / 2 or 1024 << log_n >= SCRYPT_MAX_MEM:
            return log_n, 8, max(1, min(8, round(KDF_SECONDS / spent)))


def wrap(kek, master, bound):
    """Encrypt-then-MAC of the 32-byte master key; ``bound`` is the header
    text the tag also covers.  Returns nonce | ciphertext | tag."""
    nonce = os.urandom(16)
    ct = _xor(master, hmac.digest(kek[:32], b"wrap" + nonce, "sha256"))
    return nonce + ct + hmac.digest(kek[32:], bound + nonce + ct, "sha256")


def unwrap(kek, wrapped, bound):
    nonce, ct, tag = wrapped[:16], wrapped[16:48], wrapped[48:80]
    if not hmac.compare_digest(tag, hmac.digest(kek[32:], bound + nonce + ct, "sha256")):
        raise AuthFail("wrong passphrase (or the archive header was altered)")
    return _xor(ct, hmac.digest(kek[:32], b"wrap" + nonce, "sha256"))


WRAPPED_SIZE = 80


def _xor(a, b):
    return bytes(x ^ y for x, y in zip(a, b))


def hkdf(master, salt, info):
    """RFC 5869 HKDF-SHA256 with a 32-byte output."""
    prk = hmac.digest(salt, master, "sha256")
    return hmac.digest(prk, info + b"\x01", "sha256")


class Keys:
    def __init__(self, master, archive_id):
        self.id, self.mac, self.enc = (hkdf(master, archive_id, b"qubes-wyng " + info)
                                       for info in (b"chunk id", b"mac", b"storage encryption"))

    def chunk_id(self, data):
        return hmac.digest(self.id, data, "sha256")

    def sign(self, label, data):
        return hmac.digest(self.mac, label + data, "sha256")

    def check(self, label, data, mac):
        return hmac.compare_digest(self.sign(label, data), mac)


# -- getting the passphrase ---------------------------------------------------

def read_passphrase(opts, confirm=False, new=False):
    """The passphrase from --passcmd, a terminal or a line of stdin; a
    ``new`` one (arch-passphrase) from a terminal or stdin only."""
    if opts.passcmd and not new:
        done = subprocess.run(opts.passcmd, shell=True, stdout=subprocess.PIPE)
        if done.returncode != 0:
            raise AuthFail("--passcmd exited with status %d" % done.returncode)
        secret = done.stdout.rstrip(b"\r\n")
    elif sys.stdin.isatty():
        if opts.unattended:
            raise AuthFail("a passphrase is needed; give --passcmd for unattended use")
        import getpass
        secret = getpass.getpass("New passphrase: " if new else "Passphrase: ").encode()
        if confirm and getpass.getpass("Again: ").encode() != secret:
            raise Fail("the passphrases do not match")
    else:
        secret = sys.stdin.buffer.readline(4096).rstrip(b"\r\n")
    if not secret:
        raise AuthFail("empty passphrase")
    return secret


# -- the auth cache: the master key kept in tmpfs for --authmin minutes ---------

AUTH_DIR = "/run/qubes-wyng/auth"
CACHE = struct.Struct(">d32s")


def auth_dir():
    """AUTH_DIR; tests keep their keys apart with QVM_WYNG_TEST_AUTH_DIR."""
    return os.environ.get("QVM_WYNG_TEST_AUTH_DIR") or AUTH_DIR


def cached_master(archive_id, authmin):
    """The cached key if ``authmin`` > 0; -1 deletes it."""
    path = os.path.join(auth_dir(), archive_id.hex())
    if authmin < 0 and os.path.exists(path):
        os.unlink(path)
    return _read_cache(path) if authmin > 0 else None


def _read_cache(path):
    """The master key cached at ``path``; None if there is none or its time
    is up, and then it is deleted: an expired key does not wait in memory
    for the next reboot."""
    try:
        with open(path, "rb") as f:
            expires, master = CACHE.unpack(f.read(CACHE.size))
    except (OSError, struct.error):
        return None
    if now() < expires:
        return master
    with contextlib.suppress(OSError):
        os.unlink(path)
    return None


def store_master(archive_id, master, authmin):
    """Cache the key for ``authmin`` minutes, and delete the expired keys of
    every archive, also of those not opened again."""
    if authmin > 0:
        write_atomic(os.path.join(auth_dir(), archive_id.hex()), CACHE.pack(now() + authmin * 60, master))
    for name in os.listdir(auth_dir()):
        if not name.endswith(".new"):  # another command's key being written
            _read_cache(os.path.join(auth_dir(), name))
