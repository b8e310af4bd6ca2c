"""What a hostile storage or backup VM can do to the archive, and what dom0
does about it: nothing readable, nothing accepted that dom0 did not MAC."""
import os
import shutil
from pathlib import Path

import pytest

from images import KiB, MiB, chunk_files, make, overwrite, same, tree_digests

MARKER = b"TOP-SECRET-MARKER-4711"
VOLUME = "secret-volume-name"


def _all_bytes(root):
    return b"".join(p.read_bytes() for p in Path(root).rglob("*") if p.is_file())


def test_encrypted_archive_holds_no_plaintext(wyng, tmp_path):
    image = make(tmp_path / "img", 4 * MiB, [(0, MiB, "text"), (MiB, 64 * KiB, MARKER * 100),
                                             (2 * MiB, MiB, "random")])
    wyng.init()
    wyng.send(VOLUME, image, "--tag=mytagname")
    stored = _all_bytes(wyng.archive)
    data = image.read_bytes()
    assert MARKER not in stored
    assert VOLUME.encode() not in stored and b"mytagname" not in stored
    for offset in range(0, 4 * MiB, 97 * KiB):  # no 64-byte window of written data
        window = data[offset:offset + 64]
        if window.strip(b"\0"):
            assert window not in stored
    names = " ".join(str(p.relative_to(wyng.archive)) for p in wyng.archive.rglob("*"))
    assert VOLUME not in names


def test_unencrypted_archive_still_hides_nothing_it_promised(wyng, tmp_path):
    """--encrypt=off stores data readable (as documented); names stay keyed."""
    image = make(tmp_path / "img", MiB, [(0, 64 * KiB, MARKER * 10)])
    wyng.init("--encrypt=off", "--compression=off")
    wyng.send(VOLUME, image)
    assert MARKER in _all_bytes(wyng.archive)
    wyng.receive(VOLUME, tmp_path / "out")
    assert same(image, tmp_path / "out")


def test_wrong_passphrase_changes_nothing(wyng, tmp_path):
    image = make(tmp_path / "img", MiB, [(0, MiB, "random")])
    wyng.init()
    wyng.send("vol", image)
    before = tree_digests(wyng.archive)
    wyng.passphrase = "not the passphrase"  # and no cached key:
    for args in (["send", "--import-other-from=vol:|:%s" % image], ["list"],
                 ["receive", "vol", "--save-to=%s" % (tmp_path / "out")], ["verify", "vol"]):
        done = wyng.run("--authmin=0", *args, expect=3)
        assert done.stderr.strip() == "qvm-wyng: error: wrong passphrase (or the archive header was altered)"
    assert tree_digests(wyng.archive) == before
    assert not (tmp_path / "out").exists()


def _chunk_paths(archive):
    return {p for p in (archive / "chunks").rglob("*") if p.is_file()}


def _two_sessions(wyng, tmp_path, *init_args):
    """Two sessions; returns the old root, the old manifests and the one
    chunk that only the newest session has."""
    image = make(tmp_path / "img", 8 * 256 * KiB, [(0, 8 * 256 * KiB, "random")], seed=5)
    wyng.init(*init_args)
    wyng.send("vol", image)
    old_root = (wyng.archive / "archive").read_bytes()
    old_manifests = set(os.listdir(wyng.archive / "manifests"))
    old_chunks = _chunk_paths(wyng.archive)
    overwrite(image, 0, b"second session")
    wyng.send("vol", image)
    (new_chunk,) = _chunk_paths(wyng.archive) - old_chunks
    return old_root, old_manifests, new_chunk


def _refused(wyng, tmp_path, words):
    """verify and receive both fail naming the problem; no file is left."""
    out = tmp_path / "restored"
    for args in (["verify", "vol"], ["receive", "vol", "--save-to=%s" % out]):
        done = wyng.run(*args, expect=1)
        assert "Traceback" not in done.stderr
        assert any(w in done.stderr for w in words), done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".restored")]


@pytest.mark.parametrize("encrypt", ["xchacha20-poly1305", "off"])
def test_flipped_byte_in_chunk_is_refused(wyng, tmp_path, encrypt):
    _root, _m, victim = _two_sessions(wyng, tmp_path, "--encrypt=" + encrypt, "--compression=off")
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x40
    victim.write_bytes(bytes(data))
    _refused(wyng, tmp_path, ["fails authentication"])


@pytest.mark.parametrize("encrypt", ["xchacha20-poly1305", "off"])
def test_chunk_replaced_by_another_valid_chunk_is_refused(wyng, tmp_path, encrypt):
    _root, _m, victim = _two_sessions(wyng, tmp_path, "--encrypt=" + encrypt)
    other = sorted(_chunk_paths(wyng.archive) - {victim})[0]
    shutil.copyfile(other, victim)
    _refused(wyng, tmp_path, ["fails authentication"])


def test_missing_chunk_is_reported(wyng, tmp_path):
    _root, _m, victim = _two_sessions(wyng, tmp_path)
    victim.unlink()
    _refused(wyng, tmp_path, ["is missing"])


@pytest.mark.parametrize("encrypt", ["xchacha20-poly1305", "off"])
def test_manifest_replaced_by_an_older_one_is_refused(wyng, tmp_path, encrypt):
    _root, old, _c = _two_sessions(wyng, tmp_path, "--encrypt=" + encrypt)
    new = (set(os.listdir(wyng.archive / "manifests")) - old).pop()
    shutil.copyfile(wyng.archive / "manifests" / old.pop(), wyng.archive / "manifests" / new)
    wyng.run("--meta-dir=%s" % (tmp_path / "fresh-meta"), "verify", "vol", expect=1)
    _refused(wyng, tmp_path, ["fails authentication", "does not belong"])


