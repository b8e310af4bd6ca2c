"""The packages, built with the real tools from a clean copy of this checkout:
``make rpm`` (rpmbuild) and ``make deb`` (dpkg-buildpackage), then read
back with ``rpm -qlp``/``rpm -qp``/``dpkg -c``/``dpkg -I`` and run from
their payloads (``rpm2cpio | cpio``, ``dpkg-deb -x``) with nothing from the
source tree importable."""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, need, which

pytestmark = pytest.mark.slow

VERSION = (REPO / "version").read_text().strip()
CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": os.environ.get("HOME", "/root")}
# what no binary package may carry
DEV_FILE = re.compile(r"(^|/)(tests?|bench|conftest\.py|test_[^/]*|lying_agent\.py|images\.py|pyproject\.toml|"
                      r"Makefile|[^/]*\.spec(\.in)?|make_man\.py|[^/]*\.egg-info|pyproject-wheeldir|\.pybuild|"
                      r"debian|rpm_spec|packaging|[^/]*\.(orig|rej|swp)|[^/]*~|\.git[^/]*)(/|$)")
NO_DOM0_DEPENDENCY = re.compile(r"crypt|zstandard|boto|requests|urllib3|paramiko|nacl|ssl|curl|http", re.I)


def sh(cmd, **kwargs):
    done = subprocess.run(cmd, shell=isinstance(cmd, str), capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, "%s: exit %d\n%s\n%s" % (cmd, done.returncode, done.stdout[-3000:],
                                                          done.stderr[-3000:])
    return done.stdout


def clean_copy(dest):
    """The files a fresh clone would have (tracked ones, and new ones not
    ignored, so that uncommitted work is tested too)."""
    try:
        names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                               cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        names = [str(p.relative_to(REPO)) for p in REPO.rglob("*") if p.is_file()
                 and not re.search(r"(^|/)(build|__pycache__|\.pytest_cache|\.git)(/|$)", str(p.relative_to(REPO)))]
    for name in filter(None, names):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if "build" not in p.relative_to(root).parts[:1])


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """``make rpm deb`` in a clean copy of the checkout."""
    for tool in ("make", "rpmbuild", "rpm", "rpm2cpio", "cpio", "dpkg-buildpackage", "dh", "dpkg-deb"):
        need(which(tool), tool)
    src = tmp_path_factory.mktemp("checkout") / "qubes-wyng"
    src.mkdir()
    clean_copy(src)
    before = tree(src)
    sh(["make", "rpm", "deb"], cwd=src, env=CLEAN_ENV)
    after = tree(src)
    return {
        "src": src,
        "before": before,
        "after": after,
        "dom0": src / "build" / ("qubes-wyng-dom0-%s-1.noarch.rpm" % VERSION),
        "vm": src / "build" / ("qubes-wyng-vm-%s-1.noarch.rpm" % VERSION),
        "deb": src / "build" / ("qubes-wyng-vm_%s-1_all.deb" % VERSION),
    }


def rpm_files(rpm):
    """{path: (mode, flags)} from the package header; checked against rpm -qlp."""
    out = sh(["rpm", "-qp", "--queryformat", "[%{FILEMODES:octal} %{FILEFLAGS:fflags} %{FILENAMES}\n]", str(rpm)])
    files = {}
    for line in out.splitlines():
        mode, flags, name = line.split(" ", 2)
        files[name] = (int(mode, 8), flags)
    assert sorted(files) == sorted(sh(["rpm", "-qlp", str(rpm)]).split())
    return files


def deb_files(deb):
    """{path: mode} from dpkg -c."""
    files = {}
    for line in sh(["dpkg", "-c", str(deb)]).splitlines():
        perms, _owner, _size, _date, _time, name = line.split(None, 5)
        name = name.split(" -> ")[0].lstrip(".")
        if name != "/":
            files[name.rstrip("/")] = perms
    return files


