"""The passphrase KDF: arch-init calibrates scrypt to about a second here
(memory within SCRYPT_MAX_MEM), archives with other parameters keep
working, and a header whose parameters OpenSSL refuses is a clean error.
The other tests make cheap archives (QVM_WYNG_TEST_KDF, set in conftest)."""
import time

from conftest import Wyng
from images import MiB, make, same


def _kdf(wyng):
    from qubeswyng.formats import Header
    return Header.parse((wyng.archive / "header").read_bytes()).kdf


def test_arch_init_calibrates_scrypt_to_about_a_second(tmp_path):
    from qubeswyng import keys
    wyng = Wyng(tmp_path)
    start = time.monotonic()
    wyng.run("arch-init", env={"QVM_WYNG_TEST_KDF": ""})  # the default: calibrated
    spent = time.monotonic() - start
    log_n, r, p = _kdf(wyng)
    assert 16 <= log_n <= 18 and r == 8 and 1 <= p <= 8, (log_n, r, p)
    assert 128 * r << log_n <= keys.SCRYPT_MAX_MEM
    start = time.monotonic()
    keys.derive_kek(b"x", bytes(32), log_n, r, p)
    # about a second (a busy machine calibrates to fewer rounds, and may be quieter now)
    assert 0.25 < time.monotonic() - start < 10
    assert spent < 30


def test_cheap_parameters_only_through_the_test_variable(wyng):
    wyng.init()
    assert _kdf(wyng) == (10, 8, 1)


def test_an_archive_with_other_parameters_keeps_working(tmp_path):
    """An archive made before calibration (N=2^16, r=8, p=1) opens, with the
    passphrase and then from the auth cache."""
    wyng = Wyng(tmp_path)
    wyng.run("arch-init", env={"QVM_WYNG_TEST_KDF": "16,8,1"})
    assert _kdf(wyng) == (16, 8, 1)
    image = make(tmp_path / "img", MiB, [(0, MiB, "random")])
    wyng.send("vol", image, "--authmin=0")
    wyng.run("list")  # caches the key
    wyng.receive("vol", tmp_path / "out", "--passcmd=exit 3")
    assert same(tmp_path / "out", image)


def test_scrypt_parameters_openssl_refuses_are_a_one_line_error(wyng):
    """log2 N = 17 with r = 1 is inside our bounds, but OpenSSL wants
    N < 2^(16 r): this was a ValueError traceback before any MAC."""
    wyng.init()
    header = bytearray((wyng.archive / "header").read_bytes())
    header[11:13] = bytes([17, 1])  # log2 N, r (doc/FORMAT.md)
    (wyng.archive / "header").write_bytes(bytes(header))
    done = wyng.run("--authmin=0", "list", expect=1)
    assert done.stderr == "qvm-wyng: error: archive header asks for scrypt parameters outside safe bounds\n"


def test_arch_passphrase_calibrates_and_an_older_header_put_back_is_refused(wyng, tmp_path):
    """arch-passphrase writes the KDF cost arch-init would (PUT_HEADER: the
    header's one shape, so the header fuzz target covers it).  Storage that
    puts the older header back makes the new passphrase fail in one line
    (exit 3); a cached key still opens the archive, its settings the same."""
    wyng.init()
    image = make(tmp_path / "img", MiB, seed=3)
    wyng.send("vol", image)
    older = (wyng.archive / "header").read_bytes()
    wyng.run("arch-passphrase", input="the new passphrase\n", env={"QVM_WYNG_TEST_KDF": "11,8,2"})
    assert _kdf(wyng) == (11, 8, 2)
    wyng.passphrase = "the new passphrase"
    wyng.run("--authmin=5", "list")
    (wyng.archive / "header").write_bytes(older)
    done = wyng.run("--authmin=0", "list", expect=3)
    assert done.stderr == "qvm-wyng: error: wrong passphrase (or the archive header was altered)\n"
    wyng.run("--authmin=5", "receive", "vol", "--save-to=%s" % (tmp_path / "out"))
    assert same(tmp_path / "out", image)