def test_older_root_is_a_rollback(wyng, tmp_path):
    old_root, _m, _c = _two_sessions(wyng, tmp_path)
    (wyng.archive / "archive").write_bytes(old_root)
    _refused(wyng, tmp_path, ["rolled back"])
    # the user can accept it knowingly; then the older state is what counts
    wyng.run("verify", "vol", "--force-allow-rollback")
    assert len(wyng.sessions("vol")) == 1


def test_first_contact_says_what_it_trusts(wyng, tmp_path):
    """A dom0 with no record of the archive (a new install restoring after
    a disaster) cannot detect a rollback: it says so, with the root's number
    and the newest session, once; from then on it remembers the root."""
    _two_sessions(wyng, tmp_path)
    newest = wyng.sessions("vol")[-1]
    shutil.rmtree(wyng.meta)
    done = wyng.run("list")
    assert done.stderr == ("first contact: dom0 has no earlier root of this archive to check it against; "
                           "trusting root #3, newest session %s\n" % newest)
    assert "vol" in done.stdout
    assert wyng.run("list").stderr == ""
    assert wyng.run("list", "-q", "--meta-dir=%s" % (tmp_path / "other")).stderr == ""  # -q: errors only


def test_root_from_another_archive_is_refused(wyng, tmp_path):
    _two_sessions(wyng, tmp_path)
    other = type(wyng)(tmp_path / "other")
    (tmp_path / "other").mkdir()
    other.init()
    shutil.copyfile(other.archive / "archive", wyng.archive / "archive")
    _refused(wyng, tmp_path, ["fails authentication"])


# field offsets from doc/FORMAT.md: log2 N at 11, cipher 14, compression 15,
# level 16, chunk factor 17; the header MAC is the last 32 bytes
@pytest.mark.parametrize("offset,value", [(11, 17), (14, 0), (15, 2), (16, 9), (17, 6), (-5, 0)],
                         ids=["scrypt-n", "cipher-off", "compression", "level", "chunk-factor", "mac"])
@pytest.mark.parametrize("authmin", ["0", "1"], ids=["passphrase", "cached-key"])
def test_altered_header_is_refused(wyng, tmp_path, offset, value, authmin):
    """Settings in the header are authenticated whether the key comes from
    the passphrase or from the auth cache: a hostile VM cannot, say, turn
    encryption off for the next send."""
    _two_sessions(wyng, tmp_path)
    header = bytearray((wyng.archive / "header").read_bytes())
    header[offset] = value if header[offset] != value else value + 1
    (wyng.archive / "header").write_bytes(bytes(header))
    before = tree_digests(wyng.archive)
    done = wyng.run("--authmin=" + authmin, "send", "--import-other-from=vol:|:%s" % (tmp_path / "img"),
                    expect=3)
    assert "header was altered" in done.stderr, done.stderr
    assert tree_digests(wyng.archive) == before


def test_chunks_are_named_by_keyed_ids(wyng, tmp_path):
    """The same data in two archives gets different chunk names: names are
    HMACs under each archive's own key, not plain hashes of the data."""
    image = make(tmp_path / "img", MiB, [(0, MiB, "random")])
    wyng.init()
    wyng.send("vol", image)
    other = type(wyng)(tmp_path / "o")
    (tmp_path / "o").mkdir()
    other.init()
    other.send("vol", image)
    assert not set(chunk_files(wyng.archive)) & set(chunk_files(other.archive))


# -- pruning: the root is the authority for which manifest holds a session -----

def _pruned_three(wyng, tmp_path, *init_args):
    """Three sessions, the middle one pruned; returns the root and the
    manifests from before the prune."""
    image = make(tmp_path / "img", 8 * 256 * KiB, [(0, 8 * 256 * KiB, "random")], seed=6)
    wyng.init(*init_args)
    for n in range(3):
        overwrite(image, n * 256 * KiB, b"session %d" % n)
        wyng.send("vol", image)
    old_root = (wyng.archive / "archive").read_bytes()
    old = {p.name: p.read_bytes() for p in (wyng.archive / "manifests").iterdir()}
    first, middle, last = wyng.sessions("vol")
    wyng.run("prune", "vol", "--session=" + middle)
    assert wyng.sessions("vol") == [first, last]
    return old_root, old


@pytest.mark.parametrize("encrypt", ["xchacha20-poly1305", "off"])
def test_unmerged_manifest_put_back_after_a_prune_is_refused(wyng, tmp_path, encrypt):
    """The storage keeps the newest session's manifest from before the prune
    and serves it under the merged one's name: its parent link and MAC no
    longer match what the root says."""
    _root, old = _pruned_three(wyng, tmp_path, "--encrypt=" + encrypt)
    merged = (set(os.listdir(wyng.archive / "manifests")) - set(old)).pop()
    for content in old.values():
        (wyng.archive / "manifests" / merged).write_bytes(content)
        _refused(wyng, tmp_path, ["fails authentication", "does not belong"])


def test_root_from_before_a_prune_is_a_rollback(wyng, tmp_path):
    old_root, _old = _pruned_three(wyng, tmp_path)
    (wyng.archive / "archive").write_bytes(old_root)
    _refused(wyng, tmp_path, ["rolled back"])


def test_manifest_of_one_session_served_for_another_is_refused(wyng, tmp_path):
    _pruned_three(wyng, tmp_path, "--encrypt=off")
    first, last = sorted((wyng.archive / "manifests").iterdir(), key=os.path.getmtime)
    last.write_bytes(first.read_bytes())
    _refused(wyng, tmp_path, ["fails authentication", "does not belong"])
    done = wyng.run("arch-check", expect=1)
    assert "vol %s: manifest of" % wyng.sessions("vol")[-1] in done.stdout
