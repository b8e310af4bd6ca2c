"""/etc/wyng/wyng.ini: every documented form, precedence against the command
line, and a one-line error naming the key for everything else."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from qubeswyng import cli, config
from qubeswyng.errors import Fail

EXAMPLE = REPO / "etc" / "wyng" / "wyng.ini"


@pytest.fixture
def ini(tmp_path):
    """Write an ini file; returns its path."""
    def write(text, name="wyng.ini"):
        path = tmp_path / name
        path.write_text(text)
        return path
    return write


def parse(path, *args):
    return cli.parse(["--config=%s" % path] + list(args or ["version"]))


def error(path, *args):
    with pytest.raises(Fail) as e:
        parse(path, *args)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_values_of_every_kind_are_read(ini):
    path = ini("[var-global-default]\n"
               "dest = file:/srv/backup\n"
               "chunk-factor = 4\n"
               "authmin = 10\n"
               "session-strict = off\n"
               "send-unchanged = 1\n"
               "verbose = 2\n"
               "keep = ^monthly\n"
               "    20260101-000000\n"
               "volex = a\n"
               "\tb/c.img\n")
    opts = parse(path)
    assert opts.dest == "file:/srv/backup"
    assert opts.chunk_factor == 4 and opts.authmin == 10
    assert opts.session_strict == "off"
    assert opts.send_unchanged is True
    assert opts.verbose == 2
    assert opts.keep == ["^monthly", "20260101-000000"]
    assert opts.volex == ["a", "b/c.img"]


def test_flags_take_1_and_0(ini):
    assert parse(ini("[var-global-default]\njson = 1\nquiet = 0\n")).json is True
    assert parse(ini("[var-global-default]\njson = 0\n")).json is False
    assert parse(ini("[var-global-default]\nsend-unchanged = 1\n")).send_unchanged is True


def test_underscores_stand_for_dashes_and_case_does_not_matter(ini):
    opts = parse(ini("[var-global-default]\nchunk_factor = 2\nMeta_Dir = /x\n"))
    assert opts.chunk_factor == 2 and opts.meta_dir == "/x"


def test_comments_blank_lines_and_hashes_inside_values(ini):
    path = ini("# a comment\n; another\n\n[var-global-default]\n"
               "# dest = file:/commented\n"
               "passcmd = cat /root/pass#1\n"
               "volex = a\n"
               "    # a comment between continuation lines\n"
               "    b\n")
    opts = parse(path)
    assert opts.dest is None
    assert opts.passcmd == "cat /root/pass#1"
    assert opts.volex == ["a", "b"]


def test_blank_lines_inside_a_list_are_skipped(ini):
    assert parse(ini("[var-global-default]\nvolex = a\n\n    b\njson = 1\n")).volex == ["a", "b"]


def test_colon_separates_key_and_value_too(ini):
    assert parse(ini("[var-global-default]\ndest: file:/a\n")).dest == "file:/a"


def test_empty_file_and_file_without_section_change_nothing(ini):
    default = cli.parse(["version"])
    for text in ("", "# only comments\n"):
        assert vars(parse(ini(text))) == dict(vars(default), config=str(ini(text)))


def test_builtin_defaults_stay_for_options_not_in_the_file(ini):
    opts = parse(ini("[var-global-default]\ndest = file:/a\n"))
    assert opts.authmin == 2 and opts.compression == "zstd:3" and opts.tag == []


def test_command_line_overrides_the_file(ini):
    path = ini("[var-global-default]\ndest = file:/ini\nauthmin = 10\njson = 1\n"
               "verbose = 2\nchunk-factor = 5\n")
    opts = parse(path, "list", "--dest=file:/cli", "--authmin=3", "-v", "--chunk-factor", "1")
    assert opts.dest == "file:/cli" and opts.authmin == 3 and opts.chunk_factor == 1
    assert opts.verbose == 1, "-v on the command line replaces the ini count"
    assert opts.json is True, "what the command line does not give comes from the file"


def test_options_before_and_after_the_command_override(ini):
    path = ini("[var-global-default]\ndest = file:/ini\n")
    assert parse(path, "--dest=file:/before", "list").dest == "file:/before"
    assert parse(path, "list", "--dest=file:/after").dest == "file:/after"


def test_repeatable_option_on_the_command_line_replaces_the_list(ini):
    path = ini("[var-global-default]\nvolex = a\n    b\n")
    assert parse(path, "send").volex == ["a", "b"]
    assert parse(path, "send", "--volex=c", "--volex=d").volex == ["c", "d"]


def test_flag_set_in_file_stays_set(ini):
    # a flag has no "off" on the command line: 0 in the file is the way back
    assert parse(ini("[var-global-default]\nsend-unchanged = 1\n"), "send").send_unchanged is True


def test_unknown_key_is_an_error_naming_it(ini):
    message = error(ini("[var-global-default]\ndest = file:/a\nbogus-option = misc\n"))
    assert "bogus-option" in message and "unknown option" in message


@pytest.mark.parametrize("key", config.IGNORED + config.WYNG_ONLY)
def test_keys_wyng_ignores_or_that_mean_nothing_here_are_noted_not_applied(ini, key):
    path = ini("[var-global-default]\n%s = 1\n" % key)
    assert config.read(str(path), cli.OPTIONS)[0] == {}
    notes = config.read(str(path), cli.OPTIONS)[1]
    assert len(notes) == 1 and notes[0].startswith("%s: %s: " % (path, key))
    assert ("give it on the command line" if key in config.IGNORED else "no meaning here") in notes[0]
    assert vars(parse(path)) == dict(vars(cli.parse(["version"])), config=str(path))


def test_wyngs_own_example_file_works(tmp_path):
    """The example of Wyng's documentation (tests/wyng_example.ini, in our
    words): every key applies as in Wyng, dedup is noted."""
    example = REPO / "tests" / "wyng_example.ini"
    done = subprocess.run([sys.executable, "-m", "qubeswyng.cli", "--config=%s" % example, "version"],
                          capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == "%s: dedup: a Wyng option that has no meaning here, ignored\n" \
        % example
    opts = parse(example, "send")
    assert (opts.authmin, opts.autoprune, opts.dest, opts.local) == (
        10, "full", "ssh://user@192.168.0.8/home/user/wyng.backup", "/mnt/btrfs01/vms")
    assert opts.volex == ["misc/caches.img", "misc/deprecated_apps.img", "windows10_recovery.vmdk"]


def test_all_in_the_file_does_not_widen_a_command_to_every_volume(wyng, ini, tmp_path):
    wyng.init()
    for name in ("a", "b"):
        (tmp_path / name).write_bytes(name.encode() * 1000)
        wyng.at(1e9, "send", "--import-other-from=%s:|:%s" % (name, tmp_path / name))
        (tmp_path / name).write_bytes(name.encode() * 2000)
        wyng.at(1e9 + 60, "send", "--import-other-from=%s:|:%s" % (name, tmp_path / name))
    path = ini("[var-global-default]\nall = 1\nsession = 19700101-000000\n")
    done = wyng.run("--config=%s" % path, "prune", "a", "--session=20010909-014640")
    assert "all: ignored in the file" in done.stderr and "session: ignored" in done.stderr
    assert len(wyng.sessions("a")) == 1 and len(wyng.sessions("b")) == 2


@pytest.mark.parametrize("line, key", [
    ("send-unchanged = yes", "send-unchanged"),
    ("json = 2", "json"),
    ("json =", "json"),
    ("chunk-factor = big", "chunk-factor"),
    ("authmin = 1.5", "authmin"),
    ("session-strict = maybe", "session-strict"),
    ("verbose = -1", "verbose"),
    ("dest =", "dest"),
    ("dest = file:/a\n    file:/b", "dest"),
])
def test_bad_values_are_errors_naming_the_key(ini, line, key):
    path = ini("[var-global-default]\n%s\n" % line)
    assert error(path).startswith("%s: %s: " % (path, key))


def test_range_checks_apply_to_values_from_the_file(ini):
    with pytest.raises(Fail, match="authmin"):
        parse(ini("[var-global-default]\nauthmin = 99\n"))


def test_key_set_twice_is_an_error(ini):
    message = error(ini("[var-global-default]\ndest = file:/a\ndest = file:/b\n"))
    assert "dest" in message and "twice" in message
    message = error(ini("[var-global-default]\nchunk-factor = 1\nchunk_factor = 2\n"))
    assert "chunk-factor" in message and "twice" in message


def test_other_sections_are_errors(ini):
    assert "[options]" in error(ini("[options]\ndest = file:/a\n"))
    assert "[DEFAULT]" in error(ini("[DEFAULT]\ndest = file:/a\n"))


def test_settings_before_the_section_and_lines_without_a_value_are_errors(ini):
    assert "line 1" in error(ini("dest = file:/a\n[var-global-default]\n"))
    message = error(ini("[var-global-default]\ndest = file:/a\nsend-unchanged\n"))
    assert "line 3" in message and "send-unchanged" in message


def test_errors_name_the_file(ini):
    path = ini("[var-global-default]\nbogus = 1\n", name="mine.ini")
    assert error(path).startswith("%s: bogus: " % path)


def test_explicit_config_must_exist(tmp_path):
    with pytest.raises(FileNotFoundError):
        parse(tmp_path / "missing.ini")


def test_missing_default_file_is_fine(tmp_path, monkeypatch):
    monkeypatch.setenv(config.ENV, str(tmp_path / "missing.ini"))
    assert cli.parse(["version"]).dest is None


def test_default_file_comes_from_the_environment_hook(ini, monkeypatch):
    monkeypatch.setenv(config.ENV, str(ini("[var-global-default]\ndest = file:/env\n")))
    assert cli.parse(["list"]).dest == "file:/env"
    other = ini("[var-global-default]\ndest = file:/explicit\n", name="other.ini")
    assert cli.parse(["list", "--config", str(other)]).dest == "file:/explicit"


def test_without_the_hook_the_default_is_etc_wyng(ini, monkeypatch):
    monkeypatch.delenv(config.ENV)
    assert config.DEFAULT_PATH == "/etc/wyng/wyng.ini"
    monkeypatch.setattr(config, "DEFAULT_PATH", str(ini("[var-global-default]\ndest = file:/default\n")))
    assert cli.parse(["list"]).dest == "file:/default"
    with pytest.raises(FileNotFoundError):
        config.read("/x.ini", cli.OPTIONS)  # --config must exist


def test_tests_never_read_the_real_etc_file(ini, monkeypatch):
    import os
    assert os.environ[config.ENV] == os.devnull
    monkeypatch.setattr(config, "DEFAULT_PATH", str(ini("[var-global-default]\ndest = file:/real\n")))
    assert config.read(None, cli.OPTIONS) == ({}, [])  # the hook's file, not the default


def test_the_shipped_example_changes_nothing():
    assert config.read(str(EXAMPLE), cli.OPTIONS) == ({}, [])


def test_every_setting_in_the_shipped_example_is_valid_when_uncommented():
    """Uncomment each '# key = value' (with its '#     continuation' lines)."""
    lines = EXAMPLE.read_text().splitlines()
    settings = []
    for i, line in enumerate(lines):
        m = re.match(r"# ([a-z-]+) = (.*)", line)
        if m:
            block = [line[2:]]
            for more in lines[i + 1:]:
                if not re.match(r"#\s{2,}\S", more):
                    break
                block.append("    " + more[1:].strip())
            settings.append((m.group(1), "\n".join(block)))
    assert len(settings) >= 15
    names = {key for key, _ in settings}
    assert names <= set(cli.OPTIONS) - set(config.IGNORED)
    for key, text in settings:
        values, notes = config.parse("[var-global-default]\n%s\n" % text, cli.OPTIONS, "example")
        assert list(values) == [key] and not notes
    assert dict(settings)["volex"].count("\n") == 1, "the example shows a continuation line"


def test_cli_reports_config_errors_in_one_line(ini):
    path = ini("[var-global-default]\nbogus = 1\n")
    done = subprocess.run([sys.executable, "-m", "qubeswyng.cli", "--config=%s" % path, "version"],
                          capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr == "qvm-wyng: error: %s: bogus: unknown option\n" % path
    done = subprocess.run([sys.executable, "-m", "qubeswyng.cli", "version", "--config=%s" % Path(path).with_name("no.ini")],
                          capture_output=True, text=True)
    assert done.returncode == 1 and "no.ini" in done.stderr and done.stderr.count("\n") == 1


def test_a_user_story_defaults_in_the_file_then_a_backup(wyng, ini):
    """The user puts dest, passcmd and meta-dir in wyng.ini and runs
    qvm-wyng with nothing but the command."""
    path = ini("[var-global-default]\n"
               "dest = %s\n"
               "passcmd = echo '%s'\n"
               "meta-dir = %s\n"
               "authmin = 1\n"
               "volex = other\n" % (wyng.dest, wyng.passphrase, wyng.meta))
    image = wyng.tmp / "vol.img"
    image.write_bytes(b"wyng" * 100000)

    def run(*args):
        done = subprocess.run([sys.executable, "-m", "qubeswyng.cli", "--config=%s" % path] + list(args),
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout
    run("arch-init")
    run("send", "--import-other-from=vol:|:%s" % image)
    import json
    listing = json.loads(run("list", "vol", "--json"))
    assert listing["volumes"][0]["sessions"]
    restored = wyng.tmp / "restored.img"
    run("receive", "vol", "--save-to=%s" % restored)
    assert restored.read_bytes() == image.read_bytes()
