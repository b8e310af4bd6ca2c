"""The storage conformance suite: the contracts of ``Store``
(backupvm/wyngagent/storage/__init__.py), checked the same way against
every backend, each the real thing: a local directory (on disk, and on a
tmpfs, which before Linux 6.6 refuses the O_DIRECT reads a disk gets), ssh to sshd on
loopback (root with a shell, and an SFTP-only chrooted account), S3 on
moto_server, and a local directory on an s3fs mount of it."""
import os
import threading
import uuid

import pytest

from wyngagent.storage import Store, StoreError, open_store

BACKENDS = ["local", "local-tmpfs", "ssh", "sftp-only", "s3", "s3fs"]


@pytest.fixture(params=BACKENDS)
def store(request, tmp_path):
    kind = request.param
    if kind == "local":
        url = "file:%s/store" % tmp_path
    elif kind == "local-tmpfs":  # before Linux 6.6, no O_DIRECT there: plain reads
        url = "file:%s/store" % request.getfixturevalue("tmpfs")("64M")
    elif kind == "ssh":
        request.getfixturevalue("sshd")
        url = "ssh://wyng-test%s/store" % tmp_path
    elif kind == "sftp-only":
        request.getfixturevalue("sshd")
        url = "ssh://wyng-sftp/data/%s" % uuid.uuid4().hex
    elif kind == "s3":
        url = "s3://%s/some/prefix" % request.getfixturevalue("s3_server").bucket()
    else:
        url = "file:%s/store" % request.getfixturevalue("s3fs_mount")[1]
    store = open_store(url)
    store.make_root()
    yield store
    store.close()


def stored(store):
    """{name: bytes} of every object, leftovers included."""
    return {name: store.read(name) for name in store.list("")}


def test_capabilities_are_declared(store, request):
    assert isinstance(store, Store)
    assert store.atomic_replace
    # s3fs: an exclusive create holds within one mount, not across hosts
    assert store.conditional_create == ("s3fs" not in request.node.name)
    assert store.connections >= 1 and isinstance(store.needs_sync, bool)
    assert store.location and "testing" not in store.location
    free = store.free_bytes()
    assert free is None or free > 0


def test_write_read_replace_and_delete(store):
    store.write("header", b"one")
    store.write("chunks/ab/ab01", [b"two ", memoryview(b"parts")])
    store.write("manifests/m", (bytes([i]) * 1000 for i in range(200)), durable=True)
    assert store.read("header") == b"one"
    assert store.read("chunks/ab/ab01") == b"two parts"
    assert store.read("manifests/m") == b"".join(bytes([i]) * 1000 for i in range(200))
    store.write("header", b"replaced, and longer than before")
    assert store.read("header") == b"replaced, and longer than before"
    store.write("header", b"")
    assert store.read("header") == b"" and store.size("header") == 0
    store.delete("chunks/ab/ab01")
    store.delete("chunks/ab/ab01")  # absent is fine
    assert sorted(stored(store)) == ["header", "manifests/m"]


def test_missing_objects(store):
    with pytest.raises(FileNotFoundError):
        store.read("nothing")
    with pytest.raises(FileNotFoundError):
        store.open("chunks/00/nothing")
    assert store.size("nothing") is None
    assert list(store.list("chunks")) == [] and list(store.list("nothing/here")) == []


