"""doc/PROTOCOL.md is the one statement of the protocol's numbers: its
tables are read here and both halves' constants (which share no code)
checked against them, so neither half nor the page can drift alone."""
import re

from conftest import REPO
from qubeswyng import archive as dom0_archive, wire as dom0
from qubeswyng.commands import arch_copy
from wyngagent import agent, archive as agent_archive, lease, scan, wire

PAGE = (REPO / "doc" / "PROTOCOL.md").read_text()


def table(header):
    """Rows (lists of cells) of the table whose header row starts with ``header``."""
    lines = PAGE.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| " + header + " |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            return rows
        rows.append([cell.strip().strip("`") for cell in line.strip("|").split("|")])
    return rows


def numbered(header):
    return {row[1]: int(row[0], 0) for row in table(header)}


def test_the_version_in_the_title_is_both_halves():
    assert re.search(r"^# The wyng\.Agent protocol, version (\d+)$", PAGE, re.M).group(1) == str(wire.PROTOCOL_VERSION)
    assert dom0.PROTOCOL_VERSION == wire.PROTOCOL_VERSION


def test_ops():
    requests, replies = numbered("op | name | payload | reply"), numbered("op | name | payload")
    for ops in (requests, replies):
        assert len(set(ops.values())) == len(ops)
        for name, value in ops.items():
            assert getattr(dom0, name) == value and getattr(wire, name) == value, name
    assert set(agent.HANDLERS) == set(requests.values())


def test_scan_modes_and_records():
    for name, value in numbered("bit").items():
        assert getattr(dom0_archive, "SCAN_" + name) == value and getattr(scan, name) == value, name
    for name, value in numbered("kind").items():
        assert getattr(dom0_archive, name) == value and getattr(scan, name) == value, name


def test_constants_and_layouts():
    rows = {row[0]: row[1] for row in table("name | value | what")}
    halves = {
        "PROTOCOL_VERSION": (dom0.PROTOCOL_VERSION, wire.PROTOCOL_VERSION),
        "FRAME": (dom0.HEADER.format, wire.HEADER.format),
        "MAX_PAYLOAD": (wire.MAX_PAYLOAD,),
        "PART": (dom0.PART, agent_archive.PART),
        "OPEN_ARGS": (dom0.OPEN_ARGS.format, agent.OPEN.format),
        "STATS": (dom0.STATS.format, wire.STATS.format),
        "SCAN_ITEM": (dom0.SCAN_ITEM.format, agent.SCAN_ITEM.format),
        "SCAN_RECORD": (dom0.SCAN_RECORD.format, scan.REPORT.format),
        "LOCK_GARBAGE": (dom0.LOCK_GARBAGE, agent_archive.LOCK_GARBAGE),
        "LOCK_FORCED": (dom0.LOCK_FORCED, lease.FORCED),
        "LOCK_STALE": (dom0.LOCK_STALE, lease.STALE),
        "CHUNK": (arch_copy.CHUNK, agent_archive.CHUNK),
        "MANIFEST": (arch_copy.MANIFEST, agent_archive.MANIFEST),
    }
    assert set(rows) == set(halves)
    for name, values in halves.items():
        for value in values:
            assert str(value) == rows[name], name
