"""The top-level file "version" is the one version: the spec files and the
Debian changelog take it at build time; the Python packages must agree."""
import importlib.util
import re

from conftest import REPO, need

VERSION = (REPO / "version").read_text().strip()


def test_version_file_holds_one_version():
    assert re.fullmatch(r"\d+\.\d+\.\d+", VERSION)


def test_python_packages_agree_with_the_version_file():
    import qubeswyng
    import wyngagent
    assert qubeswyng.__version__ == VERSION
    assert wyngagent.__version__ == VERSION


def test_pyprojects_take_the_version_from_the_package():
    need(importlib.util.find_spec("tomllib"), "Python 3.11 or later (tomllib)")
    import tomllib
    for project, module in (("dom0", "qubeswyng"), ("backupvm", "wyngagent")):
        with open(REPO / project / "pyproject.toml", "rb") as f:
            meta = tomllib.load(f)
        assert "version" not in meta["project"] and "version" in meta["project"]["dynamic"], project
        assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": module + ".__version__"}


def test_spec_files_and_debian_changelog_are_filled_from_the_version_file():
    for spec in ("qubes-wyng-dom0", "qubes-wyng-vm"):
        text = (REPO / "rpm_spec" / (spec + ".spec.in")).read_text()
        assert re.search(r"^Version:\s+@VERSION@$", text, re.M), spec
    changelog = (REPO / "packaging" / "debian" / "changelog.in").read_text()
    assert changelog.startswith("qubes-wyng (@VERSION@-1) ")
