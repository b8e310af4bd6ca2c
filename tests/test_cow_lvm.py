"""send --local=VG/POOL end to end with real lvm2 and dm-thin, in one qemu
guest boot: thin snapshots rotated per send, thin_delta on the reserved
metadata snapshot (pool blocks smaller and larger than a chunk), monitor,
growth, receive into a new and over an existing volume (also with
--use-snapshot and --sparse), a kill after the
commit, SIGTERM and SIGKILL while the metadata snapshot is held, and
delete --clean."""
import json
import re

import pytest

pytestmark = pytest.mark.slow

MiB = 1 << 20

SCRIPT = r"""
export QVM_WYNG_AGENT=$REPO/qubes-rpc/wyng.Agent PATH=$(dirname "$PYTHON"):$PATH
O=$WYNG_OUT
W() {
    t=$(cut -d' ' -f1 /proc/uptime)
    "$PYTHON" -m qubeswyng.cli --meta-dir=/tmp/meta "--passcmd=echo pw" --authmin=10 --dest=file:/tmp/arch "$@"
    s=$?; echo "$t $(cut -d' ' -f1 /proc/uptime) $*" >> "$O/times"; return $s
}
send() { out=$1; shift; W send --json "$@" > "$O/$out.json"; }
check() {  # session restored == the volume, byte for byte
    W receive "$2" --save-to=/tmp/r.img > /dev/null
    cmp /tmp/r.img "/dev/mapper/$1" && echo "same $2" >> "$O/checks"
    rm /tmp/r.img
}
held() { dmsetup status tvg-vm--pool-tpool | cut -d' ' -f7; }
wr() { dd if=/dev/urandom of="/dev/mapper/$1" bs="$2" seek="$3" count=1 oflag=direct conv=notrunc status=none; }

pvcreate -qy $DISK_pool
vgcreate -q tvg $DISK_pool
lvcreate -q --type thin-pool -L 300M --chunksize 64k -n vm-pool tvg     # pool blocks of 64 KiB
lvcreate -q --type thin-pool -L 100M --chunksize 1m -n big tvg          # and of 1 MiB
lvcreate -q -V 48M -T tvg/vm-pool -n vm-work-private
lvcreate -q -V 24M -T tvg/big -n data
dd if=/dev/urandom of=/dev/mapper/tvg-vm--work--private bs=1M count=20 oflag=direct status=none
dd if=/dev/urandom of=/dev/mapper/tvg-data bs=1M count=10 oflag=direct status=none
W arch-init --encrypt=off > /dev/null

send full vm-work-private --local=tvg/vm-pool
send full-big data --local=tvg/big
lvs --noheadings -o lv_name,lv_attr,lv_tags tvg > "$O/lvs-after-full"
wr tvg-vm--work--private 64k 5; wr tvg-vm--work--private 64k 700
wr tvg-data 4k 770; wr tvg-data 4k 5000
send inc vm-work-private --local=tvg/vm-pool
send inc-big data --local=tvg/big
check tvg-vm--work--private vm-work-private
check tvg-data data

# monitor folds a change; the next send reads it and the later one
wr tvg-vm--work--private 64k 300
W monitor --local=tvg/vm-pool --all > "$O/monitor"
wr tvg-vm--work--private 4k 4000
send after-monitor vm-work-private --local=tvg/vm-pool
check tvg-vm--work--private vm-work-private

# grown by 8 MiB, written in the new tail
lvextend -q -L 56M tvg/vm-work-private
wr tvg-vm--work--private 1M 50
send grown vm-work-private --local=tvg/vm-pool
check tvg-vm--work--private vm-work-private

# killed after the commit: the next send is incremental from the new snapshot
wr tvg-vm--work--private 64k 10
QVM_WYNG_TEST_CRASH=cow-after-commit W send vm-work-private --local=tvg/vm-pool > /dev/null 2>&1 || echo $? > "$O/killed"
wr tvg-vm--work--private 64k 20
send after-kill vm-work-private --local=tvg/vm-pool
check tvg-vm--work--private vm-work-private

# SIGTERM, then SIGKILL, while thin_delta runs on the reserved metadata snapshot
mkdir -p /tmp/slow
printf '#!/bin/sh\necho $$ > /tmp/slow/pid.new\nmv /tmp/slow/pid.new /tmp/slow/pid\nexec sleep 60\n' > /tmp/slow/thin_delta
chmod +x /tmp/slow/thin_delta
for sig in TERM KILL; do
    rm -f /tmp/slow/pid
    (PATH=/tmp/slow:$PATH exec "$PYTHON" -m qubeswyng.cli --meta-dir=/tmp/meta --authmin=10 "--passcmd=echo pw" \
        --dest=file:/tmp/arch send vm-work-private --local=tvg/vm-pool > /dev/null 2>&1) &
    pid=$!
    while [ ! -e /tmp/slow/pid ]; do sleep 0.2; done
    echo "$sig held $(held)" >> "$O/signals"
    kill -$sig $pid
    wait $pid || echo "$sig exit $?" >> "$O/signals"
    kill "$(cat /tmp/slow/pid)" 2> /dev/null || true
    echo "$sig after $(held)" >> "$O/signals"
done
wr tvg-vm--work--private 64k 30
send after-signals vm-work-private --local=tvg/vm-pool
echo "end held $(held)" >> "$O/signals"
check tvg-vm--work--private vm-work-private
lvs --noheadings -o lv_name tvg > "$O/lvs-after-signals"

# receive: into a new volume (of another pool), and over an existing one
lvrename -q tvg data data-orig
W receive data --local=tvg/vm-pool > /dev/null
cmp /dev/mapper/tvg-data /dev/mapper/tvg-data--orig && echo "same new data" >> "$O/checks"
lvs --noheadings -o lv_name,pool_lv,lv_size --units m tvg/data > "$O/lvs-received"
dd if=/dev/mapper/tvg-vm--work--private of=/tmp/expect.img bs=1M status=none
wr tvg-vm--work--private 1M 3
W receive vm-work-private --local=tvg/vm-pool > /dev/null 2> "$O/refused" && echo "not refused" >> "$O/refused"
W receive vm-work-private --local=tvg/vm-pool --overwrite > /dev/null
cmp /tmp/expect.img /dev/mapper/tvg-vm--work--private && echo "same over" >> "$O/checks"
W diff vm-work-private --local=tvg/vm-pool > "$O/diff"
send after-restore vm-work-private --local=tvg/vm-pool

# Wyng's receive modes: from the snapshot of the last send (a thin snapshot of
# it replaces the volume), then sparsely onto the volume in place
wr tvg-vm--work--private 1M 7
W receive vm-work-private --local=tvg/vm-pool --use-snapshot --overwrite > "$O/use-snapshot"
cmp /tmp/expect.img /dev/mapper/tvg-vm--work--private && echo "same from snapshot" >> "$O/checks"
wr tvg-vm--work--private 64k 40
W receive vm-work-private --local=tvg/vm-pool --sparse --overwrite > "$O/sparse"
cmp /tmp/expect.img /dev/mapper/tvg-vm--work--private && echo "same sparse" >> "$O/checks"
lvs --noheadings -o lv_name tvg > "$O/lvs-after-modes"

W delete --clean --all > /dev/null
lvs --noheadings -o lv_name,lv_tags tvg > "$O/lvs-after-clean"
"""