def test_sizes_answer_a_batch_in_order(store):
    names = ["chunks/%02x/%064x" % (i % 3, i) for i in range(100)]
    for i, name in enumerate(names[::2]):
        store.write(name, b"x" * i)
    assert store.sizes(names) == [i // 2 if i % 2 == 0 else None for i in range(100)]


def test_list_streams_names_below_a_folder(store):
    for name in ("header", "archive", "chunks/00/a", "chunks/00/b", "chunks/ff/c", "manifests/m"):
        store.write(name, b"1")
    assert sorted(store.list("")) == ["archive", "chunks/00/a", "chunks/00/b", "chunks/ff/c", "header", "manifests/m"]
    assert sorted(store.list("", recursive=False)) == ["archive", "header"]
    assert sorted(store.list("chunks")) == ["chunks/00/a", "chunks/00/b", "chunks/ff/c"]
    assert sorted(store.list("chunks/00")) == ["chunks/00/a", "chunks/00/b"]


def test_a_failed_write_leaves_the_old_object(store):
    store.write("archive", b"old root")

    def failing():
        yield b"new root, half"
        raise ValueError("the sender went away")
    for name in ("archive", "manifests/new"):
        with pytest.raises(ValueError):
            store.write(name, failing())
    assert store.read("archive") == b"old root"
    assert store.size("manifests/new") is None
    assert all(name == "archive" or ".tmp-" in name for name in store.list(""))


def test_create_exclusive_has_one_winner(store):
    assert store.create_exclusive("lock", b"first")
    assert not store.create_exclusive("lock", b"second")
    assert store.read("lock") == b"first"
    store.delete("lock")
    wins = []

    def take(i):
        if store.create_exclusive("lock", b"writer %d" % i):
            wins.append(i)
    threads = [threading.Thread(target=take, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and store.read("lock") == b"writer %d" % wins[0]


def test_open_reads_exactly_what_is_asked(store):
    data = os.urandom(3 << 20) + b"end"
    store.write("manifests/big", [data[:1 << 20], data[1 << 20:]])
    with store.open("manifests/big") as reader:
        parts = [reader.read(n) for n in (5, 1 << 20, 77777, 3 << 20)]
        assert reader.read(10) == b""
    assert b"".join(parts) == data and [len(p) for p in parts[:3]] == [5, 1 << 20, 77777]


def test_a_large_stream_arrives_whole(store):
    """Beyond 16 MiB an S3 write becomes a multipart upload."""
    part = os.urandom(1 << 20)
    store.write("manifests/large", (part for _ in range(17)))
    assert store.size("manifests/large") == 17 << 20
    assert store.read("manifests/large") == part * 17


def test_many_threads_at_once(store):
    """The archive keeps ``connections`` calls going from its threads."""
    blobs = {"chunks/%02x/%d" % (i % 7, i): os.urandom(1000 + 977 * i) for i in range(64)}
    errors = []

    def work(names):
        try:
            for name in names:
                store.write(name, blobs[name])
                assert store.read(name) == blobs[name]
                assert store.sizes([name, name + "x"]) == [len(blobs[name]), None]
        except Exception as e:  # reported below
            errors.append(e)
    names = sorted(blobs)
    threads = [threading.Thread(target=work, args=(names[i::16],)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert stored(store) == blobs


def test_make_root_is_idempotent(store):
    store.write("header", b"h")
    store.make_root()
    assert store.read("header") == b"h"


def test_unknown_scheme_and_bad_urls():
    for url, words in (("ftp://x/y", "unknown storage type 'ftp'"), ("ssh://host", "ssh://[user@]host[:port]"),
                       ("ssh://-oProxyCommand=x/y", "ssh://[user@]host"), ("ssh://h:port/x", "ssh://[user@]host"),
                       ("file:relative", "absolute path"), ("s3:///prefix", "s3://[profile@]bucket")):
        with pytest.raises(StoreError, match=words.replace("[", r"\[").replace("]", r"\]")):
            open_store(url)


def takes_direct(folder):
    """Whether the filesystem opens files with O_DIRECT (tmpfs does only
    from Linux 6.6; before, the local store falls back to plain reads)."""
    (folder / "probe").write_bytes(b"x")
    try:
        os.close(os.open(folder / "probe", os.O_RDONLY | os.O_DIRECT))
        return True
    except OSError:
        return False
    finally:
        (folder / "probe").unlink()


def test_a_local_store_reads_around_the_page_cache_where_the_filesystem_allows(tmp_path, tmpfs):
    from wyngagent.storage.local import LocalStore
    for root in (tmp_path, tmpfs("8M")):
        store = LocalStore("%s/store" % root)
        store.make_root()
        for size in (0, 1, 4096, 5000, 300000):
            store.write("chunks/ab/x%d" % size, os.urandom(size))
            assert store.read("chunks/ab/x%d" % size) == (root / ("store/chunks/ab/x%d" % size)).read_bytes()
        assert store.direct is takes_direct(root)
        store.close()
