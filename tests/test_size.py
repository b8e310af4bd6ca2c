"""The trusted half stays small (DESIGN §1): its code lines, docstrings and
comments aside, are within the budget scripts/dom0-size states."""
import importlib.machinery
import importlib.util

from conftest import REPO


def test_dom0_stays_within_its_line_budget():
    loader = importlib.machinery.SourceFileLoader("dom0_size", str(REPO / "scripts" / "dom0-size"))
    spec = importlib.util.spec_from_loader("dom0_size", loader)
    size = importlib.util.module_from_spec(spec)
    loader.exec_module(size)
    total = sum(size.sizes().values())
    assert 2000 < total <= size.BUDGET, "dom0 has %d code lines, the budget is %d" % (total, size.BUDGET)