def slot(name):
    """A snapshot's name without the archive volume id before its slot."""
    found = re.fullmatch(r"(.*)\.[0-9a-f]{8}\.(tick|tock)", name)
    assert found, name
    return "%s.%s" % found.groups()


def test_lvm_thin_send_rotate_monitor_receive_in_a_guest(lvm_guest):
    result = lvm_guest.run(SCRIPT, disks=[("pool", 1024 * MiB)], timeout=560)
    assert result.returncode == 0, result

    def st(name):
        return json.loads(result.read(name + ".json"))["volumes"][0]

    def reads(name):
        s = st(name)
        return s["incremental"], s["chunks_read"], s["chunks_changed"]

    assert (st("full")["incremental"], st("full")["chunks_scanned"]) == (False, 192)
    # read-only (r), activation skipped (k), tagged with the archive id
    snaps = [line.split() for line in result.read("lvs-after-full").splitlines() if "qwyng" in line]
    aid = snaps[0][2].split(":")[1][:16]
    assert [(slot(s[0]), s[1][:2], s[1][-1], s[2][:11]) for s in snaps] == [
        ("data.qwyng-%s.tick" % aid, "Vr", "k", "qubes-wyng:"), ("vm-work-private.qwyng-%s.tick" % aid, "Vr", "k", "qubes-wyng:")]
    # 64 KiB pool blocks 5 and 700 lie in 256 KiB chunks 1 and 175
    assert reads("inc") == (True, 2, 2)
    # 1 MiB pool blocks: each 4 KiB write makes thin_delta report 4 chunks
    assert reads("inc-big") == (True, 8, 2)
    assert result.read("monitor") == "vm-work-private: 1 chunks changed since the last send\n"
    assert reads("after-monitor") == (True, 2, 2)
    # the 8 MiB tail (32 chunks) is read: a block device has no holes to skip
    assert reads("grown") == (True, 32, 32) and st("grown")["chunks_scanned"] == 224
    assert result.read("killed").strip() == "137"
    assert reads("after-kill") == (True, 1, 1)
    # held: the metadata snapshot's block, or "-"; SIGTERM releases it, SIGKILL
    # cannot, and the next send releases what the killed one left
    signals = [line.rsplit(" ", 1) for line in result.read("signals").splitlines()]
    assert [s[0] for s in signals] == ["TERM held", "TERM exit", "TERM after", "KILL held", "KILL exit",
                                       "KILL after", "end held"]
    assert [s[1] == "-" for s in signals] == [False, False, True, False, False, False, True]
    assert (signals[1][1], signals[4][1]) == ("130", "137")
    assert reads("after-signals") == (True, 1, 1)
    assert [slot(n) for n in result.read("lvs-after-signals").split() if "qwyng" in n] == [
        "data.qwyng-%s.tock" % aid, "vm-work-private.qwyng-%s.tock" % aid]
    assert result.read("checks").split("\n")[:-1] == [
        "same vm-work-private", "same data", "same vm-work-private", "same vm-work-private",
        "same vm-work-private", "same vm-work-private", "same new data", "same over", "same from snapshot",
        "same sparse"]
    # the snapshot holds the newest session: nothing fetched; sparsely, the one chunk written to
    assert result.read("use-snapshot").strip().endswith(", 0 chunks)")
    assert result.read("sparse").strip().endswith(", 1 chunks)")
    assert "vm-work-private" in result.read("lvs-after-modes").split()
    assert "qwyng-new" not in result.read("lvs-after-modes")
    assert result.read("lvs-received").split() == ["data", "vm-pool", "24.00m"]
    assert "exists: give --overwrite" in result.read("refused")
    assert "same as session" in result.read("diff")
    assert st("after-restore")["incremental"] and st("after-restore")["chunks_changed"] == 0
    assert "qwyng" not in result.read("lvs-after-clean") and "qubes-wyng" not in result.read("lvs-after-clean")
    print("guest: %.1f s in all" % result.seconds)
