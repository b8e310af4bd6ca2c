"""Real lvm2 and dm-thin in a qemu guest: thin snapshots, a reserved
metadata snapshot and run_thin_delta, all in one boot."""
import json
import time

import pytest

pytestmark = pytest.mark.slow

KiB, MiB = 1024, 1024 * 1024
WRITTEN = (5, 700)   # 64 KiB blocks written between the two snapshots

SCRIPT = r"""
pvcreate -qy $DISK_pool
vgcreate -q tvg $DISK_pool
lvcreate -q --type thin-pool -L 256M --chunksize 64k -n pool tvg
lvcreate -q -V 64M -T tvg/pool -n lv1
dd if=/dev/urandom of=/dev/mapper/tvg-lv1 bs=1M count=4 oflag=direct status=none
lvcreate -q -s -n snap1 tvg/lv1
lvchange -q -ay -K tvg/snap1
for block in %(blocks)s; do
    dd if=/dev/urandom of=/dev/mapper/tvg-lv1 bs=64K seek=$block count=1 oflag=direct conv=notrunc status=none
done
lvcreate -q -s -n snap2 tvg/lv1
lvchange -q -ay -K tvg/snap2
old=$(lvs --noheadings -o thin_id tvg/snap1 | tr -d ' ')
new=$(lvs --noheadings -o thin_id tvg/snap2 | tr -d ' ')
dmsetup message tvg-pool-tpool 0 reserve_metadata_snap
status=0
thin_delta -m --snap1 $old --snap2 $new /dev/mapper/tvg-pool_tmeta > "$WYNG_OUT/delta.xml" || status=$?
"$PYTHON" - $old $new > "$WYNG_OUT/chunks.json" <<'PY' || status=$?
import json, sys
from qubeswyng.sources.thin_delta import run_thin_delta
old, new = sys.argv[1:]
print(json.dumps({str(size): [i for run in run_thin_delta("/dev/mapper/tvg-pool_tmeta", old, new, size, 64 << 20)
                              for i in run] for size in (64 << 10, 256 << 10)}))
PY
dmsetup message tvg-pool-tpool 0 release_metadata_snap
exit $status
"""


def test_thin_delta_in_a_guest_finds_the_written_blocks(lvm_guest):
    start = time.monotonic()
    result = lvm_guest.run(SCRIPT % {"blocks": " ".join(map(str, WRITTEN))},
                           disks=[("pool", 1024 * MiB)], timeout=110)
    assert result.returncode == 0, result
    chunks = json.loads(result.read("chunks.json"))
    assert chunks == {str(64 * KiB): list(WRITTEN), str(256 * KiB): [b // 4 for b in WRITTEN]}
    xml = result.read("delta.xml")
    assert 'data_block_size="128"' in xml
    assert '<different begin="5" length="1"/>' in xml
    assert '<right_only begin="700" length="1"/>' in xml
    assert time.monotonic() - start < 120
    print("guest: %.1f s in all, script started %.1f s after boot" % (result.seconds, result.boot_seconds))


def test_disks_keep_their_data_across_boots_and_failures_are_reported(lvm_guest):
    first = lvm_guest.run('printf "kept across boots" | dd of=$DISK_data bs=512 seek=2048 conv=notrunc status=none\n'
                          'echo "to stdout"; echo "to stderr" >&2; exit 3', disks=[("data", 64 * MiB)], timeout=60)
    assert (first.returncode, first.stdout, first.stderr) == (3, "to stdout\n", "to stderr\n")
    second = lvm_guest.run('test "$DISK_other" = /dev/vda; test "$DISK_data" = /dev/vdb\n'
                           'dd if=$DISK_data bs=512 skip=2048 count=1 status=none | tr -d "\\0"\n'
                           'false\necho "not reached"', disks=[("other", MiB), ("data", 64 * MiB)], timeout=60)
    assert (second.returncode, second.stdout) == (1, "kept across boots")


def test_a_guest_that_does_not_finish_is_stopped(lvm_guest):
    import subprocess
    from lvm_guest import GuestError
    with pytest.raises(GuestError, match="timed out after 20 s") as e:
        lvm_guest.run("echo started > $WYNG_OUT/started; sleep 600", timeout=20)
    assert "console (tail)" in str(e.value)
    run_dir = str(lvm_guest.dir / "run1")
    assert (lvm_guest.dir / "run1" / "started").exists()
    assert run_dir not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
