"""Changed chunks of an LVM thin volume, from ``thin_delta``.

``thin_delta`` (thin-provisioning-tools) compares the block mappings of two
thin devices of one pool and prints XML; 0.9.0 prints, by default::

    <superblock uuid="" time="1" transaction="1" data_block_size="128" nr_data_blocks="100">
      <diff left="1" right="2">
        <same begin="0" length="2"/>
        <different begin="2" length="2"/>
        <left_only begin="12" length="1"/>
        <right_only begin="20" length="1"/>
      </diff>
    </superblock>

``begin`` and ``length`` count pool blocks of ``data_block_size`` 512-byte
sectors.  With ``--verbose`` each kind element holds the ranges instead, as
``<range begin= length= .../>`` children; both forms are read.  ``same`` is
no change; ``different``, ``left_only`` and ``right_only`` are.

The result is a sorted list of disjoint, non-adjacent ``range`` objects of
chunk indexes: its size grows with the number of changed runs, never with
the size of the volume.
"""
import io
import os
import subprocess
import tempfile

from lxml import etree

from ..errors import Fail

SECTOR = 512
KINDS = frozenset(("same", "different", "left_only", "right_only"))


def _number(elem, name):
    value = elem.get(name)
    if value is None or not (value.isascii() and value.isdigit()) or len(value) > 20:
        raise Fail("thin_delta output: <%s> has no valid %s (%r)" % (elem.tag, name, value))
    return int(value)


def _add(runs, first, stop):
    """Append [first, stop) to runs, joining it to the last run if they
    touch (or overlap)."""
    if runs and runs[-1].start <= first <= runs[-1].stop:
        runs[-1] = range(runs[-1].start, max(stop, runs[-1].stop))
    else:
        runs.append(range(first, stop))


def changed_chunks(xml, chunk_size, volume_size=None):
    """Chunks touched by the changes in thin_delta output ``xml`` (bytes or
    a binary stream, read incrementally) as sorted, disjoint ``range``s of
    chunk indexes; with ``volume_size`` (bytes), chunks past the end are
    dropped."""
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise Fail("chunk size must be a positive number of bytes, not %r" % (chunk_size,))
    if isinstance(xml, (bytes, bytearray, memoryview)):
        xml = io.BytesIO(xml)
    limit = float("inf") if volume_size is None else -(-volume_size // chunk_size)
    runs, block, diffs, stack = [], None, 0, []
    try:
        for event, elem in etree.iterparse(xml, events=("start", "end"), resolve_entities=False, no_network=True,
                                           load_dtd=False, huge_tree=False, remove_comments=True, remove_pis=True):
            if event == "end":
                stack.pop()
                elem.clear()
                while elem.getprevious() is not None:
                    del elem.getparent()[0]
                continue
            depth, tag = len(stack), elem.tag
            stack.append(tag)
            if depth == 0:
                if tag != "superblock" or elem.getroottree().docinfo.doctype:
                    raise Fail("thin_delta output: expected <superblock> without a DOCTYPE")
                block = _number(elem, "data_block_size") * SECTOR
                if not block:
                    raise Fail("thin_delta output: data_block_size is 0")
                continue
            if depth == 1 and tag == "diff":
                diffs += 1
                continue
            if depth == 2 and tag in KINDS:
                if elem.get("begin") is None:
                    continue  # the --verbose form: <range> children follow
                kind = tag
            elif depth == 3 and tag == "range":
                kind = stack[2]
            else:
                raise Fail("thin_delta output: unexpected <%s> in <%s>" % (tag, stack[-2]))
            begin, length = _number(elem, "begin"), _number(elem, "length")
            if kind == "same" or not length:
                continue
            first = begin * block // chunk_size
            stop = min(-(-(begin + length) * block // chunk_size), limit)
            if first < stop:
                _add(runs, first, stop)
    except etree.XMLSyntaxError as e:
        raise Fail("thin_delta output is not valid XML: %s" % str(e).splitlines()[0]) from None
    if diffs != 1:
        raise Fail("thin_delta output has %d <diff> elements, not 1" % diffs)
    merged = []  # sorted and joined once more: runs that came out of order join here
    for run in sorted(runs, key=lambda r: r.start):
        _add(merged, run.start, run.stop)
    return merged


def _thin_id(value):
    text = str(value).strip()
    if not (text.isascii() and text.isdigit()):
        raise Fail("not a thin device id: %r" % (value,))
    return text


def run_thin_delta(tmeta_path, old_id, new_id, chunk_size, volume_size=None, metadata_snap=True):
    """Run ``thin_delta`` between thin devices ``old_id`` and ``new_id`` of
    the pool metadata at ``tmeta_path`` (the ``_tmeta`` device, reading its
    reserved metadata snapshot, or with ``metadata_snap=False`` a metadata
    file) and return ``changed_chunks`` of its output, parsed as it streams."""
    cmd = ["thin_delta"] + (["--metadata-snap"] if metadata_snap else []) + [
        "--snap1", _thin_id(old_id), "--snap2", _thin_id(new_id), str(tmeta_path)]
    what = "thin_delta %s->%s on %s" % (cmd[-4], cmd[-2], tmeta_path)
    with tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                                    env=dict(os.environ, LC_ALL="C"))
        except OSError as e:
            raise Fail("%s: cannot run it (%s); is thin-provisioning-tools installed?"
                       % (what, e.strerror)) from None
        problem = None
        with proc:
            try:
                runs = changed_chunks(proc.stdout, chunk_size, volume_size)
            except Fail as e:
                problem = e
                while proc.stdout.read(1 << 16):
                    pass  # let it finish, so its exit status tells why
            except BaseException:
                proc.kill()
                raise
        if proc.returncode:
            err.seek(0)
            text = err.read(4096).decode("utf-8", "replace")
            reason = next((line.strip() for line in text.splitlines() if line.strip()), "no message")
            raise Fail("%s failed (exit %d): %s" % (what, proc.returncode, reason))
        if problem:
            raise Fail("%s: %s" % (what, problem)) from None
    return runs