def sitelib(files, package):
    found = {re.sub(r"/%s/.*" % package, "", f) for f in files if "/%s/" % package in f}
    assert len(found) == 1, found
    return found.pop()


def source_modules(project, package):
    root = REPO / project
    return sorted(str(p.relative_to(root)) for p in (root / package).rglob("*.py"))


def license_of(files, package):
    """The %license file: /usr/share/licenses/NAME/ on Fedora, NAME-VERSION/
    with Debian's rpm macros."""
    return [f for f, (_mode, flags) in files.items()
            if re.fullmatch(r"/usr/share/licenses/%s(-[0-9.]+)?/LICENSE" % package, f) and "l" in flags]


def packaged_modules(files, site, package):
    return sorted(f[len(site) + 1:] for f in files if f.startswith(site + "/" + package + "/") and f.endswith(".py"))


def mode_of(perms):
    """'-rwxr-xr-x' -> 0o755"""
    bits = 0
    for ch in perms[1:10]:
        bits = bits << 1 | (ch != "-")
    return bits


# -- building ---------------------------------------------------------------

def test_make_builds_both_rpms_and_the_deb_from_a_clean_checkout(built):
    for name in ("dom0", "vm", "deb"):
        assert built[name].is_file(), name
    assert built["before"] == built["after"], "the build wrote outside build/"
    assert not list(built["src"].glob("*/*.egg-info")) and not list(built["src"].rglob("__pycache__"))


# -- contents and modes -----------------------------------------------------

def test_dom0_rpm_holds_the_right_files_with_the_right_modes(built):
    files = rpm_files(built["dom0"])
    site = sitelib(files, "qubeswyng")
    assert re.fullmatch(r"/usr/lib/python3\.\d+/site-packages", site)
    expect = {
        "/usr/bin/qvm-wyng": (0o100755, ""),
        "/etc/wyng/wyng.ini": (0o100644, "cn"),
        "/etc/qubes/policy.d/90-qubes-wyng.policy": (0o100644, "cn"),
        "/usr/share/man/man1/qvm-wyng.1.gz": (0o100644, ""),
        "/etc/wyng": (0o40755, ""),
        "/var/lib/qubes-wyng": (0o40700, ""),    # --meta-dir's default: keys' cache, root-seen
        "/etc/wyng/schedule.conf": (0o100644, "cn"),
        "/usr/lib/systemd/system/qubes-wyng-backup.service": (0o100644, ""),
        "/usr/lib/systemd/system/qubes-wyng-backup.timer": (0o100644, ""),
        "/usr/lib/qubes-wyng/notify": (0o100755, ""),
    }
    for path, (mode, flags) in expect.items():
        assert path in files, path
        assert files[path][0] == mode, "%s: %o" % (path, files[path][0])
        assert set(flags) <= set(files[path][1]), "%s: flags %s" % (path, files[path][1])
    assert license_of(files, "qubes-wyng-dom0")
    assert packaged_modules(files, site, "qubeswyng") == source_modules("dom0", "qubeswyng")
    assert "%s/qubes_wyng_dom0-%s.dist-info/METADATA" % (site, VERSION) in files
    for path, (mode, _flags) in files.items():
        if path.startswith(site) and not path.endswith("/") and mode & 0o170000 == 0o100000:
            assert mode == 0o100644, path
    assert not [f for f in files if "wyngagent" in f or "qubes-rpc" in f], "agent files belong to qubes-wyng-vm"


