"""The fuzz targets (tests/fuzz_targets.py) in CI: a short, seeded atheris
pass of each, and the inputs fuzzing found that once crashed a parser, kept
as regression tests.  The long runs are bench/fuzz.py's."""
import importlib.util
import json
import subprocess
import sys

import pytest

from conftest import REPO, need

import fuzz_targets

RUNS = 20000  # a few seconds a target here; bench/fuzz.py --runs 1000000 for the figures


@pytest.mark.parametrize("target", list(fuzz_targets.TARGETS))
def test_short_seeded_fuzzing_finds_no_crash(target, tmp_path):
    need(importlib.util.find_spec("atheris"), "atheris (ci/requirements-test.txt)")
    done = subprocess.run([sys.executable, str(REPO / "bench" / "fuzz.py"), "--targets", target, "--runs", str(RUNS),
                           "--seconds", "30", "--seed", "11", "--no-coverage", "--work", str(tmp_path),
                           "--json", str(tmp_path / "result.json")], capture_output=True, text=True, timeout=300)
    (result,) = json.loads((tmp_path / "result.json").read_text())
    assert done.returncode == 0 and not result["crashes"], done.stdout + done.stderr + "".join(
        p.read_text() for p in tmp_path.glob("*/crashes/*/traceback.txt"))
    assert result["inputs"] >= min(RUNS, 1000), done.stdout


def _run(target, data):
    t = fuzz_targets.TARGETS[target]()
    t.setup()
    try:
        t.run(data)
    except t.allowed:
        pass


# -- what fuzzing found (each crashed before its fix) -------------------------------------------

def test_header_with_scrypt_parameters_openssl_refuses_is_a_one_line_error():
    """N >= 2^(16 r) is within our bounds but OpenSSL refuses it: a hostile
    header made dom0 print a ValueError traceback before any MAC."""
    from qubeswyng import keys
    from qubeswyng.errors import Fail
    with pytest.raises(Fail, match="outside safe bounds"):
        keys.derive_kek(b"x", bytes(32), 17, 1, 1)


@pytest.mark.parametrize("volumes", [[["private"]], [{"a": 1}], ["private", ["x"]]])
def test_settings_record_with_unhashable_volume_names_is_refused(volumes):
    from qubeswyng import settings
    from qubeswyng.errors import Fail
    record = dict(fuzz_targets._record(), volumes=volumes)
    with pytest.raises(Fail, match="volumes"):
        settings.parse(json.dumps(record).encode(), "work")


@pytest.mark.parametrize("field", ["notes", "label"])
def test_settings_record_with_a_lone_surrogate_is_refused(field):
    """"\\ud800" is valid JSON but no UTF-8 string: such a record passed the
    schema and then broke whatever encoded it (qubesadmin's calls)."""
    from qubeswyng import settings
    from qubeswyng.errors import Fail
    data = json.dumps(dict(fuzz_targets._record(), **{field: "a\ud800"})).encode()
    with pytest.raises(Fail, match="not UTF-8 JSON"):
        settings.parse(data, "work")


@pytest.mark.parametrize("body", [b'{"seq":1}', b"[" * 100000, b'"x"', b'{"seq":1,"time":0,"volumes":[1]}',
                                  b'{"seq":-1,"time":0,"volumes":[]}', b"\xff",
                                  b'{"seq":1,"time":1e999,"volumes":[]}'])
def test_root_behind_its_mac_that_is_not_a_root_is_a_one_line_error(body):
    """Only dom0 can sign a root, but one signed in error (or with a key used
    elsewhere) must not become a traceback in every command."""
    from qubeswyng import formats, keys
    from qubeswyng.errors import Fail
    k = keys.Keys(fuzz_targets.MASTER, fuzz_targets.ARCHIVE_ID)
    with pytest.raises(Fail, match="malformed"):
        formats.open_root(k, body + k.sign(formats.ROOT_LABEL, body), fuzz_targets.ARCHIVE_ID)


@pytest.mark.parametrize("lock", [b"[1, 2]", b"7", b'"x"', b'{"expires": 1e300, "owner": "o"}',
                                  b'{"expires": NaN}', b'{"expires": Infinity}', b"[" * 100000,
                                  b'{"expires": 9e9, "host": "%s", "pid": 99999999999999999999}'
                                  % fuzz_targets.HOST.encode()])
@pytest.mark.parametrize("force", [0, 1])
def test_planted_lock_file_is_read_defensively_by_the_agent(lock, force):
    """A lock file is storage's JSON: fuzzing found that any of these crashed
    the agent with a traceback (AttributeError, OverflowError, ValueError);
    the lease that replaced the lock code reads them defensively too."""
    _run("lock-file", bytes([force | 4 << 3]) + lock)


# -- structured inputs (hypothesis): JSON of every shape in every field ----------------------------

def _json():
    from hypothesis import strategies as st
    scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | \
        st.sampled_from(["work", "fedora-40", "AppVM", "private", "settings", "a" * 40, "00" * 16])
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.text(max_size=10), inner, max_size=4), max_leaves=12)


def test_settings_records_of_any_shape_are_checked_or_refused():
    from hypothesis import given, settings as hsettings, strategies as st

    from qubeswyng import settings
    from qubeswyng.errors import Fail
    base = fuzz_targets._record()

    @hsettings(max_examples=200, derandomize=True, deadline=None)
    @given(st.dictionaries(st.sampled_from(sorted(base) + ["extra"]), _json(), max_size=4),
           st.sampled_from(["properties", "features", None]), st.text(max_size=12), _json())
    def check(fields, inner, key, value):
        record = dict(base, **fields)
        if inner and isinstance(record.get(inner), dict):
            record[inner] = dict(record[inner], **{key: value})
        try:
            rec = settings.parse(json.dumps(record).encode(), "work")
        except Fail:
            return
        assert settings.check(json.loads(settings.encode(rec)), "work") == rec
    check()


def test_roots_of_any_shape_behind_the_mac_are_usable_or_refused():
    from hypothesis import given, settings as hsettings, strategies as st

    from qubeswyng.errors import Fail
    target = fuzz_targets.Root()
    target.setup()
    base = fuzz_targets._root_json()

    @hsettings(max_examples=200, derandomize=True, deadline=None)
    @given(st.sampled_from(["root", "volume", "session"]), st.sampled_from(
        ["seq", "time", "volumes", "id", "name", "sessions", "size", "changed", "manifest", "mac", "tags"]), _json())
    def check(where, field, value):
        root = json.loads(json.dumps(base))
        place = {"root": root, "volume": root["volumes"][0], "session": root["volumes"][0]["sessions"][0]}[where]
        place[field] = value
        try:
            target.run(b"\1" + json.dumps(root).encode())
        except Fail:
            pass
    check()
