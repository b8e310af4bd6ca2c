"""Fixtures that start the real parts the tests need, and clean them up.

Tests always exercise this checkout: its ``dom0`` and ``backupvm`` folders
come first on the import path (also for the subprocesses they start), and
``file:`` archives run this checkout's ``qubes-rpc/wyng.Agent`` (and ``mount``
its ``qubes-rpc/wyng.Browse``).
"""
import atexit
import contextlib
import hashlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "dom0"), str(REPO / "backupvm"), str(REPO / "tests")]
AGENT = REPO / "qubes-rpc" / "wyng.Agent"
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(REPO / "dom0"), str(REPO / "backupvm")] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
# the agent's "#!/usr/bin/env python3" must find this interpreter's packages
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]
os.environ["QVM_WYNG_AGENT"] = str(AGENT)
os.environ["QVM_WYNG_BROWSE"] = str(REPO / "qubes-rpc" / "wyng.Browse")
# never the real /etc/wyng/wyng.ini: tests that want one pass --config
os.environ["QVM_WYNG_CONFIG"] = os.devnull
# never the host's auth cache (/run/qubes-wyng/auth): one of this run's own
AUTH_DIR = tempfile.mkdtemp(prefix="qwyng-auth-")
os.environ["QVM_WYNG_TEST_AUTH_DIR"] = AUTH_DIR
atexit.register(shutil.rmtree, AUTH_DIR, True)
# cheap scrypt (1 MiB) for the archives tests make; test_kdf.py checks the calibrated default
os.environ["QVM_WYNG_TEST_KDF"] = "10,8,1"
os.environ["TZ"] = "UTC"  # session names are local time; tests choose their times in UTC
time.tzset()
IN_CI = os.environ.get("CI") == "true"

PASS = "correct horse battery staple"


def need(condition, why):
    """Skip on a developer machine that lacks a part; in CI every part is
    installed, so a missing one is a failure, never a silent skip."""
    if not condition:
        if IN_CI:
            pytest.fail("CI must provide: " + why)
        pytest.skip(why)


def need_root():
    need(os.geteuid() == 0, "root (loop devices, mounts)")


class Wyng:
    """Runs the real qvm-wyng, with one archive and metadata folder per test."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.archive = tmp_path / "archive"
        self.meta = tmp_path / "meta"
        self.dest = "file:%s" % self.archive
        self.passphrase = PASS

    def args(self, args, dest=True):
        base = ["--meta-dir=%s" % self.meta, "--passcmd=echo '%s'" % self.passphrase, "--authmin=1"]
        if dest and not any(a.startswith("--dest") for a in args):
            base.append("--dest=%s" % self.dest)
        return base + list(args)

    def run(self, *args, expect=0, input=None, env=None):
        cmd = [sys.executable, "-m", "qubeswyng.cli"] + self.args(args)
        done = subprocess.run(cmd, capture_output=True, text=True, input=input,
                              env=dict(os.environ, **(env or {})))
        if expect is not None:
            assert done.returncode == expect, "exit %d\nstdout: %s\nstderr: %s" % (
                done.returncode, done.stdout, done.stderr)
        return done

    def init(self, *args, expect=0):
        return self.run("arch-init", *args, expect=expect)

    def send(self, name, path, *args, expect=0):
        return self.run("send", "--import-other-from=%s:|:%s" % (name, path), *args, expect=expect)

    def receive(self, name, path, *args, expect=0):
        return self.run("receive", name, "--save-to=%s" % path, *args, expect=expect)

    def sessions(self, name):
        import json
        out = self.run("list", name, "--json").stdout
        return [s["session"] for s in json.loads(out)["volumes"][0]["sessions"]]

    def main(self, *args, env=None):
        """Run qvm-wyng in this process (no interpreter start: for tests
        that make many sessions); returns the exit code."""
        from qubeswyng import cli
        saved = dict(os.environ)
        os.environ.update(env or {})
        try:
            with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
                return cli.main(self.args(args))
        finally:
            os.environ.clear()
            os.environ.update(saved)

    def at(self, when, *args, expect=0):
        """Run with the test clock set to ``when`` (Unix seconds)."""
        return self.run(*args, expect=expect, env={"QVM_WYNG_TEST_NOW": str(int(when))})

    def restore_all(self):
        """{volume: {session: sha256 of the restored bytes}} for every session
        in the archive, restored in this process through one real agent
        connection with dom0's own code (far faster than a receive each)."""
        from qubeswyng import cli
        from qubeswyng.archive import Archive
        from qubeswyng.commands.receive import restore
        from qubeswyng.manifest import ChunkMap, chunk_count
        opts = cli.parse(self.args(["list", "-q"]))
        archive = Archive(opts).open()
        out = {}
        try:
            for vol in archive.root["volumes"]:
                out[vol["name"]] = {}
                chunk_map = ChunkMap()  # built session by session, as chunk_map() does
                for i, ses in enumerate(vol["sessions"]):
                    chunk_map.resize(chunk_count(ses["size"], archive.chunk_size))
                    for first, ids in archive.read_manifest(vol, i):
                        chunk_map[first] = ids
                    buf = bytearray(ses["size"])

                    def write(offset, data, buf=buf):
                        buf[offset:offset + len(data)] = data
                    restore(archive, chunk_map, ses["size"], write, opts, vol["name"], False)
                    out[vol["name"]][ses["name"]] = hashlib.sha256(buf).hexdigest()
        finally:
            archive.close()
        return out

    def keys(self):
        """The archive's keys, for tests that name chunk objects."""
        from qubeswyng.formats import Header
        from qubeswyng.keys import Keys
        header = Header.parse((self.archive / "header").read_bytes())
        return Keys(header.unlock(self.passphrase.encode()), header.archive_id)

    def copy(self, tmp_path):
        """An independent copy of this archive and its dom0 metadata."""
        other = Wyng(tmp_path)
        shutil.copytree(self.archive, other.archive)
        shutil.copytree(self.meta, other.meta)
        return other