def test_dom0_rpm_systemd_units_pass_systemd_analyze_verify(built, tmp_path):
    """The scheduled backup's timer and service, as packaged, in a root made
    of the payload (so ExecStart's qvm-wyng and the notify script are the
    packaged ones) plus the host's targets their default dependencies name."""
    need(which("systemd-analyze"), "systemd-analyze (systemd)")
    root = unpack(built, "dom0", tmp_path / "root")
    units = "/usr/lib/systemd/system"
    for target in Path(units).glob("*.target"):
        shutil.copy(target, root / units[1:])
    done = subprocess.run(["systemd-analyze", "verify", "--root=%s" % root, units + "/qubes-wyng-backup.timer",
                           units + "/qubes-wyng-backup.service"], capture_output=True, text=True,
                          env=dict(os.environ, MANPATH=str(root / "usr/share/man")))  # Documentation=man:qvm-wyng(1)
    assert (done.returncode, done.stdout + done.stderr) == (0, ""), done


def test_vm_rpm_holds_the_right_files_with_the_right_modes(built):
    files = rpm_files(built["vm"])
    site = sitelib(files, "wyngagent")
    for service, program in (("wyng.Agent", "wyng-agent"), ("wyng.Browse", "wyng-browse")):
        assert files["/etc/qubes-rpc/" + service][0] == 0o100755
        assert "c" not in files["/etc/qubes-rpc/" + service][1], "the service is code, not configuration"
        assert files["/usr/bin/" + program][0] == 0o100755
    assert license_of(files, "qubes-wyng-vm")
    assert packaged_modules(files, site, "wyngagent") == source_modules("backupvm", "wyngagent")
    assert "%s/qubes_wyng_agent-%s.dist-info/METADATA" % (site, VERSION) in files
    assert not [f for f in files if "qubeswyng" in f or "/wyng/" in f or "policy" in f or "/man/" in f]


def test_deb_holds_the_right_files_with_the_right_modes(built):
    files = deb_files(built["deb"])
    for path in ("/etc/qubes-rpc/wyng.Agent", "/etc/qubes-rpc/wyng.Browse", "/usr/bin/wyng-agent",
                 "/usr/bin/wyng-browse"):
        assert mode_of(files[path]) == 0o755, path
    site = "/usr/lib/python3/dist-packages"
    assert packaged_modules(files, site, "wyngagent") == source_modules("backupvm", "wyngagent")
    for path, perms in files.items():
        if path.startswith(site) and perms.startswith("-"):
            assert mode_of(perms) == 0o644, path
    assert "/usr/share/doc/qubes-wyng-vm/copyright" in files
    assert not [f for f in files if "qubeswyng" in f]


@pytest.mark.parametrize("kind", ["dom0", "vm", "deb"])
def test_no_test_or_development_file_is_packaged(built, kind):
    files = deb_files(built[kind]) if kind == "deb" else rpm_files(built[kind])
    assert not [f for f in files if DEV_FILE.search(f)]


def test_shebangs_name_the_system_python(built, tmp_path):
    for kind in ("dom0", "vm", "deb"):
        root = unpack(built, kind, tmp_path / kind)
        for script in ("usr/bin/qvm-wyng", "usr/bin/wyng-agent", "usr/bin/wyng-browse", "etc/qubes-rpc/wyng.Agent",
                       "etc/qubes-rpc/wyng.Browse"):
            if (root / script).exists():
                assert (root / script).read_text().splitlines()[0] == "#!/usr/bin/python3", (kind, script)


# -- dependencies -----------------------------------------------------------

def rpm_deps(rpm, kind):
    return set(sh(["rpm", "-qp", "--" + kind, str(rpm)]).splitlines())


def test_dom0_rpm_requires_and_nothing_with_network_or_crypto(built):
    requires = rpm_deps(built["dom0"], "requires")
    assert {"python3", "python3-lxml", "python3-qubesadmin", "thin-provisioning-tools", "lvm2"} <= requires
    assert not [r for r in requires if NO_DOM0_DEPENDENCY.search(r)], requires
    for weak in ("recommends", "suggests", "supplements", "enhances"):
        assert not rpm_deps(built["dom0"], weak)


