"""The man page, --help and COMMAND --help all come from cli.py's tables
and say the same thing."""
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, need
from qubeswyng import cli

MAN = REPO / "doc" / "qvm-wyng.1"


def run(*args):
    done = subprocess.run([sys.executable, "-m", "qubeswyng.cli"] + list(args), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def listed_options(help_text):
    """Long option names in the options part of a --help output."""
    part = help_text.split("options:", 1)[1].split("commands:", 1)[0]
    return re.findall(r"^\s+(?:-\w, )?--([a-z-]+)", part, re.M)


def man_section(name):
    text = MAN.read_text()
    return text.split(".SH %s\n" % name, 1)[1].split("\n.SH ", 1)[0]


def test_committed_man_page_is_what_make_man_writes():
    done = subprocess.run([sys.executable, str(REPO / "doc" / "make_man.py"), "--check"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr + "\nrun: make man"


def test_make_man_rewrites_a_stale_page(tmp_path):
    out = tmp_path / "qvm-wyng.1"
    out.write_text("stale\n")
    script = [sys.executable, str(REPO / "doc" / "make_man.py"), "--output", str(out)]
    assert subprocess.run(script + ["--check"], capture_output=True).returncode == 1
    subprocess.run(script, check=True)
    assert out.read_text() == MAN.read_text()


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_command_help_lists_exactly_its_options(command):
    names = cli.COMMANDS[command][3]
    listed = listed_options(run(command, "--help"))
    assert sorted(listed) == sorted(set(names) | set(cli.COMMON) | {"help"})
    assert len(listed) == len(set(listed))


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_command_help_works_before_and_after_options(command):
    assert run("-v", command, "-h") == run(command, "--help")


def test_help_lists_every_option_and_command():
    text = run("--help")
    assert sorted(listed_options(text)) == sorted(set(cli.OPTIONS) | {"help"})
    commands = re.findall(r"^  ([a-z-]+)\s{2,}(.+)$", text.split("commands:", 1)[1], re.M)
    assert commands == [(name, entry[2]) for name, entry in cli.COMMANDS.items()]


def test_every_table_entry_is_consistent():
    for name, (_func, _args, summary, names) in cli.COMMANDS.items():
        assert summary and set(names) <= set(cli.OPTIONS), name
    for name, (short, kwargs) in cli.OPTIONS.items():
        assert kwargs.get("help"), name
    assert set(cli.COMMON) <= set(cli.OPTIONS)


def man_text(roff):
    return roff.replace("\\-", "-").replace("\\fB", "").replace("\\fI", "").replace("\\fR", "").replace("\\e", "\\")


def test_man_page_lists_every_command_with_its_own_options():
    section = man_section("COMMANDS")
    entries = section.split(".TP\n")[1:]
    assert len(entries) == len(cli.COMMANDS)
    for entry, (name, (_f, args, summary, names)) in zip(entries, cli.COMMANDS.items()):
        lines = man_text(entry).splitlines()
        assert lines[0] == ("%s %s" % (name, args)).strip()
        assert lines[1] == summary
        own = [n for n in names if n not in cli.COMMON]
        listed = re.findall(r"--([a-z-]+)", lines[3]) if own else []
        assert listed == own


def test_man_page_describes_every_option_as_help_does():
    section = man_text(man_section("OPTIONS"))
    entries = section.split(".TP\n")[1:]
    assert len(entries) == len(cli.OPTIONS) + 1
    # argparse may wrap after a hyphen ("qubes-" / "ssh://"): compare without spaces
    help_text = re.sub(r"\s+", "", run("--help"))
    for entry in entries:
        term, text, _br, users = entry.splitlines()[:4]
        name = re.findall(r"--([a-z-]+)", term)[0]
        assert re.sub(r"\s+", "", text) in help_text, name
        if name in cli.COMMON or name == "help":
            assert users == "All commands."
        else:
            assert users.replace("Repeatable. ", "") == "Used by: %s." % ", ".join(
                c for c, entry in cli.COMMANDS.items() if name in entry[3])
        if name != "help":
            metavar = cli.OPTIONS[name][1].get("metavar")
            if metavar:
                assert term.endswith("--%s=%s" % (name, metavar))


def test_man_page_documents_the_configuration_file():
    section = man_text(man_section("CONFIGURATION FILE"))
    for word in ("/etc/wyng/wyng.ini", "[var-global-default]", "--config", "1 or 0", "indented",
                 "QVM_WYNG_CONFIG", "--force"):
        assert word in section, word


def test_man_page_renders_without_warnings():
    need(shutil.which("groff"), "groff (groff-base)")
    done = subprocess.run(["groff", "-t", "-man", "-ww", "-z", str(MAN)], capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    rendered = subprocess.run(["groff", "-t", "-man", "-Tutf8", "-P-c", str(MAN)], capture_output=True, text=True,
                              check=True).stdout
    plain = re.sub(r".\x08", "", rendered)
    for name in cli.OPTIONS:
        assert "--" + name in plain, name