@pytest.fixture
def wyng(tmp_path):
    return Wyng(tmp_path)


@pytest.fixture
def tmpfs(tmp_path):
    """A small tmpfs, for a destination that fills up."""
    need_root()
    mounts = []

    def make(size):
        path = tmp_path / ("tmpfs%d" % len(mounts))
        path.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%s" % size, "tmpfs", str(path)], check=True)
        mounts.append(path)
        return path
    yield make
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)])


def which(tool):
    return shutil.which(tool) is not None


LOOP_SIZE = 1 << 30  # sparse: costs only what the test writes


def _run(argv):
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError("%s: exit %d: %s" % (" ".join(argv), done.returncode, done.stderr.strip()))
    return done.stdout


@contextlib.contextmanager
def loop_mount(tmp_path, name, mkfs):
    """A fresh filesystem made by ``mkfs`` (a command line, without the
    device) on a sparse loop file, mounted at ``tmp_path/name``.  The mount
    and the loop device are always removed, also when the test fails."""
    need_root()
    need(which(mkfs[0]), mkfs[0])
    need(which("losetup"), "losetup (util-linux)")
    image = tmp_path / (name + ".img")
    with open(image, "wb") as f:
        f.truncate(LOOP_SIZE)
    device = _run(["losetup", "--find", "--show", str(image)]).strip()
    mnt = tmp_path / name
    mounted = False
    try:
        _run(mkfs + [device])
        mnt.mkdir()
        _run(["mount", device, str(mnt)])
        mounted = True
        yield mnt
    finally:
        if mounted and subprocess.run(["umount", str(mnt)]).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)])
        subprocess.run(["losetup", "-d", device])
        image.unlink()


@pytest.fixture(scope="session")
def btrfs_session(tmp_path_factory):
    """One Btrfs for a whole test session; tests use folders of their own."""
    with loop_mount(tmp_path_factory.mktemp("btrfs-session"), "btrfs", ["mkfs.btrfs", "-q", "-f"]) as mnt:
        yield mnt


@pytest.fixture
def btrfs_mount(tmp_path):
    """A mounted, empty Btrfs."""
    with loop_mount(tmp_path, "btrfs", ["mkfs.btrfs", "-q", "-f"]) as mnt:
        yield mnt