def test_vm_rpm_requires_and_weak_dependencies(built):
    requires = rpm_deps(built["vm"], "requires")
    assert {"python3", "python3-cryptography", "python3-pycryptodomex", "python3-zstandard"} <= requires
    assert not [r for r in requires if re.search(r"boto|lxml|qubesadmin", r)], requires
    assert rpm_deps(built["vm"], "recommends") == {"python3-boto3", "openssh-clients"}
    assert rpm_deps(built["vm"], "suggests") == {"s3fs-fuse"}


def test_deb_depends_and_recommends(built):
    fields = {}
    for field in ("Package", "Version", "Architecture", "Depends", "Recommends", "Suggests"):
        fields[field] = sh(["dpkg-deb", "-f", str(built["deb"]), field]).strip()
    assert fields["Package"] == "qubes-wyng-vm" and fields["Version"] == VERSION + "-1"
    assert fields["Architecture"] == "all"
    depends = [d.strip() for d in fields["Depends"].split(",")]
    assert "python3-pycryptodome | python3-pycryptodomex" in depends
    assert "python3-zstandard" in depends and "python3-cryptography" in depends
    assert any(d.startswith("python3") and not re.search(r"pycrypto|zstandard|cryptography", d) for d in depends)
    assert not [d for d in depends if re.search(r"boto", d)]
    assert [r.strip() for r in fields["Recommends"].split(",")] == ["python3-boto3", "openssh-client"]
    assert fields["Suggests"] == "s3fs"
    info = sh(["dpkg", "-I", str(built["deb"])])
    assert "conffiles" in info


# -- running the payloads ---------------------------------------------------

def unpack(built, kind, root):
    root.mkdir(parents=True, exist_ok=True)
    if kind == "deb":
        sh(["dpkg-deb", "-x", str(built["deb"]), str(root)])
    else:
        sh("rpm2cpio '%s' | cpio -idm --quiet" % built[kind], cwd=root)
    return root


def dependency_dirs(tmp_path):
    """A folder holding links to just the third-party modules the payload
    needs, as this interpreter finds them, so that the payload runs with -S
    (no site-packages: neither an installed nor an editable qubes-wyng)."""
    deps = tmp_path / "deps"
    deps.mkdir()
    for module in ("lxml", "zstandard", "Cryptodome", "Crypto", "cryptography", "_cffi_backend", "cffi"):
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            continue
        where = Path(spec.origin)
        if spec.submodule_search_locations:
            where = where.parent
        (deps / where.name).symlink_to(where)
    return [str(deps)]


def run_isolated(python, argv, pythonpath, cwd, **kwargs):
    env = dict(CLEAN_ENV, PYTHONPATH=os.pathsep.join(pythonpath), PYTHONDONTWRITEBYTECODE="1")
    env.update(kwargs.pop("env", {}))
    return subprocess.run(python + argv, cwd=cwd, env=env, capture_output=True, text=True, **kwargs)


def test_rpm_payloads_run_from_a_scratch_root(built, tmp_path):
    root = tmp_path / "root"
    unpack(built, "dom0", root)
    unpack(built, "vm", root)
    site = str(next(root.glob("usr/lib/python3.*/site-packages")))
    path = [site] + dependency_dirs(tmp_path)
    python = [sys.executable, "-S"]
    cwd = tmp_path  # not the source tree
    where = run_isolated(python, ["-c", "import qubeswyng, wyngagent; print(qubeswyng.__file__, wyngagent.__file__)"],
                         path, cwd)
    assert where.returncode == 0, where.stderr
    assert all(f.startswith(site + "/") for f in where.stdout.split()), where.stdout

    done = run_isolated(python, [str(root / "usr/bin/qvm-wyng"), "--config=%s" % (root / "etc/wyng/wyng.ini"),
                                 "version"], path, cwd)
    assert (done.returncode, done.stdout, done.stderr) == (0, "qvm-wyng %s\n" % VERSION, "")
    done = run_isolated(python, [str(root / "usr/bin/qvm-wyng"), "send", "--help"], path, cwd)
    assert done.returncode == 0 and "--import-other-from" in done.stdout

    done = run_isolated(python, [str(root / "usr/bin/wyng-agent"), "--self-check"], path, cwd)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("wyng-agent %s self-check ok: aead " % VERSION)
    done = run_isolated(python, [str(root / "etc/qubes-rpc/wyng.Agent")], path, cwd, input="")
    assert (done.returncode, done.stdout) == (0, ""), done.stderr
    done = run_isolated(python, [str(root / "etc/qubes-rpc/wyng.Browse")], path, cwd, input="", errors="replace")
    assert done.returncode == 1 and done.stdout.endswith("dom0 did not name a volume"), done.stderr  # ERR, to dom0


