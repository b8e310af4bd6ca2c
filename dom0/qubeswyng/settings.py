"""Qubes in the archive: volume names and the settings record (doc/qubes.md).

A qube's data volume ``private`` is the archive volume ``qubes/<qube>/private``
and its settings are the volume ``qubes/<qube>/settings``: canonical JSON,
chunked, MAC'd and pruned like any volume.  ``check`` is the whole schema;
a record is applied only after it passed, and nothing is applied from a
record that fails any part of it.
"""
import json
import re

from .errors import Fail

VERSION = 2  # 2 added "devices"; records of version 1 are read as having none
MAX_SIZE = 1 << 20
PREFIX = "qubes/"
SETTINGS = "settings"
CLASSES = ("AppVM", "DispVM", "StandaloneVM", "TemplateVM")
KEYS = {"version", "name", "class", "label", "template", "properties", "features", "tags", "firewall",
        "notes", "volumes", "devices"}
# never stored nor applied: identity, runtime state, values derived from the
# class or the network, and the three creation arguments (fields of their own)
NEVER_COPY = frozenset((
    "name", "klass", "label", "template", "qid", "uuid", "xid", "stubdom_xid", "stubdom_uuid",
    "start_time", "backup_timestamp", "gateway", "gateway6", "visible_ip", "visible_ip6", "visible_gateway",
    "visible_gateway6", "visible_netmask", "dns", "dispid", "icon", "updateable", "installed_by_rpm",
    "is_preload"))
VM_REFS = ("netvm", "default_dispvm", "management_dispvm", "audiovm", "guivm")
NET_IDS = ("ip", "ip6")  # restored only where no other qube has them
DEVICE = {"class": ("pci", "usb", "block", "mic"), "mode": ("required", "auto-attach", "ask-to-attach")}
PORT, DEVICE_ID = re.compile(r"[\x21-\x7e]{1,255}\Z"), re.compile(r"[\x20-\x7e]{1,255}\Z")
NAME = re.compile(r"[a-zA-Z][a-zA-Z0-9_.-]{0,30}\Z")
PROPERTY = re.compile(r"[a-z][a-z0-9_]{0,63}\Z")
FEATURE = re.compile(r"[a-zA-Z0-9_.+-]{1,255}\Z")
TAG = re.compile(r"[a-zA-Z0-9_-]{1,255}\Z")
VOLUME = re.compile(r"[a-z][a-z0-9_]{0,30}\Z")
MAX_TEXT, MAX_NOTES, MAX_ITEMS = 64 << 10, 256000, 4096


def is_name(name):
    """A valid qube (or label) name, as qubesd allows them."""
    return isinstance(name, str) and bool(NAME.match(name)) and name != "none"


def qube_name(name):
    if not is_name(name):
        raise Fail("%r is not a valid qube name" % name[:40])
    return name


def volume(qube, vol):
    return "%s%s/%s" % (PREFIX, qube, vol)


def qubes_in(root):
    """{qube: {volume: archive volume record}} of every qube in an archive
    root: the volumes named qubes/<qube>/<volume>."""
    found = {}
    for vol in root["volumes"]:
        parts = vol["name"].split("/")
        if len(parts) == 3 and parts[0] + "/" == PREFIX:
            found.setdefault(parts[1], {})[parts[2]] = vol
    return found


def resolve(archive, names):
    """Archive volumes (records) for command-line names: a volume's own name,
    or a qube name, which stands for all of that qube's volumes (settings too).
    A volume of that exact name wins; ``qubes/Q/V`` is always unambiguous.
    Each volume comes once, however often it is named."""
    if not names:
        raise Fail("name volumes or qubes")
    qubes, out = qubes_in(archive.root), {}
    for name in names:
        vol = archive.volume(name)
        if vol is None and name not in qubes:
            raise Fail("%r is not in the archive (as a volume or a qube)" % name)
        out.update((v["id"], v) for v in ([vol] if vol else [v for _n, v in sorted(qubes[name].items())]))
    return list(out.values())


def encode(record):
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def parse(data, name):
    """The record of qube ``name`` from its authenticated bytes, checked."""
    try:
        record = json.loads(bytes(data).decode("utf-8"))
        encode(record)  # JSON escapes can make lone surrogates, which are not UTF-8
    except (ValueError, RecursionError):
        raise Fail("the settings record of %s is refused: not UTF-8 JSON" % name) from None
    return check(record, name)


def _text(value, limit=MAX_TEXT):
    return isinstance(value, str) and len(value) <= limit and "\0" not in value


def check(rec, name):
    """Refuse the whole record unless every field has the form dom0 writes."""
    def need(ok, what):
        if not ok:
            raise Fail("the settings record of %s is refused: %s" % (name, what))
    need(isinstance(rec, dict), "unknown or missing fields")
    need(rec.get("version") in (1, VERSION) and type(rec["version"]) is int, "format version is not 1 or %d" % VERSION)
    need(set(rec) == (KEYS if rec["version"] > 1 else KEYS - {"devices"}), "unknown or missing fields")
    rec.setdefault("devices", [])
    need(rec["name"] == name, "it is the record of another qube")
    need(rec["class"] in CLASSES and is_name(rec["label"]), "class or label")
    need(is_name(rec["template"]) if rec["class"] in ("AppVM", "DispVM") else rec["template"] is None, "template")
    props, features = rec["properties"], rec["features"]
    need(isinstance(props, dict) and len(props) <= MAX_ITEMS, "properties")
    for key, value in props.items():
        need(PROPERTY.match(key) and key not in NEVER_COPY, "property %r may not be set" % key[:64])
        need(value is None or type(value) in (bool, int) or _text(value), "value of property %s" % key)
        need(key not in VM_REFS or value is None or is_name(value), "%s is not a qube name" % key)
    need(isinstance(features, dict) and len(features) <= MAX_ITEMS, "features")
    need(all(FEATURE.match(k) and _text(v) for k, v in features.items()), "a feature")
    need(isinstance(rec["tags"], list) and len(rec["tags"]) <= MAX_ITEMS
         and all(isinstance(t, str) and TAG.match(t) for t in rec["tags"]), "tags")
    need(isinstance(rec["firewall"], list) and len(rec["firewall"]) <= MAX_ITEMS, "firewall")
    need(all(_text(r, 4096) and r.isascii() and r.isprintable() and r for r in rec["firewall"]), "a firewall rule")
    need(_text(rec["notes"], MAX_NOTES), "notes")
    vols = rec["volumes"]
    need(isinstance(vols, list) and all(isinstance(v, str) and VOLUME.match(v) and v != SETTINGS for v in vols)
         and len(set(vols)) == len(vols) <= 16, "volumes")
    devs = rec["devices"]
    need(isinstance(devs, list) and len(devs) <= 256 and all(
        isinstance(d, dict) and set(d) == {"class", "backend", "port", "device", "mode", "options"} and
        d["class"] in DEVICE["class"] and d["mode"] in DEVICE["mode"] and is_name(d["backend"]) and
        isinstance(d["port"], str) and PORT.match(d["port"]) and isinstance(d["device"], str) and
        DEVICE_ID.match(d["device"]) and isinstance(d["options"], dict) and len(d["options"]) <= 32 and
        all(FEATURE.match(k) and _text(v, 255) and v.isprintable() for k, v in d["options"].items()) for d in devs),
        "a device")
    return rec
