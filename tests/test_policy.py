"""The qrexec policy file: Qubes 4.2 policy.d syntax, and it denies every
qube every wyng service, into dom0 and into other qubes."""
import re
import string

from conftest import REPO

POLICY = REPO / "qubes-rpc" / "policy" / "90-qubes-wyng.policy"
# qrexec's own rules (QubesOS/qubes-core-qrexec, qrexec/policy/parser.py)
RPCNAME = set(string.ascii_letters + string.digits + "+-._")
FILENAME = set(string.ascii_lowercase + string.digits + "_.-")
SERVICES = sorted(p.name for p in (REPO / "qubes-rpc").iterdir() if p.is_file())


def rules():
    for line in POLICY.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            yield line.split()


def test_policy_file_name_is_one_qrexec_reads():
    assert set(POLICY.name) <= FILENAME and POLICY.suffix == ".policy"
    assert POLICY.name.startswith("90-"), "packages ship at 90; users override in 30-user.policy"


def test_every_rule_has_valid_syntax():
    found = list(rules())
    assert found
    for service, argument, source, target, action, *params in found:
        assert service == "*" or set(service) <= RPCNAME - {"+"}, service
        assert argument == "*" or (argument.startswith("+") and set(argument) <= RPCNAME), argument
        for token in (source, target):
            assert token in ("@anyvm", "@adminvm") or re.fullmatch(r"@(tag|type):[\w.-]+|[\w.-]+", token), token
        assert action in ("allow", "deny", "ask"), action
        assert all(re.fullmatch(r"[a-z_]+=\S+", p) for p in params), params


def test_no_qube_may_call_any_wyng_service():
    denied = {(service, target) for service, argument, source, target, action, *_ in rules()
              if argument == "*" and source == "@anyvm" and action == "deny"}
    assert SERVICES == ["wyng.Agent", "wyng.Browse"]
    for service in SERVICES:
        assert (service, "@adminvm") in denied, "into dom0"
        assert (service, "@anyvm") in denied, "into another qube (the backup qube's agent)"
    assert all(r[4] == "deny" for r in rules()), "the package allows nothing"