def system_python_has(*modules):
    code = "import importlib.util, sys; sys.exit(not all(importlib.util.find_spec(m) for m in %r))" % (modules,)
    return os.path.exists("/usr/bin/python3") and subprocess.run(
        ["/usr/bin/python3", "-c", code], env=CLEAN_ENV).returncode == 0


def test_deb_payload_runs_with_debian_python_packages(built, tmp_path):
    """The .deb's agent on Debian's own python3 with the packages its
    Depends name (python3-cryptography, python3-pycryptodome,
    python3-zstandard); without cryptography it fails clearly."""
    need(system_python_has("Cryptodome", "zstandard", "cryptography"),
         "Debian's python3-pycryptodome, python3-zstandard and python3-cryptography")
    root = unpack(built, "deb", tmp_path / "root")
    path = [str(root / "usr/lib/python3/dist-packages")]
    done = run_isolated(["/usr/bin/python3"], [str(root / "usr/bin/wyng-agent"), "--self-check"], path, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "aead cryptography" in done.stdout
    code = ("import sys; sys.modules['cryptography'] = None; from wyngagent import selfcheck; "
            "print(selfcheck.__file__); sys.exit(selfcheck.run())")
    done = run_isolated(["/usr/bin/python3"], ["-c", code], path, tmp_path)
    assert done.returncode == 1 and done.stdout.startswith(str(root)) and "FAILED" in done.stderr


def test_rpm_payloads_back_up_and_restore_on_the_system_python(built, tmp_path):
    """qvm-wyng and wyng.Agent from the payloads, /usr/bin/python3 with
    packaged dependencies only: the agent runs as its shebang says."""
    need(system_python_has("lxml", "cryptography", "Cryptodome", "zstandard"),
         "Debian's python3-lxml, python3-cryptography, python3-pycryptodome and python3-zstandard")
    root = tmp_path / "root"
    unpack(built, "dom0", root)
    unpack(built, "vm", root)
    site = str(next(root.glob("usr/lib/python3.*/site-packages")))
    image = tmp_path / "vol.img"
    image.write_bytes(os.urandom(1 << 20) + bytes(1 << 20) + b"qubes" * 100000)
    ini = tmp_path / "wyng.ini"
    ini.write_text("[var-global-default]\ndest = file:%s\npasscmd = echo secret\nmeta-dir = %s\nauthmin = 0\n"
                   % (tmp_path / "archive", tmp_path / "meta"))
    env = {"QVM_WYNG_AGENT": str(root / "etc/qubes-rpc/wyng.Agent")}

    def qvm_wyng(*args):
        done = run_isolated(["/usr/bin/python3"], [str(root / "usr/bin/qvm-wyng"), "--config=%s" % ini] + list(args),
                            [site], tmp_path, env=env)
        assert done.returncode == 0, done.stderr
        return done.stdout
    qvm_wyng("arch-init")
    qvm_wyng("send", "--import-other-from=vol:|:%s" % image)
    assert len(json.loads(qvm_wyng("list", "vol", "--json"))["volumes"][0]["sessions"]) == 1
    qvm_wyng("receive", "vol", "--save-to=%s" % (tmp_path / "out.img"))
    assert (tmp_path / "out.img").read_bytes() == image.read_bytes()