@pytest.fixture
def xfs_mount(tmp_path):
    """A mounted, empty XFS with reflinks."""
    with loop_mount(tmp_path, "xfs", ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"]) as mnt:
        yield mnt


@pytest.fixture
def ext4_mount(tmp_path):
    """A mounted, empty ext4: a filesystem without reflinks."""
    with loop_mount(tmp_path, "ext4", ["mkfs.ext4", "-q", "-F"]) as mnt:
        yield mnt


@pytest.fixture
def thin_pool_metadata(tmp_path):
    """Real thin-pool metadata, written by ``thin_restore`` from XML.

    ``make({dev_id: {origin_block: data_block}}, block_sectors=128)`` returns
    the path of a metadata file that ``thin_delta --snap1 A --snap2 B PATH``
    reads; devices may share data blocks, as snapshots do."""
    need(which("thin_restore") and which("thin_delta"), "thin-provisioning-tools (thin_restore, thin_delta)")
    serial = itertools.count()

    def make(devices, block_sectors=128):
        used = [d for mapping in devices.values() for d in mapping.values()]
        lines = ['<superblock uuid="" time="1" transaction="1" data_block_size="%d" nr_data_blocks="%d">'
                 % (block_sectors, max(used, default=0) + 1)]
        for dev_id, mapping in sorted(devices.items()):
            lines.append('  <device dev_id="%d" mapped_blocks="%d" transaction="0" creation_time="0" snap_time="0">'
                         % (dev_id, len(mapping)))
            for origin, data, length in _mapping_runs(mapping):
                if length == 1:
                    lines.append('    <single_mapping origin_block="%d" data_block="%d" time="0"/>' % (origin, data))
                else:
                    lines.append('    <range_mapping origin_begin="%d" data_begin="%d" length="%d" time="0"/>'
                                 % (origin, data, length))
            lines.append("  </device>")
        lines.append("</superblock>\n")
        n = next(serial)
        xml, meta = tmp_path / ("pool%d.xml" % n), tmp_path / ("pool%d.meta" % n)
        xml.write_text("\n".join(lines))
        with open(meta, "wb") as f:
            f.truncate(8 << 20)
        done = subprocess.run(["thin_restore", "-i", str(xml), "-o", str(meta)], capture_output=True, text=True)
        assert done.returncode == 0, "thin_restore: %s%s" % (done.stdout, done.stderr)
        return meta
    return make


def _mapping_runs(mapping):
    """(origin, data, length) runs where both block numbers go up by one."""
    run = None
    for origin in sorted(mapping):
        data = mapping[origin]
        if run and origin == run[0] + run[2] and data == run[1] + run[2]:
            run[2] += 1
            continue
        if run:
            yield tuple(run)
        run = [origin, data, 1]
    if run:
        yield tuple(run)


@pytest.fixture
def lvm_guest(tmp_path):
    """A qemu guest with real lvm2 and dm-thin (see tests/lvm_guest.py):
    ``lvm_guest.run(script, disks=[(name, size)], timeout=...)`` boots it
    once and returns the script's exit status and output. Disk images live
    until the test ends; no qemu outlives a run."""
    import lvm_guest as harness
    need_root()
    lack = harness.missing()
    need(not lack, "for the LVM guest: " + ", ".join(lack))
    guest = harness.Guest(tmp_path / "guest")
    yield guest
    guest.close()


# -- storage on loopback: sshd, an S3 server, s3fs -------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port, proc, what, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("%s exited with status %d" % (what, proc.returncode))
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("%s did not start listening" % what)


def children(pid):
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


class Sshd:
    """OpenSSH's sshd on three loopback ports with throw-away host and user
    keys.  ``port``: root, with a shell.  ``sftp_port``: the SFTP-only
    account (``nobody``: ``ForceCommand internal-sftp``, chrooted to
    ``chroot``, which like every folder above it is root's; it writes in
    ``chroot/data``).  ``one_session_port``: root, one session per
    connection (``MaxSessions 1``).  ``ssh_config`` is a client
    configuration with host aliases ``wyng-test``, ``wyng-sftp`` and
    ``wyng-one``; the agent uses it through ``WYNG_SSH_COMMAND``.  ``log``:
    what sshd logged (``LogLevel VERBOSE``: logins and sessions)."""

    def __init__(self, base):
        self.base = base
        self.port, self.sftp_port, self.one_session_port = free_port(), free_port(), free_port()
        # ChrootDirectory refuses a path below a folder others may write
        # (/tmp); sshd reads authorized keys as the user
        self.top = Path(tempfile.mkdtemp(prefix="wyng-sshd-", dir="/run"))
        self.chroot, keys = self.top / "chroot", self.top / "authorized"
        for folder in (self.top, self.chroot, keys):
            folder.mkdir(exist_ok=True)
            folder.chmod(0o755)
        (self.chroot / "data").mkdir()
        shutil.chown(self.chroot / "data", "nobody")
        for name in ("host", "user", "stranger", "other-host"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(base / name)],
                           check=True)
        for user in ("root", "nobody"):
            shutil.copy(base / "user.pub", keys / user)
            (keys / user).chmod(0o644)
        (base / "sshd_config").write_text(
            "ListenAddress 127.0.0.1:%d\nListenAddress 127.0.0.1:%d\nListenAddress 127.0.0.1:%d\n"
            "HostKey %s\nPidFile none\nLogLevel VERBOSE\n"
            "AuthorizedKeysFile %s/%%u\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nSubsystem sftp internal-sftp\n"
            "Match LocalPort %d\n  ForceCommand internal-sftp\n  ChrootDirectory %s\n"
            "Match LocalPort %d\n  MaxSessions 1\n"
            % (self.port, self.sftp_port, self.one_session_port, base / "host", keys, self.sftp_port, self.chroot,
               self.one_session_port))
        self.log = base / "sshd.log"
        self.known_hosts = base / "known_hosts"
        self.known_hosts.write_text("wyng-sshd " + (base / "host.pub").read_text())
        self.ssh_config = self.config(base / "ssh_config")
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation folder
        self.proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(base / "sshd_config")],
                                     stderr=open(self.log, "wb"))
        wait_for_port(self.port, self.proc, "sshd")

    def config(self, path, key="user", known_hosts=None):
        """A client configuration using ``key`` and ``known_hosts``."""
        path.write_text(
            "Host wyng-test\n  HostName 127.0.0.1\n  Port %d\n  User root\n"
            "Host wyng-sftp\n  HostName 127.0.0.1\n  Port %d\n  User nobody\n"
            "Host wyng-one\n  HostName 127.0.0.1\n  Port %d\n  User root\n"
            "Host *\n  IdentityFile %s\n  IdentitiesOnly yes\n  UserKnownHostsFile %s\n"
            "  GlobalKnownHostsFile /dev/null\n  HostKeyAlias wyng-sshd\n  ConnectTimeout 10\n"
            % (self.port, self.sftp_port, self.one_session_port, self.base / key, known_hosts or self.known_hosts))
        return path

    def command(self, config=None):
        return "ssh -F %s" % (config or self.ssh_config)

    def drop_connections(self):
        """Kill every session's sshd process (the listener stays)."""
        for pid in children(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def close(self):
        self.proc.terminate()
        self.proc.wait()
        shutil.rmtree(self.top, ignore_errors=True)


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    need_root()
    need(os.path.exists("/usr/sbin/sshd") and which("ssh"), "openssh-server and openssh-client")
    server = Sshd(tmp_path_factory.mktemp("sshd"))
    saved = os.environ.get("WYNG_SSH_COMMAND")
    os.environ["WYNG_SSH_COMMAND"] = server.command()
    yield server
    os.environ.pop("WYNG_SSH_COMMAND")
    if saved is not None:
        os.environ["WYNG_SSH_COMMAND"] = saved
    server.close()


class S3Server:
    """``moto_server`` (S3 over HTTP) on loopback.  boto3 finds it through
    an AWS configuration file (endpoint, path-style addressing, region)
    and throw-away credentials in the environment, as an agent would."""

    def __init__(self, base):
        self.base, self.port = base, free_port()
        moto = Path(sys.executable).with_name("moto_server")
        self.proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=open(base / "moto.log", "wb"))
        wait_for_port(self.port, self.proc, "moto_server")
        self.config = self.aws_config(self.port)

    def aws_config(self, port):
        """An AWS configuration file whose S3 endpoint is ``port`` (moto's, or a proxy's)."""
        path = self.base / ("aws-config-%d" % port)
        path.write_text("[default]\nregion = us-east-1\nendpoint_url = http://127.0.0.1:%d\n"
                        "s3 =\n  addressing_style = path\n" % port)
        return path

    def env(self, port=None):
        return {"AWS_CONFIG_FILE": str(self.aws_config(port) if port else self.config),
                "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
                "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}

    def client(self):
        import boto3
        return boto3.client("s3", endpoint_url="http://127.0.0.1:%d" % self.port, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def bucket(self):
        """A new, empty bucket."""
        name = "wyng-%s" % uuid.uuid4().hex[:12]
        self.client().create_bucket(Bucket=name)
        return name

    def objects(self, bucket):
        """{key: bytes} of everything in the bucket."""
        s3 = self.client()
        keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
                for o in page.get("Contents", ())]
        return {k: s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}

    def close(self):
        self.proc.terminate()
        self.proc.wait()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    need(Path(sys.executable).with_name("moto_server").exists(), "moto_server (pip moto[server])")
    server = S3Server(tmp_path_factory.mktemp("moto"))
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    yield server
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key)
        else:
            os.environ[key] = value
    server.close()


@pytest.fixture
def s3fs_mount(tmp_path, s3_server):
    """A new bucket of the S3 server mounted with s3fs (FUSE); yields
    (bucket, mount point)."""
    need_root()
    need(which("s3fs") and os.path.exists("/dev/fuse"), "s3fs and /dev/fuse")
    bucket, mnt, secret = s3_server.bucket(), tmp_path / "s3fs", tmp_path / "s3fs-passwd"
    secret.write_text("testing:testing\n")
    secret.chmod(0o600)
    mnt.mkdir()
    _run(["s3fs", bucket, str(mnt), "-o", "url=http://127.0.0.1:%d" % s3_server.port, "-o", "use_path_request_style",
          "-o", "passwd_file=%s" % secret, "-o", "stat_cache_expire=1"])
    try:
        yield bucket, mnt
    finally:
        if subprocess.run(["umount", str(mnt)]).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)])
